"""Calibration data: token windows drawn from local text, a Hugging Face dataset, or the model itself.

Several sources may be mixed (``--calib valid.txt:0.5 --calib self-chat:0.5``): each source
gets a share of the windows in proportion to its weight (see :mod:`.mixture`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from slicegpt_export.errors import SliceGPTError
from slicegpt_export.sources.text import read_hub_dataset, read_local_text, sample_windows, tokenize_text

logger = logging.getLogger(__name__)

DEFAULT_DATASET = "wikitext:wikitext-2-raw-v1"


def calibration_ids(
    source: str | None,
    tokenizer: Any,
    *,
    samples: int,
    seqlen: int,
    seed: int,
    sample_from_model: Callable[[int, int, int], torch.Tensor],
) -> tuple[torch.Tensor, str]:
    """Calibration windows (samples, seqlen) and a description of where they came from.

    `source` is a local file or folder, a dataset name, or None for WikiText-2 from the hub;
    when None and the hub is unreachable, windows are sampled from the model itself (the
    built-in source ``self``).
    """
    if samples < 1 or seqlen < 2:
        raise SliceGPTError(f"calibration needs at least 1 sample of 2 tokens (got {samples} x {seqlen})")
    if source is not None and Path(source).exists():
        ids = tokenize_text(read_local_text(Path(source)), tokenizer)
        return sample_windows(ids, samples=samples, seqlen=seqlen, seed=seed), str(source)
    if source is not None:
        ids = tokenize_text(read_hub_dataset(source), tokenizer)
        return sample_windows(ids, samples=samples, seqlen=seqlen, seed=seed), source
    try:
        ids = tokenize_text(read_hub_dataset(DEFAULT_DATASET), tokenizer)
        return sample_windows(ids, samples=samples, seqlen=seqlen, seed=seed), DEFAULT_DATASET
    except SliceGPTError as exc:
        logger.warning(
            "no calibration text (%s): calibrating on %d x %d tokens sampled from the model itself, "
            "which is slower and usually slices worse than real text; pass --calib FILE",
            exc,
            samples,
            seqlen,
        )
        return sample_from_model(samples, seqlen, seed), "self"
