"""Calibration mixtures and the built-in sources ``self`` and ``self-chat``.

``--calib`` may be given several times, each ``SOURCE[:WEIGHT]``.  The weight is a trailing
``:<number>``; everything before it is the source (so a file whose name ends in ``:<number>``
has to be given with a weight, e.g. ``data:2:1``).  A source is a local file or folder, a
Hugging Face dataset ``NAME[:CONFIG]``, or a built-in:

* ``self`` -- text the dense model writes from its BOS token at temperature 1;
* ``self-chat`` -- the dense model's answers (sampled at temperature 0.7) to the project's
  chat prompts (the calibration part of :mod:`slicegpt_export.sources.prompts`), each
  conversation formatted with the model's chat template.  The prompts are taken in a seeded
  random order, in batches, until the conversations hold enough tokens; they are then
  concatenated and cut into consecutive windows, so every generated token is used once.

Each source gets ``round(samples * w_i / sum w)`` windows (largest remainders, so they sum
to ``samples``); the i-th source's windows of text are drawn with seed ``seed + i`` (the
built-ins generate with ``seed``); a single source without a weight draws exactly what the
protocol draws (see :func:`calibration_ids`).  Generated text
is cached (:mod:`slicegpt_export.sources.generation`), so a rerun does not pay twice.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from slicegpt_export.converter.calibration import calibration_ids
from slicegpt_export.errors import SliceGPTError
from slicegpt_export.sources.generation import GenerationSettings, generate_cached
from slicegpt_export.sources.prompts import PROMPTS_FILE, calibration_prompts, chat_ids, stop_token

logger = logging.getLogger(__name__)

BUILTIN_SOURCES = ("self", "self-chat")
SELF_TEMPERATURE = 1.0
CHAT_TEMPERATURE = 0.7  # near what a chat deployment samples at; at 1.0 a 135M model drifts into other languages
CHAT_ANSWER_TOKENS = 256  # longest answer generated per prompt
GENERATION_BATCH = 32  # texts generated together (part of the cache key)
MAX_CHAT_ROUNDS = 64  # passes over every prompt, at most


@dataclasses.dataclass(frozen=True)
class CalibrationSpec:
    """One ``--calib`` value: a source and its weight (None when none was given)."""

    source: str
    weight: float | None = None

    def __str__(self) -> str:
        return self.source if self.weight is None else f"{self.source}:{self.weight:g}"


def parse_spec(text: str) -> CalibrationSpec:
    """SOURCE[:WEIGHT], the weight a trailing ':<positive number>'."""
    head, sep, tail = text.rpartition(":")
    if not sep or not head:
        return CalibrationSpec(text)
    try:
        weight = float(tail)
    except ValueError:
        return CalibrationSpec(text)  # a dataset NAME:CONFIG
    if not (math.isfinite(weight) and weight > 0):
        raise SliceGPTError(f"calibration weight must be a positive number, got {tail!r} in --calib {text!r}")
    return CalibrationSpec(head, weight)


def window_counts(samples: int, weights: list[float]) -> list[int]:
    """Windows per source, proportional to the weights, summing to `samples` (largest remainders; ties: earlier source)."""
    total = sum(weights)
    exact = [samples * w / total for w in weights]
    counts = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(weights)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in by_remainder[: samples - sum(counts)]:
        counts[i] += 1
    return counts


@dataclasses.dataclass
class DenseWriter:
    """The dense model as the writer of the built-in sources' text (generation cached on disk)."""

    model: torch.nn.Module  # called like modeling.SlicedModel
    tokenizer: Any
    device: torch.device = torch.device("cpu")
    cache_dir: Path | None = None
    progress: bool = True

    @contextlib.contextmanager
    def on_device(self) -> Iterator[torch.nn.Module]:
        """The model on the generation device for the block, back where it was afterwards."""
        home = next(self.model.parameters()).device
        try:
            yield self.model.to(self.device)
        finally:
            self.model.to(home)

    def from_bos(self, samples: int, seqlen: int, seed: int) -> torch.Tensor:
        """`samples` texts of `seqlen` tokens sampled at temperature 1 from the BOS token (`self`).  (samples, seqlen).

        Batch k of :data:`GENERATION_BATCH` texts samples with seed ``seed * 100003 + k``, so
        a smaller count reuses the cached batches of a larger one.
        """
        bos = getattr(self.tokenizer, "bos_token_id", None)
        start = [bos if bos is not None else 0]
        texts: list[list[int]] = []
        bar = tqdm(total=samples * (seqlen - 1), desc="self: sampling", unit="token", disable=not self.progress)
        with self.on_device() as model:
            for k, first in enumerate(range(0, samples, GENERATION_BATCH)):
                count = min(GENERATION_BATCH, samples - first)
                settings = GenerationSettings(max_new_tokens=seqlen - 1, temperature=SELF_TEMPERATURE, seed=seed * 100003 + k,
                                              batch_size=GENERATION_BATCH)  # fmt: skip
                done = bar.n
                texts += generate_cached(model, [start] * count, settings, cache_dir=self.cache_dir, progress=False, on_step=bar.update)
                bar.update(done + count * (seqlen - 1) - bar.n)  # a cached batch moves the bar at once
        bar.close()
        return torch.tensor([start + t for t in texts], dtype=torch.long)

    def chat_stream(self, min_tokens: int, seed: int) -> tuple[torch.Tensor, dict[str, Any]]:
        """Conversations (chat prompt + the model's answer) until they hold `min_tokens` tokens (`self-chat`).

        The calibration prompts are visited in a random order drawn with `seed` (a new order
        for every further pass), :data:`GENERATION_BATCH` at a time; batch k samples with seed
        ``seed * 100003 + k``.  Returns the (N,) stream of conversations and what was generated.
        """
        prompts = [chat_ids(self.tokenizer, p) for p in calibration_prompts()]
        stop = stop_token(self.tokenizer)
        order_generator = torch.Generator().manual_seed(seed)
        pieces: list[torch.Tensor] = []
        tokens, used, batch = 0, 0, 0
        bar = tqdm(total=min_tokens, desc="self-chat: answering", unit="tok", disable=not self.progress)
        with self.on_device() as model:
            while tokens < min_tokens and used < MAX_CHAT_ROUNDS * len(prompts):
                order = torch.randperm(len(prompts), generator=order_generator).tolist()
                for start in range(0, len(order), GENERATION_BATCH):
                    chosen = [prompts[i] for i in order[start : start + GENERATION_BATCH]]
                    settings = GenerationSettings(max_new_tokens=CHAT_ANSWER_TOKENS, temperature=CHAT_TEMPERATURE, seed=seed * 100003 + batch,
                                                  batch_size=GENERATION_BATCH, stop_token_id=stop, pad_token_id=stop if stop is not None else 0)  # fmt: skip
                    answers = generate_cached(model, chosen, settings, cache_dir=self.cache_dir, progress=False)
                    pieces += [torch.tensor(p + a, dtype=torch.long) for p, a in zip(chosen, answers)]
                    added = sum(len(p) + len(a) for p, a in zip(chosen, answers))
                    tokens, used, batch = tokens + added, used + len(chosen), batch + 1
                    bar.update(min(added, max(0, min_tokens - bar.n)))
                    if tokens >= min_tokens:
                        break
        bar.close()
        record = {
            "conversations": used,
            "prompts_sha256": hashlib.sha256(PROMPTS_FILE.read_bytes()).hexdigest()[:16],
            "tokens": tokens,
            "answer_tokens": CHAT_ANSWER_TOKENS,
            "temperature": CHAT_TEMPERATURE,
        }
        return torch.cat(pieces), record


def source_windows(
    spec: CalibrationSpec, tokenizer: Any, *, samples: int, seqlen: int, seed: int, index: int, writer: DenseWriter,
    bos: int | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """(samples, seqlen) windows of the `index`-th source and a record of how they were made.

    Text windows are drawn with ``seed + index``; the built-ins generate with `seed` itself,
    so every recipe with the same seed shares (a prefix of) the same generated text.
    """
    record: dict[str, Any] = {"source": spec.source, "weight": spec.weight, "windows": samples, "seed": seed}
    if spec.source == "self":
        return writer.from_bos(samples, seqlen, seed), record
    if spec.source == "self-chat":
        stream, generated = writer.chat_stream(samples * seqlen, seed)
        return stream[: samples * seqlen].view(samples, seqlen), {**record, **generated}
    ids, origin = calibration_ids(spec.source, tokenizer, samples=samples, seqlen=seqlen, seed=seed + index,
                                  sample_from_model=writer.from_bos, bos=bos)  # fmt: skip
    return ids, {**record, "source": origin, "seed": seed + index}


def calibration_windows(
    specs: str | list[str] | None, tokenizer: Any, *, samples: int, seqlen: int, seed: int, writer: DenseWriter,
    bos: int | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Calibration windows (samples, seqlen) from one source or a weighted mixture, and the calibration record.

    With `bos` (a model trained to always see it, Gemma) every window of a text source starts with BOS.

    The record's ``source`` is what reproduces the windows when given back as `specs` (a
    string for one plain source, else the list of ``SOURCE[:WEIGHT]``); a mixture or a
    built-in source adds ``sources`` with the windows, seed and generation of each.
    """
    if samples < 1 or seqlen < 2:
        raise SliceGPTError(f"calibration needs at least 1 sample of 2 tokens (got {samples} x {seqlen})")
    texts = [specs] if isinstance(specs, str) else list(specs or [])
    parsed = [parse_spec(t) for t in texts]
    if len(parsed) <= 1 and not any(p.source in BUILTIN_SOURCES for p in parsed):
        source = parsed[0].source if parsed else None  # the protocol's path: exactly today's draw
        ids, origin = calibration_ids(source, tokenizer, samples=samples, seqlen=seqlen, seed=seed, sample_from_model=writer.from_bos,
                                      bos=bos)  # fmt: skip
        return ids, {"source": origin, **({"bos_windows": True} if bos is not None else {})}
    counts = window_counts(samples, [p.weight if p.weight is not None else 1.0 for p in parsed])
    empty = [str(p) for p, n in zip(parsed, counts) if n == 0]
    if empty:
        raise SliceGPTError(f"calibration source {empty[0]} gets no window of {samples}: raise its weight or --calib-samples")
    windows, records = [], []
    for i, (spec, n) in enumerate(zip(parsed, counts)):
        ids, record = source_windows(spec, tokenizer, samples=n, seqlen=seqlen, seed=seed, index=i, writer=writer, bos=bos)
        windows.append(ids)
        records.append(record)
        logger.info("calibration: %d windows from %s", n, record["source"])
    return torch.cat(windows), {"source": [str(p) for p in parsed], "sources": records}
