"""Text a model writes itself: batched generation with left padding, cached on disk.

Used for the built-in calibration sources ``self`` and ``self-chat`` (the converter, with the
fused dense model) and for the fidelity measurement (validation, with the dense transformers
model).  Generating a few hundred answers takes minutes on a CPU, so every result is stored
under ``$SLICEGPT_CACHE/generated`` (default ``~/.cache/slicegpt-export``) in a safetensors
file named by a hash of everything that determines it: the model (a fingerprint of its
weights), the prompt tokens and the generation settings.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from slicegpt_export.atomic import atomic_file
from slicegpt_export.modeling import generate

logger = logging.getLogger(__name__)

CACHE_ENV = "SLICEGPT_CACHE"
FINGERPRINT_SAMPLES = 4096  # values read from each tensor for the model fingerprint


def cache_root() -> Path:
    """$SLICEGPT_CACHE, else ~/.cache/slicegpt-export (where scripts/build_llama_cpp.sh keeps its wheels too)."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "slicegpt-export")


@dataclasses.dataclass(frozen=True)
class GenerationSettings:
    """How continuations are drawn; every field is part of the cache key."""

    max_new_tokens: int
    temperature: float  # 0: greedy
    seed: int
    batch_size: int = 16
    stop_token_id: int | None = None  # generation of a row ends with this token (kept in the answer)
    pad_token_id: int = 0  # left padding; masked out, so its value does not matter


def model_fingerprint(model: torch.nn.Module) -> str:
    """A hash of every parameter's and buffer's name, shape, dtype and an evenly strided sample of its values."""
    digest = hashlib.sha256()
    for name, t in itertools.chain(model.named_parameters(), model.named_buffers()):
        flat = t.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // FINGERPRINT_SAMPLES)][:FINGERPRINT_SAMPLES]
        digest.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        digest.update(sample.double().cpu().numpy().tobytes())
    return digest.hexdigest()


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def cache_key(model: torch.nn.Module, prompts: list[list[int]], settings: GenerationSettings) -> str:
    """sha256 of the model fingerprint, its device kind, the prompt tokens and the settings."""
    record = {
        "model": model_fingerprint(model),
        "device": model_device(model).type,  # sampling draws differ between CPU and CUDA
        "prompts": hashlib.sha256(json.dumps(prompts).encode()).hexdigest(),
        "settings": dataclasses.asdict(settings),
    }
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def left_padded(prompts: list[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of different lengths as (B, T) ids and attention mask, padded on the left."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[row, width - len(p) :] = 1
    return ids, mask


def cut_at_stop(tokens: list[int], stop_token_id: int | None) -> list[int]:
    """The tokens up to and including the first stop token."""
    if stop_token_id is not None and stop_token_id in tokens:
        return tokens[: tokens.index(stop_token_id) + 1]
    return tokens


def generate_uncached(
    model: torch.nn.Module, prompts: list[list[int]], settings: GenerationSettings, *, desc: str, progress: bool,
    on_step: Callable[[int], None] | None = None,
) -> list[list[int]]:  # fmt: skip
    """The new tokens the model writes after every prompt, in batches of prompts of similar length.

    `on_step(n)` is called after every decoding step of a batch of n prompts (a token-level progress bar).
    """
    device = model_device(model)
    generator = torch.Generator(device=device).manual_seed(settings.seed)
    order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), i))  # less padding per batch
    answers: list[list[int]] = [[] for _ in prompts]
    bar = tqdm(total=len(prompts), desc=desc, unit="text", disable=not progress)
    for start in range(0, len(order), settings.batch_size):
        rows = order[start : start + settings.batch_size]
        ids, mask = left_padded([prompts[i] for i in rows], settings.pad_token_id)
        out = generate(model, ids.to(device), attention_mask=mask.to(device), max_new_tokens=settings.max_new_tokens,
                       temperature=settings.temperature, generator=generator, stop_token_id=settings.stop_token_id,
                       on_step=None if on_step is None else lambda n=len(rows): on_step(n))  # fmt: skip
        for row, i in enumerate(rows):
            answers[i] = cut_at_stop(out[row, ids.shape[1] :].tolist(), settings.stop_token_id)
        bar.update(len(rows))
        bar.set_postfix(tokens=sum(len(a) for a in answers))
    bar.close()
    return answers


def generate_cached(
    model: torch.nn.Module,
    prompts: list[list[int]],
    settings: GenerationSettings,
    *,
    cache_dir: Path | None = None,
    desc: str = "generating",
    progress: bool = True,
    on_step: Callable[[int], None] | None = None,
) -> list[list[int]]:
    """What `model` writes after each prompt (new tokens only), read from the cache when it was generated before.

    `model` is called like :class:`slicegpt_export.modeling.SlicedModel` (transformers causal
    LMs qualify: positions shift with the left padding, which rotary attention does not see).
    """
    if not prompts:
        return []
    path = (cache_dir or cache_root()) / "generated" / f"{cache_key(model, prompts, settings)}.safetensors"
    if path.is_file():
        try:
            stored = load_file(str(path))
            logger.info("%s: %d texts read from the cache %s", desc, len(prompts), path)
            return [t.tolist() for t in stored["tokens"].split(stored["lengths"].tolist())]
        except (SafetensorError, OSError, KeyError, RuntimeError) as exc:
            logger.warning("ignoring the unreadable generation cache %s (%s)", path, exc)
    answers = generate_uncached(model, prompts, settings, desc=desc, progress=progress, on_step=on_step)
    flat = torch.tensor([t for a in answers for t in a], dtype=torch.int64)
    with atomic_file(path) as tmp:
        save_file({"tokens": flat, "lengths": torch.tensor([len(a) for a in answers], dtype=torch.int64)}, str(tmp))
    return answers
