"""Exporters: each a pure function of a sliced checkpoint (validation is composed on top, in pipeline.py)."""

from __future__ import annotations

import logging
from pathlib import Path

from slicegpt_export.errors import SliceGPTError

logger = logging.getLogger(__name__)
FORMATS = ("onnx", "gguf")
#: --gguf-arch: this tool's `slicegpt` architecture (any checkpoint, patched llama.cpp), the family's own (stock llama.cpp),
#: or auto: the family's own where it holds the checkpoint
GGUF_ARCHS = ("auto", "slicegpt", "stock")


def export_artifact(
    *, format: str, checkpoint: Path, out: Path, precision: str = "fp32", quantize: str | None = None,
    gguf_type: str = "f16", gguf_shortcut_type: str = "auto", gguf_arch: str = "auto", execution_provider: str = "cpu",
    overwrite: bool = False,
) -> Path:  # fmt: skip
    """Export `checkpoint` as `format` into `out`; returns the ONNX folder or the GGUF file.

    `gguf_arch` "stock" writes the family's own llama.cpp architecture (exporters/gguf_stock.py: unrotated checkpoints
    of uniform MLP width; others are refused), "slicegpt" this tool's architecture (docs/gguf-slicegpt.md), "auto" the
    family's own where it holds the checkpoint and no residual-path type is named, else `slicegpt`.
    """
    if gguf_arch not in GGUF_ARCHS:
        raise SliceGPTError(f"unknown GGUF architecture {gguf_arch!r} (choose from {', '.join(GGUF_ARCHS)})")
    if format == "gguf" and gguf_arch == "auto":
        from slicegpt_export.exporters.gguf_stock import fits_stock_architecture

        gguf_arch = "stock" if gguf_shortcut_type == "auto" and fits_stock_architecture(checkpoint) else "slicegpt"
        logger.info("GGUF architecture: %s", "the family's own (stock llama.cpp runs it)" if gguf_arch == "stock" else "slicegpt")
    if format == "onnx":
        from slicegpt_export.exporters.onnx import export_onnx

        return export_onnx(checkpoint=checkpoint, out=out, precision=precision, quantize=quantize, execution_provider=execution_provider,
                           overwrite=overwrite)  # fmt: skip
    if format == "gguf" and gguf_arch == "stock":
        from slicegpt_export.exporters.gguf_stock import export_stock_gguf

        if gguf_shortcut_type != "auto":
            raise SliceGPTError("--gguf-shortcut-type names the slicegpt architecture's residual path: a stock file has none")
        return export_stock_gguf(checkpoint=checkpoint, out=out, gguf_type=gguf_type, overwrite=overwrite)
    if format == "gguf":
        from slicegpt_export.exporters.gguf import export_gguf

        return export_gguf(checkpoint=checkpoint, out=out, gguf_type=gguf_type, shortcut_type=gguf_shortcut_type, overwrite=overwrite)
    raise SliceGPTError(f"unknown export format {format!r} (choose from {', '.join(FORMATS)})")
