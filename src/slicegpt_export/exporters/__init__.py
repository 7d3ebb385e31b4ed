"""Exporters: each a pure function of a sliced checkpoint (validation is composed on top, in pipeline.py)."""

from __future__ import annotations

import logging
from pathlib import Path

from slicegpt_export.errors import SliceGPTError

logger = logging.getLogger(__name__)
FORMATS = ("onnx", "gguf")


def export_artifact(
    *, format: str, checkpoint: Path, out: Path, precision: str = "fp32", quantize: str | None = None,
    gguf_type: str = "f16", gguf_shortcut_type: str = "auto", execution_provider: str = "cpu", overwrite: bool = False,
) -> Path:  # fmt: skip
    """Export `checkpoint` as `format` into `out`; returns the ONNX folder or the GGUF file."""
    if format == "onnx":
        from slicegpt_export.exporters.onnx import export_onnx

        return export_onnx(checkpoint=checkpoint, out=out, precision=precision, quantize=quantize, execution_provider=execution_provider,
                           overwrite=overwrite)  # fmt: skip
    if format == "gguf":
        from slicegpt_export.exporters.gguf import export_gguf

        return export_gguf(checkpoint=checkpoint, out=out, gguf_type=gguf_type, shortcut_type=gguf_shortcut_type, overwrite=overwrite)
    raise SliceGPTError(f"unknown export format {format!r} (choose from {', '.join(FORMATS)})")
