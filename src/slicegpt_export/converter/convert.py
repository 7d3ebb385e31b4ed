"""The converter: source model -> fused -> rotated and sliced -> sliced checkpoint."""

from __future__ import annotations

import dataclasses
import json
import logging
import resource
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from slicegpt_export.atomic import atomic_directory
from slicegpt_export.checkpoint import (
    GGUF_METADATA_NAME,
    SlicedConfig,
    build_checked,
    parameter_count,
    save_checkpoint,
    save_spectra,
    size_summary,
    weight_macs_per_token,
)  # fmt: skip
from slicegpt_export.converter.adapters import FamilyAdapter, adapter_for
from slicegpt_export.converter.adapters.base import ATTN_NORM, ATTN_POST_NORM, FINAL_NORM, MLP_NORM, MLP_POST_NORM
from slicegpt_export.converter.budget import ALLOCATIONS, kept_count, spectrum_plan, uniform_plan
from slicegpt_export.converter.calibration import calibration_size
from slicegpt_export.converter.fusion import fuse_norms, post_norm_projections, scale_embeddings
from slicegpt_export.converter.mixture import DenseWriter, calibration_windows
from slicegpt_export.converter.sensitivity import measure_sensitivities, sensitivity_plan
from slicegpt_export.converter.slicing import (
    ROTATIONS,
    CalibrationBatch,
    dense_spectra,
    rotate_and_slice,
    slice_tied_matrix,
    sliced_width,
    tied_matrix_basis,
    uniform_widths,
)
from slicegpt_export.device import resolve_device
from slicegpt_export.errors import SliceGPTError
from slicegpt_export.modeling import SlicedModel
from slicegpt_export.sources.models import SourceModel, load_source
from slicegpt_export.sources.text import window_bos

logger = logging.getLogger(__name__)

#: rotation scheme of budget slicing (measured in bench/pareto.py: one shortcut per block is smaller at equal quality)
DEFAULT_BUDGET_ROTATION = "block"
#: fraction of MLP neurons a budget keeps unless told: spending the budget on residual width rather than on
#: the MLPs' inner width measured better on SmolLM2 at --target-params 0.75 (bench/pareto.py, README results)
DEFAULT_BUDGET_FFN_KEEP = 0.6


def check_sparsity(sparsity: float) -> None:
    if not 0.0 <= sparsity < 1.0:
        raise SliceGPTError(f"sparsity must be in [0, 1), got {sparsity}")


def canonical_tensors(adapter: FamilyAdapter, source: SourceModel, num_layers: int) -> dict[str, torch.Tensor]:
    """Source tensors renamed to the canonical names (a tied head stays the embedding: no lm_head.weight)."""
    adapter.prepare_source_tensors(source.tensors, num_layers)
    names = dict(adapter.global_tensor_names())
    for i in range(num_layers):
        names.update({c.format(i=i): s.format(i=i) for c, s in adapter.layer_tensor_names().items()})
    missing = [s for s in names.values() if s not in source.tensors]
    if missing:
        raise SliceGPTError(f"source model lacks tensors {missing[:3]}{' ...' if len(missing) > 3 else ''}")
    tensors = {c: source.tensors.pop(s) for c, s in names.items()}  # moved, not copied
    if source.tensors:
        logger.info("ignoring %d source tensors the family does not use (e.g. %s)", len(source.tensors), next(iter(source.tensors)))
        source.tensors.clear()
    return tensors


def fusable_norm_names(tensors: dict[str, torch.Tensor]) -> list[str]:
    """The residual-stream norms fusion folds away (pre-, post- and final norms); per-head q/k norms stay."""
    stems = {name.split(".")[-1] for name in (ATTN_NORM, MLP_NORM, ATTN_POST_NORM, MLP_POST_NORM)} | {FINAL_NORM}
    return [n for n in tensors if n.split(".")[-2] in stems]


def fused_model(source: SourceModel) -> tuple[SlicedModel, SlicedConfig, FamilyAdapter]:
    """The source as a reference model with every norm folded away (dense widths, no shortcuts).

    The source's tensors move into the model (``source.tensors`` is emptied), so host memory
    holds one copy of the weights.  A tied source stays tied: its head starts as proj = I (D x D)
    beside the one embedding matrix.  ``cfg.size`` records the dense model's stored parameters
    (the tied matrix once) and weight multiply-accumulates per token.
    """
    adapter = adapter_for(source.hf_config)
    cfg = adapter.dense_config()
    cfg.tied_embeddings = adapter.tied_embeddings
    tensors = canonical_tensors(adapter, source, cfg.num_layers)
    cfg.size = {
        "dense_parameters": parameter_count(tensors),
        "dense_macs_per_token": weight_macs_per_token(tensors, tied_embeddings=cfg.tied_embeddings),
    }
    if cfg.tied_embeddings:
        tensors["lm_head.proj"] = torch.eye(cfg.hidden_size, dtype=tensors["embed_tokens.weight"].dtype)
    norms = {n: tensors.pop(n) for n in fusable_norm_names(tensors)}
    tensors.update(post_norm_projections(norms, cfg.num_layers))
    model = build_checked(cfg, tensors)
    fuse_norms(model, norms, norm_kind=adapter.norm_kind)
    scale_embeddings(model, adapter.embedding_scale())
    cfg.bias = {**cfg.bias, "head": model.lm_head.bias is not None}
    return model, cfg, adapter


def calibration_batches(ids: torch.Tensor, batch_size: int, device: torch.device) -> list[CalibrationBatch]:
    return [CalibrationBatch(chunk.to(device), None) for chunk in ids.split(batch_size)]


@dataclasses.dataclass
class SliceSummary:
    config: SlicedConfig
    params_before: int
    params_after: int
    seconds: float
    peak_rss_mb: float
    out: Path | None


#: calibration windows the sensitivity allocation measures on (a few suffice: it ranks layers)
SENSITIVITY_WINDOWS = 8


def batches_of_windows(batches: list[CalibrationBatch], windows: int) -> list[CalibrationBatch]:
    """The leading batches holding about `windows` calibration windows (at least one batch)."""
    out, n = [], 0
    for b in batches:
        if n >= windows:
            break
        out.append(CalibrationBatch(b.ids, b.mask))
        n += b.ids.shape[0]
    return out


def check_target(target_params: float | None, sparsity: float) -> None:
    if target_params is None:
        return
    if not 0.0 < target_params < 1.0:
        raise SliceGPTError(f"--target-params must be in (0, 1), got {target_params}")
    if sparsity:
        raise SliceGPTError("give either --sparsity (the paper's slicing fraction) or --target-params (a budget), not both")


def plan_widths(
    model: SlicedModel,
    cfg: SlicedConfig,
    batches: list[CalibrationBatch],
    *,
    sparsity: float,
    target_params: float | None,
    rotation: str,
    allocation: str,
    round_to: int,
    slice_head: bool,
    intermediates: list[int] | None,
    device: torch.device,
    progress: bool = False,
) -> list[int]:
    """One width per residual signal: the paper's uniform width for `sparsity`, or a plan within the budget."""
    D = cfg.hidden_size
    if target_params is None:
        width = sliced_width(D, sparsity, round_to)
        return uniform_widths(model, rotation, width, width if slice_head else D)
    budget = int(target_params * cfg.size["dense_parameters"])
    options = {"round_to": round_to, "slice_head": slice_head, "intermediates": intermediates}
    if allocation == "uniform":
        return uniform_plan(cfg, rotation, budget, **options)
    if allocation == "spectrum":
        return spectrum_plan(cfg, dense_spectra(model, batches, rotation=rotation, device=device), rotation, budget, **options)
    if allocation == "sensitivity":
        probe = batches_of_windows(batches, SENSITIVITY_WINDOWS)
        curves = measure_sensitivities(model, probe, rotation=rotation, round_to=round_to, device=device, measure_head=slice_head,
                                       progress=progress)  # fmt: skip
        return sensitivity_plan(cfg, curves, rotation, budget, **options)
    raise SliceGPTError(f"unknown --allocation {allocation!r} (choose from {', '.join(ALLOCATIONS)})")


def slice_fused(
    model: SlicedModel,
    cfg: SlicedConfig,
    calib: torch.Tensor,
    *,
    sparsity: float = 0.0,
    target_params: float | None = None,
    rotation: str | None = None,
    allocation: str = "uniform",
    ffn_keep: float | None = None,
    embed_keep: float = 1.0,
    round_to: int = 8,
    slice_head: bool = False,
    device: torch.device | None = None,
    batch_size: int = 8,
    progress: bool = False,
    rotate: bool = True,
) -> dict[str, list[float]]:
    """Rotate and slice a fused model in place on the calibration windows `calib` (n, T).

    Widths: the paper's ``sparsity`` (every signal int((1 - s) D) rounded down), or a stored-
    parameter budget ``target_params`` x dense with an allocation.  ``rotation`` (see
    slicing.py) defaults to the paper's per-stage bases for ``sparsity`` and to one basis per
    block for budgets.  ``ffn_keep`` < 1 keeps that fraction of every MLP's neurons (converter/ffn.py;
    default: all for ``sparsity``, DEFAULT_BUDGET_FFN_KEEP for budgets);
    ``embed_keep`` < 1 slices a tied embedding matrix to that fraction of its D columns (slicing.py).
    Records widths and choices in `cfg`; returns the eigenvalues of every PCA.  With rotate=False (sparsity 0 only) the fused model is kept as it is: no PCA, no
    shortcuts, the plain dense model in the sliced-checkpoint format.
    """
    check_sparsity(sparsity)
    check_target(target_params, sparsity)
    device = device if device is not None else torch.device("cpu")
    if ffn_keep is None:
        ffn_keep = 1.0 if target_params is None else DEFAULT_BUDGET_FFN_KEEP
    for name, keep in (("--ffn-keep", ffn_keep), ("--embed-keep", embed_keep)):
        if not 0.0 < keep <= 1.0:
            raise SliceGPTError(f"{name} must be in (0, 1], got {keep}")
    if embed_keep < 1 and not cfg.tied_embeddings:
        raise SliceGPTError("--embed-keep slices a tied embedding matrix; this model's head is not tied to its embedding")
    if not rotate:
        if sparsity != 0 or slice_head or target_params is not None or ffn_keep < 1 or embed_keep < 1:
            raise SliceGPTError("--no-rotate keeps the dense model: it needs --sparsity 0, no --target-params and no --slice-head")
        cfg.sparsity, cfg.round_to, cfg.slicing = 0.0, round_to, {"rotation": "none"}
        return {}
    rotation = rotation or ("stage" if target_params is None else DEFAULT_BUDGET_ROTATION)
    if rotation not in ROTATIONS:
        raise SliceGPTError(f"unknown --rotation {rotation!r} (choose from {', '.join(ROTATIONS)})")
    batches = calibration_batches(calib, batch_size, device)
    intermediates = [kept_count(cfg.intermediate_size, ffn_keep)] * cfg.num_layers if ffn_keep < 1 else None
    tied_width = kept_count(cfg.hidden_size, embed_keep) if embed_keep < 1 else None
    cfg.tied_width = tied_width  # the plan counts the sliced matrix
    widths = plan_widths(model, cfg, batches, sparsity=sparsity, target_params=target_params, rotation=rotation, allocation=allocation,
                         round_to=round_to, slice_head=slice_head, intermediates=intermediates, device=device,
                         progress=progress)  # fmt: skip
    bar = tqdm(total=cfg.num_layers, desc="slicing layers", unit="layer", disable=not progress)
    result = rotate_and_slice(model, batches, widths=widths, rotation=rotation, intermediates=intermediates, device=device,
                              on_layer=lambda i: bar.update(1))  # fmt: skip
    bar.close()
    if tied_width is not None:
        slice_tied_matrix(model, tied_matrix_basis(model, result.head_inputs, batches, tied_width))
    cfg.embedding_width, cfg.layers, cfg.head_in = result.embedding_width, result.layers, result.head_in
    cfg.sparsity = sparsity if target_params is None else 1 - sum(widths[:-1]) / (len(widths) - 1) / cfg.hidden_size
    cfg.round_to = round_to
    cfg.slicing = {"rotation": rotation, "target_params": target_params, "ffn_keep": ffn_keep, "embed_keep": embed_keep,
                   "allocation": allocation if target_params is not None else "uniform"}  # fmt: skip
    return result.eigenvalues


def slice_source(source: SourceModel, calib: torch.Tensor, **options: Any) -> tuple[SlicedModel, SlicedConfig]:
    """Fuse, rotate and slice `source` (its tensors move into the returned model); options as slice_fused."""
    model, cfg, _ = fused_model(source)
    slice_fused(model, cfg, calib, **options)
    return model, cfg


def slice_checkpoint(
    *,
    model: str | Path | None,
    out: Path,
    sparsity: float = 0.0,
    target_params: float | None = None,
    rotation: str | None = None,
    allocation: str = "uniform",
    ffn_keep: float | None = None,
    embed_keep: float = 1.0,
    round_to: int = 8,
    slice_head: bool = False,
    calib: str | list[str] | None = None,
    calib_samples: int | None = None,
    calib_seqlen: int | None = None,
    calib_batch_size: int = 8,
    seed: int = 42,
    device: str = "auto",
    dtype: torch.dtype = torch.float32,
    overwrite: bool = False,
    progress: bool = True,
    rotate: bool = True,
) -> SliceSummary:
    """Slice `model` and write a sliced checkpoint folder to `out` atomically (options as slice_fused).

    `calib` is one source or a list of ``SOURCE[:WEIGHT]`` mixed by weight (see converter.mixture);
    the built-in sources ``self`` and ``self-chat`` are written by the fused dense model (cached).
    `calib_samples` x `calib_seqlen` default to what suits the device (calibration_size).
    """
    check_sparsity(sparsity)
    check_target(target_params, sparsity)
    if round_to < 1:
        raise SliceGPTError(f"--round-to must be a positive integer, got {round_to}")
    dev = resolve_device(device)
    calib_samples, calib_seqlen = calibration_size(calib_samples, calib_seqlen, dev)
    start = time.perf_counter()
    with atomic_directory(Path(out), overwrite=overwrite) as tmp:
        source = load_source(model, dtype=dtype)
        fused, cfg, _ = fused_model(source)
        ids, calib_record = calibration_windows(
            calib,
            source.tokenizer,
            samples=calib_samples,
            seqlen=min(calib_seqlen, cfg.max_position_embeddings),
            seed=seed,
            writer=DenseWriter(fused, source.tokenizer, device=dev, progress=progress),
            bos=window_bos(source.tokenizer, cfg.bos_windows),
        )
        logger.info("calibration: %d x %d tokens from %s", ids.shape[0], ids.shape[1], calib_record["source"])
        eigenvalues = slice_fused(
            fused,
            cfg,
            ids,
            sparsity=sparsity,
            target_params=target_params,
            rotation=rotation,
            allocation=allocation,
            ffn_keep=ffn_keep,
            embed_keep=embed_keep,
            round_to=round_to,
            slice_head=slice_head,
            device=dev,
            batch_size=calib_batch_size,
            progress=progress,
            rotate=rotate,
        )
        cfg.source_model = source.origin
        cfg.calibration = {
            **calib_record,
            "samples": int(ids.shape[0]),
            "seqlen": int(ids.shape[1]),
            "seed": seed,
            "batch_size": calib_batch_size,
            "dtype": str(dtype).removeprefix("torch."),
        }
        tensors = fused.named_weights()
        cfg.size = size_summary(tensors, cfg, dense_parameters=cfg.size["dense_parameters"], dense_macs=cfg.size["dense_macs_per_token"])
        save_checkpoint(tmp, tensors=tensors, config=cfg, base_config=source.hf_config)
        save_spectra(tmp, eigenvalues)
        if source.tokenizer is not None:
            source.tokenizer.save_pretrained(str(tmp))
        if source.gguf_metadata:
            (tmp / GGUF_METADATA_NAME).write_text(json.dumps(source.gguf_metadata))
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return SliceSummary(cfg, cfg.size["dense_parameters"], cfg.size["parameters"], seconds, peak, Path(out))
