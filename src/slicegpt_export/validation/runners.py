"""Runners: logits and perplexity from each kind of artifact (the PyTorch reference for now)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from slicegpt_export.checkpoint import CONFIG_NAME, SECTION
from slicegpt_export.converter.loading import load_source, load_tokenizer
from slicegpt_export.errors import SliceGPTError
from slicegpt_export.validation.loader import load_sliced
from slicegpt_export.validation.perplexity import perplexity, text_windows
from slicegpt_export.validation.reference import SlicedModel


def is_sliced_checkpoint(path: Path) -> bool:
    config = Path(path) / CONFIG_NAME
    if not config.is_file():
        return False
    try:
        return SECTION in json.loads(config.read_text())
    except (OSError, json.JSONDecodeError):
        return False


def reference_logits_fn(model: SlicedModel, device: torch.device):
    def logits(ids: torch.Tensor) -> torch.Tensor:
        return model(ids.to(device)).logits

    return logits


@torch.no_grad()
def reference_perplexity(
    path: str | Path, *, text: Path, seqlen: int, windows: int | None, batch_size: int, device: str = "auto"
) -> float:
    """Perplexity of a sliced checkpoint, or of a dense source model run through its fused (unsliced) form."""
    from slicegpt_export.converter.convert import fused_model, resolve_device

    dev = resolve_device(device)
    if is_sliced_checkpoint(Path(path)):
        model = load_sliced(path, device=dev)
        tokenizer = load_tokenizer(Path(path))
    else:
        source = load_source(str(path))
        tokenizer = source.tokenizer
        model = fused_model(source)[0].to(dev)
    if tokenizer is None:
        raise SliceGPTError(f"{path} has no tokenizer to read the evaluation text with")
    ids = text_windows(text, tokenizer, seqlen=seqlen, windows=windows)
    return perplexity(reference_logits_fn(model, dev), ids, batch_size=batch_size, progress=True)
