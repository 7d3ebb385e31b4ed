"""Device selection, passed explicitly to whatever computes (no global device)."""

from __future__ import annotations

import torch

from slicegpt_export.errors import SliceGPTError


def resolve_device(device: str | torch.device) -> torch.device:
    """'auto' -> the first CUDA device when present, else the CPU; otherwise the named device, checked."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise SliceGPTError(f"unknown device {device!r} (use auto, cpu or cuda[:N])") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SliceGPTError(f"device {device!r} requested but CUDA is not available")
    return dev
