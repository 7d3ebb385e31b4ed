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
from slicegpt_export.sources.text import TEXT_SUFFIXES, read_hub_dataset, read_local_text, sample_windows, tokenize_text

logger = logging.getLogger(__name__)

DEFAULT_DATASET = "wikitext:wikitext-2-raw-v1"
#: (windows, tokens per window) when not given: the paper's 128 x 2048 on CUDA; on any other device the README's
#: protocol, 64 x 512, which calibrates SmolLM2-135M in a few minutes on 2 CPU cores (even when sampled from the model)
DEFAULT_SIZE = {"cuda": (128, 2048), "other": (64, 512)}


def calibration_size(samples: int | None, seqlen: int | None, device: torch.device) -> tuple[int, int]:
    """`samples` x `seqlen`, each defaulting (when None) to what fits `device`; a default is logged."""
    default_samples, default_seqlen = DEFAULT_SIZE["cuda" if device.type == "cuda" else "other"]
    if samples is None or seqlen is None:
        samples = default_samples if samples is None else samples
        seqlen = default_seqlen if seqlen is None else seqlen
        logger.info(
            "calibration size: %d windows of %d tokens, the default on %s (CUDA: %d x %d, other devices: %d x %d); "
            "set --calib-samples and --calib-seqlen to choose", samples, seqlen, device.type, *DEFAULT_SIZE["cuda"],
            *DEFAULT_SIZE["other"],
        )  # fmt: skip
    return samples, seqlen


def looks_like_path(value: str) -> bool:
    """Whether a --calib value can only be meant as a file or folder (a dataset is NAME, NAME:CONFIG or OWNER/NAME)."""
    return value.startswith(("/", ".", "~")) or value.endswith(TEXT_SUFFIXES) or value.count("/") > 1 or "\\" in value


def calibration_ids(
    source: str | None,
    tokenizer: Any,
    *,
    samples: int,
    seqlen: int,
    seed: int,
    sample_from_model: Callable[[int, int, int], torch.Tensor],
    bos: int | None = None,
) -> tuple[torch.Tensor, str]:
    """Calibration windows (samples, seqlen) and a description of where they came from.

    `source` is a local file or folder, a dataset name, or None for WikiText-2 from the hub;
    when None and the hub is unreachable, windows are sampled from the model itself (the
    built-in source ``self``).  A value that can only be a path (see looks_like_path) and
    does not exist is refused.  With `bos` (a model trained to always see it) every text
    window starts with BOS.
    """
    tokenize = lambda text: tokenize_text(text, tokenizer, special_tokens=bos is None)  # noqa: E731
    draw = lambda ids: sample_windows(ids, samples=samples, seqlen=seqlen, seed=seed, bos=bos)  # noqa: E731
    if samples < 1 or seqlen < 2:
        raise SliceGPTError(f"calibration needs at least 1 sample of 2 tokens (got {samples} x {seqlen})")
    if source is not None and Path(source).expanduser().exists():
        return draw(tokenize(read_local_text(Path(source).expanduser()))), str(source)
    if source is not None and looks_like_path(source):
        raise SliceGPTError(f"calibration text {source}: no such file or folder")
    if source is not None:
        try:
            text = read_hub_dataset(source)
        except SliceGPTError as exc:
            if "/" not in source:
                raise
            raise SliceGPTError(f"calibration text {source}: no such file or folder, nor a usable dataset ({exc})") from exc
        return draw(tokenize(text)), source
    try:
        return draw(tokenize(read_hub_dataset(DEFAULT_DATASET))), DEFAULT_DATASET
    except SliceGPTError as exc:
        logger.warning(
            "no calibration text (%s): calibrating on %d x %d tokens sampled from the model itself, "
            "which is slower and usually slices worse than real text; pass --calib FILE",
            exc,
            samples,
            seqlen,
        )
        return sample_from_model(samples, seqlen, seed), "self"
