"""Exporters: each a pure function of a sliced checkpoint, followed by validation against the reference."""

from __future__ import annotations

import logging
from pathlib import Path

from slicegpt_export.errors import SliceGPTError

logger = logging.getLogger(__name__)
FORMATS = ("onnx", "gguf")


def export_artifact(
    *, format: str, checkpoint: Path, out: Path, precision: str = "fp32", quantize: str | None = None,
    gguf_type: str = "f16", gguf_shortcut_type: str = "auto", validate: bool = True, overwrite: bool = False,
) -> Path:  # fmt: skip
    """Export `checkpoint` as `format` into `out`, then (by default) validate it against the PyTorch reference."""
    if format == "onnx":
        from slicegpt_export.exporters.onnx import export_onnx
        from slicegpt_export.validation.onnx_runner import validate_onnx

        export_onnx(checkpoint=checkpoint, out=out, precision=precision, quantize=quantize, overwrite=overwrite)
        if validate:
            validate_onnx(out, checkpoint)
        return out
    if format == "gguf":
        from slicegpt_export.exporters.gguf import export_gguf
        from slicegpt_export.validation.gguf_runner import validate_gguf

        path = export_gguf(checkpoint=checkpoint, out=out, gguf_type=gguf_type, shortcut_type=gguf_shortcut_type, overwrite=overwrite)
        if validate:
            validate_gguf(path, checkpoint)
        return path
    raise SliceGPTError(f"unknown export format {format!r} (choose from {', '.join(FORMATS)})")
