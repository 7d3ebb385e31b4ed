"""Perplexity on consecutive token windows: exp(mean NLL over every predicted token)."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from slicegpt_export.converter.calibration import read_local_text, tokenize_text
from slicegpt_export.errors import SliceGPTError

LogitsFn = Callable[[torch.Tensor], torch.Tensor]  # (B, T) ids -> (B, T, vocab) logits


def evaluation_windows(ids: torch.Tensor, *, seqlen: int, windows: int | None) -> torch.Tensor:
    """The first `windows` consecutive windows of `seqlen` tokens (all complete ones when None); (n, seqlen)."""
    available = ids.numel() // seqlen
    if available == 0:
        raise SliceGPTError(f"evaluation text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    n = available if windows is None else min(windows, available)
    return ids[: n * seqlen].view(n, seqlen)


def text_windows(path: Path, tokenizer: Any, *, seqlen: int, windows: int | None) -> torch.Tensor:
    return evaluation_windows(tokenize_text(read_local_text(Path(path)), tokenizer), seqlen=seqlen, windows=windows)


@torch.no_grad()
def perplexity(logits_fn: LogitsFn, windows: torch.Tensor, *, batch_size: int = 8, progress: bool = False) -> float:
    """exp(sum NLL / count) over positions 1..T-1 of every window, logits taken in float32."""
    total, count = 0.0, 0
    for batch in tqdm(windows.split(batch_size), desc="perplexity", unit="batch", disable=not progress):
        logits = logits_fn(batch).float()  # (B, T, V)
        nll = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten().to(logits.device), reduction="sum")
        total += nll.item()
        count += batch[:, 1:].numel()
    return math.exp(total / count)
