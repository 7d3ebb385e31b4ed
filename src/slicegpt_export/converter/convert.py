"""The converter: source model -> fused -> rotated and sliced -> sliced checkpoint."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import resource
import time
from collections.abc import Callable, MutableMapping
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
    save_spectra,
    size_summary,
    weight_macs_per_token,
    write_config,
)  # fmt: skip
from slicegpt_export.converter.adapters import FamilyAdapter, adapter_for
from slicegpt_export.converter.budget import ALLOCATIONS, kept_count, mlp_only_plan, spectrum_plan, uniform_plan
from slicegpt_export.converter.calibration import calibration_size
from slicegpt_export.converter.distributed import DataParallel
from slicegpt_export.converter.ffn import DEFAULT_SELECTION, check_selection
from slicegpt_export.converter.fusion import (
    fusable_norm_names,
    fuse_global_norms,
    fuse_norms,
    post_norm_projections,
    scale_embeddings,
)
from slicegpt_export.converter.mixture import BUILTIN_SOURCES, DenseWriter, calibration_windows, parse_spec
from slicegpt_export.converter.pca import ONE_PROCESS, Reduction
from slicegpt_export.converter.sensitivity import measure_sensitivities, sensitivity_plan
from slicegpt_export.converter.slicing import (
    ROTATIONS,
    CalibrationBatch,
    LayerFeed,
    dense_spectra,
    rotate_and_slice,
    slice_tied_matrix,
    sliced_width,
    tied_matrix_basis,
    uniform_widths,
)
from slicegpt_export.converter.streaming import StreamedLayers, take_renamed
from slicegpt_export.device import resolve_device
from slicegpt_export.errors import SliceGPTError
from slicegpt_export.modeling import SlicedModel
from slicegpt_export.sources.models import SourceModel, load_source, source_dtype
from slicegpt_export.sources.text import window_bos
from slicegpt_export.tensorio import DEFAULT_SHARD_BYTES, LazyMapping, ShardWriter

logger = logging.getLogger(__name__)

#: folds norms (canonical name -> tensor) into a model: fusion.fuse_norms, or fuse_global_norms when blocks stream
NormFusion = Callable[..., None]

#: rotation scheme of budget slicing where the MLPs alone cannot meet the budget, or the user chose how many
#: neurons to keep or a per-layer allocation (measured in bench/pareto.py: one shortcut per block is smaller
#: at equal quality than the paper's two)
DEFAULT_BUDGET_ROTATION = "block"
#: fraction of MLP neurons such a rotated budget keeps unless told: spending the budget on residual width rather
#: than on the MLPs' inner width measured better on SmolLM2 at --target-params 0.75 (bench/pareto.py, README results)
DEFAULT_BUDGET_FFN_KEEP = 0.6


def check_sparsity(sparsity: float) -> None:
    if not 0.0 <= sparsity < 1.0:
        raise SliceGPTError(f"sparsity must be in [0, 1), got {sparsity}")


def canonical_names(adapter: FamilyAdapter, num_layers: int) -> dict[str, str]:
    """Canonical -> source names of every tensor the family reads (a tied head stays the embedding: no lm_head.weight)."""
    names = dict(adapter.global_tensor_names())
    for i in range(num_layers):
        names.update({c.format(i=i): s.format(i=i) for c, s in adapter.layer_tensor_names().items()})
    return names


def canonical_tensors(
    adapter: FamilyAdapter, source: MutableMapping[str, torch.Tensor], num_layers: int, dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """Source tensors taken out of `source`, renamed to the canonical names and cast to `dtype` (None: as they come)."""
    adapter.prepare_source_tensors(source, num_layers)
    tensors = {c: cast(t, dtype) for c, t in take_renamed(source, canonical_names(adapter, num_layers)).items()}  # moved, not copied
    if source:
        logger.info("ignoring %d source tensors the family does not use (e.g. %s)", len(source), next(iter(source)))
        source.clear()
    return tensors


def cast(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return t if dtype is None or t.dtype == dtype else t.to(dtype)


def fused_model(source: SourceModel, *, dtype: torch.dtype | None = None) -> tuple[SlicedModel, SlicedConfig, FamilyAdapter]:
    """The source as a reference model with every norm folded away (dense widths, no shortcuts), in `dtype`.

    The source's tensors move into the model (``source.tensors`` is emptied), so host memory
    holds one copy of the weights.  A tied source stays tied: its head starts as proj = I (D x D)
    beside the one embedding matrix.  ``cfg.size`` records the dense model's stored parameters
    (the tied matrix once) and weight multiply-accumulates per token.
    """
    adapter = adapter_for(source.hf_config)
    cfg = adapter.dense_config()
    tensors = canonical_tensors(adapter, source.tensors, cfg.num_layers, dtype)
    return fused_from(adapter, cfg, tensors, fuse=fuse_norms), cfg, adapter


def streamed_fused_model(source: SourceModel, *, dtype: torch.dtype) -> tuple[SlicedModel, SlicedConfig, FamilyAdapter]:
    """fused_model with only what lies outside the blocks read (and fused): every block is a meta placeholder.

    The blocks are read, fused and sliced one at a time later (converter/streaming.py); their
    shapes, from the file headers, give the dense size beforehand.
    """
    adapter = adapter_for(source.hf_config)
    cfg = adapter.dense_config()
    planned = meta_tensors(source.tensors)
    tensors = canonical_tensors(adapter, planned, cfg.num_layers)  # meta: nothing read
    names = {c: s for c, s in adapter.global_tensor_names().items() if c in tensors}
    outside = {s: source.tensors.pop(s) for s in names.values()}  # read now
    adapter.prepare_source_tensors(outside, cfg.num_layers)
    tensors.update({c: cast(outside[s], dtype) for c, s in names.items()})
    return fused_from(adapter, cfg, tensors, fuse=fuse_global_norms), cfg, adapter


def meta_tensors(tensors: MutableMapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Empty meta tensors of the same names, shapes and dtypes (a lazy source answers from its file headers)."""
    if isinstance(tensors, LazyMapping):
        return tensors.meta()
    return {n: torch.empty(t.shape, dtype=t.dtype, device="meta") for n, t in tensors.items()}


def fused_from(adapter: FamilyAdapter, cfg: SlicedConfig, tensors: dict[str, torch.Tensor], *, fuse: NormFusion) -> SlicedModel:
    """The model holding `tensors`, its norms taken out and folded in by `fuse`, then the embedding scale.

    Records the dense size in ``cfg.size`` and whether the head has a bias.
    """
    cfg.tied_embeddings = adapter.tied_embeddings
    cfg.size = {
        "dense_parameters": parameter_count(tensors),
        "dense_macs_per_token": weight_macs_per_token(tensors, tied_embeddings=cfg.tied_embeddings),
    }
    if cfg.tied_embeddings:
        tensors["lm_head.proj"] = torch.eye(cfg.hidden_size, dtype=tensors["embed_tokens.weight"].dtype)
    norms = {n: tensors.pop(n) for n in fusable_norm_names(tensors)}
    tensors.update(post_norm_projections(norms, cfg.num_layers))
    model = build_checked(cfg, tensors)
    fuse(model, norms, norm_kind=adapter.norm_kind)
    scale_embeddings(model, adapter.embedding_scale())
    cfg.bias = {**cfg.bias, "head": model.lm_head.bias is not None}
    return model


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


def budget_defaults(cfg: SlicedConfig, *, rotation: str | None, target_params: float | None, allocation: str,
                    ffn_keep: float | None) -> tuple[str, float]:  # fmt: skip
    """The rotation and the fraction of MLP neurons kept, where not told.  Without a budget: the paper's per-stage
    bases and every neuron.  With one: rotation none (MLP neurons only, every residual width kept: no PCA, no
    shortcut) with as many neurons as fit (budget.mlp_only_plan) where the MLPs alone can meet it and nothing else
    is asked of the plan, else DEFAULT_BUDGET_ROTATION with DEFAULT_BUDGET_FFN_KEEP.  `cfg.tied_width` must be set:
    the plan counts the sliced matrix.  On SmolLM2 MLP neurons alone measured far better than any rotated plan of
    the same size (bench/results/pareto-quality.md, neurons chosen by energy in both: 43.08 against 50.29 at 0.75, 70.93
    against 82.54 at 0.6)."""
    if target_params is None:
        return rotation or "stage", 1.0 if ffn_keep is None else ffn_keep
    if ffn_keep is None and rotation in (None, "none") and allocation == "uniform":
        budget = int(target_params * cfg.size["dense_parameters"])
        try:
            return "none", mlp_only_plan(cfg, budget) / cfg.intermediate_size
        except SliceGPTError:
            if rotation == "none":
                raise
            logger.info("the MLPs alone cannot meet --target-params %g: residual widths are narrowed too (rotation %s)",
                        target_params, DEFAULT_BUDGET_ROTATION)  # fmt: skip
    return rotation or DEFAULT_BUDGET_ROTATION, DEFAULT_BUDGET_FFN_KEEP if ffn_keep is None else ffn_keep


def check_unrotated(rotation: str, *, sparsity: float, allocation: str, slice_head: bool) -> None:
    """Rotation none keeps every width: it shrinks the MLPs only, so nothing that narrows a signal goes with it."""
    if rotation != "none":
        return
    if sparsity or slice_head:
        raise SliceGPTError("--rotation none keeps every residual width: give --target-params (or --ffn-keep with --sparsity 0), not --sparsity or --slice-head")
    if allocation != "uniform":
        raise SliceGPTError(f"--rotation none keeps every residual width: the {allocation} allocation has nothing to allocate")


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
    ffn_selection: str = DEFAULT_SELECTION,
    embed_keep: float = 1.0,
    round_to: int = 8,
    slice_head: bool = False,
    device: torch.device | None = None,
    batch_size: int = 8,
    progress: bool = False,
    rotate: bool = True,
    feed: LayerFeed | None = None,
    reduce: Reduction = ONE_PROCESS,
) -> dict[str, list[float]]:
    """Rotate and slice a fused model in place on the calibration windows `calib` (n, T).

    Widths: the paper's ``sparsity`` (every signal int((1 - s) D) rounded down), or a stored-
    parameter budget ``target_params`` x dense with an allocation.  ``rotation`` (see
    slicing.py) defaults as :func:`budget_defaults` says: the paper's per-stage bases for
    ``sparsity``; for budgets MLP neurons only (none) where they can meet it, else one basis per
    block.  ``ffn_keep`` < 1 keeps that fraction of every MLP's neurons (converter/ffn.py;
    default: :func:`budget_defaults`), chosen as ``ffn_selection`` says (obs or energy);
    ``embed_keep`` < 1 slices a tied embedding matrix to that fraction of its D columns (slicing.py).
    Records widths and choices in `cfg`; returns the eigenvalues of every PCA.  With rotate=False (sparsity 0 only) the fused model is kept as it is: no PCA, no
    shortcuts, the plain dense model in the sliced-checkpoint format.  `feed` and `reduce` as
    slicing.rotate_and_slice (streamed blocks; covariances summed over data-parallel processes).
    """
    check_sparsity(sparsity)
    check_target(target_params, sparsity)
    check_selection(ffn_selection)
    device = device if device is not None else torch.device("cpu")
    for name, keep in (("--ffn-keep", ffn_keep), ("--embed-keep", embed_keep)):
        if keep is not None and not 0.0 < keep <= 1.0:
            raise SliceGPTError(f"{name} must be in (0, 1], got {keep}")
    if embed_keep < 1 and not cfg.tied_embeddings:
        raise SliceGPTError("--embed-keep slices a tied embedding matrix; this model's head is not tied to its embedding")
    tied_width = kept_count(cfg.hidden_size, embed_keep) if embed_keep < 1 else None
    cfg.tied_width = tied_width  # the plans count the sliced matrix
    if not rotate:
        if sparsity != 0 or slice_head or target_params is not None or (ffn_keep or 1.0) < 1 or embed_keep < 1:
            raise SliceGPTError("--no-rotate keeps the dense model: it needs --sparsity 0, no --target-params and no --slice-head")
        cfg.sparsity, cfg.round_to, cfg.slicing = 0.0, round_to, {"rotation": "none"}
        return {}
    if rotation is not None and rotation not in ROTATIONS:
        raise SliceGPTError(f"unknown --rotation {rotation!r} (choose from {', '.join(ROTATIONS)})")
    rotation, ffn_keep = budget_defaults(cfg, rotation=rotation, target_params=target_params, allocation=allocation, ffn_keep=ffn_keep)
    check_unrotated(rotation, sparsity=sparsity, allocation=allocation if target_params is not None else "uniform", slice_head=slice_head)
    intermediates = [kept_count(cfg.intermediate_size, ffn_keep)] * cfg.num_layers if ffn_keep < 1 else None
    batches = calibration_batches(calib, batch_size, device)
    widths = plan_widths(model, cfg, batches, sparsity=sparsity, target_params=target_params, rotation=rotation, allocation=allocation,
                         round_to=round_to, slice_head=slice_head, intermediates=intermediates, device=device,
                         progress=progress)  # fmt: skip
    bar = tqdm(total=cfg.num_layers, desc="slicing layers", unit="layer", disable=not progress)
    result = rotate_and_slice(model, batches, widths=widths, rotation=rotation, intermediates=intermediates, ffn_selection=ffn_selection,
                              device=device, on_layer=lambda i: bar.update(1), feed=feed, reduce=reduce)  # fmt: skip
    bar.close()
    if tied_width is not None:
        slice_tied_matrix(model, tied_matrix_basis(model, result.head_inputs, batches, tied_width, reduce))
    cfg.embedding_width, cfg.layers, cfg.head_in = result.embedding_width, result.layers, result.head_in
    residual = widths[:-1] or widths  # every signal but the head's (rotation none: the one signal)
    cfg.sparsity = sparsity if target_params is None else 1 - sum(residual) / len(residual) / cfg.hidden_size
    cfg.round_to = round_to
    cfg.slicing = {"rotation": rotation, "target_params": target_params, "ffn_keep": ffn_keep, "embed_keep": embed_keep,
                   "allocation": allocation if target_params is not None else "uniform"}  # fmt: skip
    if intermediates is not None:
        cfg.slicing["ffn_selection"] = ffn_selection
    return result.eigenvalues


def slice_source(source: SourceModel, calib: torch.Tensor, **options: Any) -> tuple[SlicedModel, SlicedConfig]:
    """Fuse, rotate and slice `source` (its tensors move into the returned model); options as slice_fused."""
    model, cfg, _ = fused_model(source)
    slice_fused(model, cfg, calib, **options)
    return model, cfg


def streaming_obstacle(*, calib: str | list[str] | None, rotation: str, target_params: float | None, allocation: str, rotate: bool) -> str | None:
    """Why these options need the whole model in memory (None: the blocks can stream)."""
    texts = [calib] if isinstance(calib, str) else list(calib or [])
    if not texts or any(parse_spec(t).source in BUILTIN_SOURCES for t in texts):
        return "calibration text generated by the dense model (`self`, `self-chat`, or no --calib) needs the whole model"
    if rotation == "global":
        return "global rotation takes one PCA over every signal of the dense model first"
    if target_params is not None and allocation != "uniform":
        return f"the {allocation} allocation measures the dense model before slicing"
    if not rotate:
        return "--no-rotate copies the dense model"
    return None


def compute_dtype(stored: torch.dtype) -> torch.dtype:
    """Slicing computes in float32 (float64 for a float64 source); PCA and rotations in float64 regardless."""
    return torch.float64 if stored == torch.float64 else torch.float32


def slice_checkpoint(
    *,
    model: str | Path | None,
    out: Path,
    sparsity: float = 0.0,
    target_params: float | None = None,
    rotation: str | None = None,
    allocation: str = "uniform",
    ffn_keep: float | None = None,
    ffn_selection: str = DEFAULT_SELECTION,
    embed_keep: float = 1.0,
    round_to: int = 8,
    slice_head: bool = False,
    calib: str | list[str] | None = None,
    calib_samples: int | None = None,
    calib_seqlen: int | None = None,
    calib_batch_size: int = 8,
    seed: int = 42,
    device: str = "auto",
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
    progress: bool = True,
    rotate: bool = True,
    stream: bool = True,
    data_parallel: DataParallel | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> SliceSummary:
    """Slice `model` and write a sliced checkpoint folder to `out` atomically (options as slice_fused).

    `calib` is one source or a list of ``SOURCE[:WEIGHT]`` mixed by weight (see converter.mixture);
    the built-in sources ``self`` and ``self-chat`` are written by the fused dense model (cached).
    `calib_samples` x `calib_seqlen` default to what suits the device (calibration_size).
    `dtype` is the written checkpoint's (None: the source's; a GGUF source dequantizes to float32).

    With `stream` (and options that allow it, see streaming_obstacle) the source is read, sliced
    and written one block at a time (converter/streaming.py); otherwise it is held whole.  With
    `data_parallel` (a torchrun process, see converter.distributed) this process calibrates on its
    share of the windows, sums are all-reduced, and only process 0 writes `out`.
    """
    check_sparsity(sparsity)
    check_target(target_params, sparsity)
    if round_to < 1:
        raise SliceGPTError(f"--round-to must be a positive integer, got {round_to}")
    dev = data_parallel.device if data_parallel is not None else resolve_device(device)
    calib_samples, calib_seqlen = calibration_size(calib_samples, calib_seqlen, dev)
    obstacle = streaming_obstacle(calib=calib, rotation=rotation or ("stage" if target_params is None else DEFAULT_BUDGET_ROTATION),
                                  target_params=target_params, allocation=allocation, rotate=rotate)  # fmt: skip
    if data_parallel is not None and obstacle is not None:
        raise SliceGPTError(f"data-parallel calibration streams the blocks, but {obstacle}")
    streamed = stream and obstacle is None
    if stream and not streamed:
        logger.info("converting in memory: %s", obstacle)
    writes = data_parallel is None or data_parallel.writes
    start = time.perf_counter()
    with atomic_directory(Path(out), overwrite=overwrite) if writes else contextlib.nullcontext(None) as tmp:
        source = load_source(model, dtype=None)
        stored = source_dtype(source)
        work_dtype = compute_dtype(stored)
        fused, cfg, adapter = (streamed_fused_model if streamed else fused_model)(source, dtype=work_dtype)
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
        shards = ShardWriter(tmp, dtype=dtype or stored, max_shard_bytes=max_shard_bytes) if tmp is not None else None
        feed = None
        if streamed:
            sink = shards.add_all if shards is not None else None
            feed = StreamedLayers(fused, source.tensors, adapter, dtype=work_dtype, device=dev, sink=sink)
        eigenvalues = slice_fused(
            fused,
            cfg,
            data_parallel.share(ids) if data_parallel is not None else ids,
            sparsity=sparsity,
            target_params=target_params,
            rotation=rotation,
            allocation=allocation,
            ffn_keep=ffn_keep,
            ffn_selection=ffn_selection,
            embed_keep=embed_keep,
            round_to=round_to,
            slice_head=slice_head,
            device=dev,
            batch_size=calib_batch_size,
            progress=progress and writes,
            rotate=rotate,
            feed=feed,
            reduce=data_parallel if data_parallel is not None else ONE_PROCESS,
        )
        cfg.source_model = source.origin
        cfg.calibration = {
            **calib_record,
            "samples": int(ids.shape[0]),
            "seqlen": int(ids.shape[1]),
            "seed": seed,
            "batch_size": calib_batch_size,
            "dtype": str(work_dtype).removeprefix("torch."),
            "world_size": data_parallel.world_size if data_parallel is not None else 1,
        }
        if shards is not None:
            remaining = {n: t for n, t in fused.named_weights().items() if not (streamed and n.startswith("layers."))}
            shards.add_all(remaining)
            written = shards.close()
            cfg.size = size_summary(written, cfg, dense_parameters=cfg.size["dense_parameters"], dense_macs=cfg.size["dense_macs_per_token"])
            write_config(tmp, config=cfg, base_config=source.hf_config)
            save_spectra(tmp, eigenvalues)
            if source.tokenizer is not None:
                source.tokenizer.save_pretrained(str(tmp))
            if source.gguf_metadata:
                (tmp / GGUF_METADATA_NAME).write_text(json.dumps(source.gguf_metadata))
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    params = cfg.size.get("parameters", 0)
    return SliceSummary(cfg, cfg.size["dense_parameters"], params, seconds, peak, Path(out) if writes else None)
