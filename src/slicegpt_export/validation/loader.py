"""Loading a sliced checkpoint folder as the PyTorch reference model."""

from __future__ import annotations

from pathlib import Path

import torch

from slicegpt_export.checkpoint import SlicedConfig, read_config, read_tensors
from slicegpt_export.errors import SliceGPTError
from slicegpt_export.validation.reference import ModelDefinitionError, SlicedModel, build_model


def build_checked(cfg: SlicedConfig, tensors: dict[str, torch.Tensor]) -> SlicedModel:
    """build_model, with a definition problem reported as a SliceGPTError."""
    try:
        return build_model(cfg, tensors)
    except ModelDefinitionError as exc:
        raise SliceGPTError(str(exc)) from exc


def load_sliced(path: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> SlicedModel:
    """Load a sliced checkpoint folder as the project's PyTorch reference model."""
    cfg, _ = read_config(Path(path))
    tensors = read_tensors(Path(path), dtype=dtype)
    return build_checked(cfg, tensors).to(device)
