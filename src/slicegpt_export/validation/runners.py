"""Perplexity of a sliced checkpoint (the reference) or of a dense source model."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from slicegpt_export.checkpoint import CONFIG_NAME, SECTION, load_sliced
from slicegpt_export.device import resolve_device
from slicegpt_export.errors import SliceGPTError
from slicegpt_export.sources.models import dense_model, load_source
from slicegpt_export.sources.text import text_windows
from slicegpt_export.sources.tokenizer import load_tokenizer
from slicegpt_export.validation.perplexity import perplexity


def is_sliced_checkpoint(path: Path) -> bool:
    config = Path(path) / CONFIG_NAME
    if not config.is_file():
        return False
    try:
        return SECTION in json.loads(config.read_text())
    except (OSError, json.JSONDecodeError):
        return False


def reference_logits_fn(model: torch.nn.Module, device: torch.device):
    """The logits function of a sliced model or a transformers model (both return `.logits`)."""

    def logits(ids: torch.Tensor) -> torch.Tensor:
        return model(ids.to(device)).logits

    return logits


@torch.no_grad()
def reference_perplexities(
    path: str | Path, *, texts: list[Path], seqlen: int, windows: int | None, batch_size: int, device: str = "auto"
) -> dict[str, float]:
    """Perplexity on each text (keyed by the text as given) of a sliced checkpoint, or of a dense source model run by transformers."""
    dev = resolve_device(device)
    if is_sliced_checkpoint(Path(path)):
        model = load_sliced(path, device=dev)
        tokenizer = load_tokenizer(Path(path))
    else:
        source = load_source(str(path))
        tokenizer = source.tokenizer
        model = dense_model(source).to(dev)
    if tokenizer is None:
        raise SliceGPTError(f"{path} has no tokenizer to read the evaluation text with")
    return {
        str(text): perplexity(reference_logits_fn(model, dev), text_windows(text, tokenizer, seqlen=seqlen, windows=windows),
                              batch_size=batch_size, progress=True)
        for text in texts
    }  # fmt: skip
