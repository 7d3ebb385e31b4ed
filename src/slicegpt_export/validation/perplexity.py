"""Perplexity on consecutive token windows: exp(mean NLL over every predicted token)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

LogitsFn = Callable[[torch.Tensor], torch.Tensor]  # (B, T) ids -> (B, T, vocab) logits


def reference_logits_fn(model: torch.nn.Module, device: torch.device) -> LogitsFn:
    """The logits function of a sliced model or a transformers model (both return `.logits`) on `device`."""

    def logits(ids: torch.Tensor) -> torch.Tensor:
        return model(ids.to(device)).logits

    return logits


@torch.no_grad()
def perplexity(
    logits_fn: LogitsFn, windows: torch.Tensor, *, batch_size: int = 8, progress: bool = False, label: str | None = None
) -> float:
    """exp(sum NLL / count) over positions 1..T-1 of every window, logits taken in float32.

    The progress bar reads "perplexity: <label>" (the artifact being measured) when a label is given.
    """
    desc = f"perplexity: {label}" if label else "perplexity"
    batches = tqdm(windows.split(batch_size), desc=desc, unit="batch", disable=not progress)
    return perplexity_of((batch, logits_fn(batch)) for batch in batches)


@torch.no_grad()
def perplexity_of(batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """exp(sum NLL / count) over positions 1..T-1 of (ids (B, T), logits (B, T, V)) batches, logits taken in float32."""
    total, count = 0.0, 0
    for batch, logits in batches:
        logits = logits.float()  # (B, T, V)
        nll = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten().to(logits.device), reduction="sum")
        total += nll.item()
        count += batch[:, 1:].numel()
    return math.exp(total / count)
