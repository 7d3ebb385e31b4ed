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
from slicegpt_export.checkpoint import GGUF_METADATA_NAME, SlicedConfig, build_checked, parameter_count, save_checkpoint
from slicegpt_export.converter.adapters import FamilyAdapter, adapter_for
from slicegpt_export.converter.fusion import fuse_norms
from slicegpt_export.converter.mixture import DenseWriter, calibration_windows
from slicegpt_export.converter.slicing import CalibrationBatch, rotate_and_slice, sliced_width
from slicegpt_export.device import resolve_device
from slicegpt_export.errors import SliceGPTError
from slicegpt_export.modeling import SlicedModel
from slicegpt_export.sources.models import SourceModel, load_source

logger = logging.getLogger(__name__)


def check_sparsity(sparsity: float) -> None:
    if not 0.0 <= sparsity < 1.0:
        raise SliceGPTError(f"sparsity must be in [0, 1), got {sparsity}")


def canonical_tensors(adapter: FamilyAdapter, source: SourceModel, num_layers: int) -> dict[str, torch.Tensor]:
    """Source tensors renamed to the canonical names; a tied head becomes its own copy of the embedding."""
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
    if "lm_head.weight" not in tensors:
        tensors["lm_head.weight"] = tensors["embed_tokens.weight"].clone()  # untie before fusion
    return tensors


def fused_model(source: SourceModel) -> tuple[SlicedModel, SlicedConfig, FamilyAdapter]:
    """The source as a reference model with every norm folded away (dense widths, no shortcuts).

    The source's tensors move into the model (``source.tensors`` is emptied), so host memory
    holds one copy of the weights.
    """
    adapter = adapter_for(source.hf_config)
    cfg = adapter.dense_config()
    tensors = canonical_tensors(adapter, source, cfg.num_layers)
    norm_names = [n for n in tensors if "norm" in n.split(".")[-2]]
    norms = {n: tensors.pop(n) for n in norm_names}
    model = build_checked(cfg, tensors)
    fuse_norms(model, norms, norm_kind=adapter.norm_kind)
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


def slice_fused(
    model: SlicedModel,
    cfg: SlicedConfig,
    calib: torch.Tensor,
    *,
    sparsity: float,
    round_to: int = 8,
    slice_head: bool = False,
    device: torch.device = torch.device("cpu"),
    batch_size: int = 8,
    progress: bool = False,
    rotate: bool = True,
) -> dict[str, list[float]]:
    """Rotate and slice a fused model in place on the calibration windows `calib` (n, T).

    Records the widths and sparsity in `cfg`; returns the eigenvalues of every PCA.  With
    rotate=False (sparsity 0 only) the fused model is kept as it is: no PCA, no shortcuts,
    the plain dense model in the sliced-checkpoint format.
    """
    check_sparsity(sparsity)
    if not rotate:
        if sparsity != 0 or slice_head:
            raise SliceGPTError("--no-rotate keeps the dense model: it needs --sparsity 0 and no --slice-head")
        cfg.sparsity, cfg.round_to = 0.0, round_to
        return {}
    D = cfg.hidden_size
    width = sliced_width(D, sparsity, round_to)
    bar = tqdm(total=cfg.num_layers, desc="slicing layers", unit="layer", disable=not progress)
    result = rotate_and_slice(
        model,
        calibration_batches(calib, batch_size, device),
        width=width,
        head_width=width if slice_head else D,
        device=device,
        on_layer=lambda i: bar.update(1),
    )
    bar.close()
    cfg.embedding_width, cfg.layers, cfg.head_in = result.embedding_width, result.layers, result.head_in
    cfg.sparsity, cfg.round_to = sparsity, round_to
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
    sparsity: float,
    round_to: int = 8,
    slice_head: bool = False,
    calib: str | list[str] | None = None,
    calib_samples: int = 128,
    calib_seqlen: int = 2048,
    calib_batch_size: int = 8,
    seed: int = 42,
    device: str = "auto",
    dtype: torch.dtype = torch.float32,
    overwrite: bool = False,
    progress: bool = True,
    rotate: bool = True,
) -> SliceSummary:
    """Slice `model` and write a sliced checkpoint folder to `out` atomically.

    `calib` is one source or a list of ``SOURCE[:WEIGHT]`` mixed by weight (see converter.mixture);
    the built-in sources ``self`` and ``self-chat`` are written by the fused dense model (cached).
    """
    check_sparsity(sparsity)
    if round_to < 1:
        raise SliceGPTError(f"--round-to must be a positive integer, got {round_to}")
    dev = resolve_device(device)
    start = time.perf_counter()
    with atomic_directory(Path(out), overwrite=overwrite) as tmp:
        source = load_source(model, dtype=dtype)
        params_before = parameter_count(source.tensors)
        fused, cfg, _ = fused_model(source)
        ids, calib_record = calibration_windows(
            calib,
            source.tokenizer,
            samples=calib_samples,
            seqlen=min(calib_seqlen, cfg.max_position_embeddings),
            seed=seed,
            writer=DenseWriter(fused, source.tokenizer, device=dev, progress=progress),
        )
        logger.info("calibration: %d x %d tokens from %s", ids.shape[0], ids.shape[1], calib_record["source"])
        eigenvalues = slice_fused(
            fused,
            cfg,
            ids,
            sparsity=sparsity,
            round_to=round_to,
            slice_head=slice_head,
            device=dev,
            batch_size=calib_batch_size,
            progress=progress,
            rotate=rotate,
        )
        cfg.source_model, cfg.dense_parameters = source.origin, params_before
        cfg.calibration = {
            **calib_record,
            "samples": int(ids.shape[0]),
            "seqlen": int(ids.shape[1]),
            "seed": seed,
            "batch_size": calib_batch_size,
            "dtype": str(dtype).removeprefix("torch."),
        }
        tensors = fused.named_weights()
        save_checkpoint(tmp, tensors=tensors, config=cfg, base_config=source.hf_config)
        torch.save({k: torch.tensor(v) for k, v in eigenvalues.items()}, tmp / "eigenvalues.pt")
        if source.tokenizer is not None:
            source.tokenizer.save_pretrained(str(tmp))
        if source.gguf_metadata:
            (tmp / GGUF_METADATA_NAME).write_text(json.dumps(source.gguf_metadata))
        params_after = parameter_count(tensors)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return SliceSummary(cfg, params_before, params_after, seconds, peak, Path(out))
