"""Shared set-up for the benchmarks: the protocol's SmolLM2 checkpoints, built once and cached in bench/work/."""

from __future__ import annotations

import json
import logging
import statistics
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "wikitext-2"
WORK = REPO / "bench" / "work"  # git-ignored cache of checkpoints and exports
logger = logging.getLogger("bench")


def protocol_checkpoint(tag: str, **options) -> Path:
    """SmolLM2-135M-Instruct sliced with `options` (slice_checkpoint's) on the protocol's calibration, cached as `tag`."""
    from slicegpt_export.converter.convert import slice_checkpoint

    out = WORK / f"smollm2-{tag}"
    if not (out / "config.json").is_file():
        slice_checkpoint(model=None, out=out, calib=str(DATA / "valid.txt"), calib_samples=64, calib_seqlen=512, seed=42,
                         device="cpu", progress=False, overwrite=True, **options)  # fmt: skip
    return out


def sliced_checkpoint(sparsity: float, *, rotate: bool = True, round_to: int = 8) -> Path:
    """SmolLM2-135M-Instruct sliced at `sparsity` on the README's measurement protocol (cached); rotate=False: fused only."""
    suffix = "" if round_to == 8 else f"-r{round_to}"
    tag = (f"{sparsity:g}" if rotate else "dense") + suffix
    return protocol_checkpoint(tag, sparsity=sparsity, rotate=rotate, round_to=round_to)


def hf_folder() -> Path:
    """The embedded SmolLM2 GGUF written out as a Hugging Face folder (safetensors + tokenizer), for third-party tools."""
    import transformers

    from slicegpt_export.sources.models import load_source

    out = WORK / "smollm2-hf"
    if (out / "config.json").is_file():
        return out
    source = load_source(None)
    config = transformers.LlamaConfig(**{k: v for k, v in source.hf_config.items() if k not in ("transformers_version",)})
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    model.load_state_dict(source.tensors, strict=False, assign=True)
    model.tie_weights()
    model.save_pretrained(out)
    source.tokenizer.save_pretrained(out)
    return out


def test_windows(tokenizer) -> torch.Tensor:
    from slicegpt_export.sources.text import text_windows

    return text_windows(DATA / "test.txt", tokenizer, seqlen=512, windows=64)


def spread(ratios: list[float]) -> dict[str, float]:
    """Median, smallest and largest of per-round speed-ups."""
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}


def write_results(out: Path, name: str, data: object, table: str) -> None:
    """`out`/<name>.json (`data`) and `out`/<name>.md (`table`), each written to a temporary name and renamed into
    place, then the table printed."""
    from slicegpt_export.atomic import atomic_file

    out.mkdir(parents=True, exist_ok=True)
    for path, text in ((out / f"{name}.json", json.dumps(data, indent=2) + "\n"), (out / f"{name}.md", table)):
        with atomic_file(path) as tmp:
            tmp.write_text(text)
    print(table)
