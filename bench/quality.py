"""Quality beyond the calibration text: calibration recipes, with and without recovery, on SmolLM2-135M-Instruct.

    python bench/quality.py --out bench/results                     # every row (hours on a 2-core CPU)
    python bench/quality.py --recipes mixed --recover 0,150          # some rows

For each slicing setting (``--slicing``; paper-faithful sparsity 0.25, and the stored-parameter
budget of issue 12 when it lands) and each calibration recipe (WikiText-2 ``valid.txt``;
``self-chat``; the two mixed half and half), with and without ``--recover`` steps, records:
perplexity on WikiText-2 ``test.txt`` and on the out-of-domain built-in text ``python-stdlib``
(first 64 windows of 512 tokens each), fidelity to the dense model on its answers to the
held-out chat prompts (KL(dense || sliced) and top-1 agreement), the greedy answer to
"The capital of France is", stored parameters against dense, and the time of each stage
(generation of calibration text, slicing, recovery; wall and CPU seconds, since the machine
may be shared).  Checkpoints are cached in bench/work/quality, generated text in
bench/work/cache; writes ``quality.json`` and ``quality.md`` into --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import DATA, REPO, WORK  # noqa: E402

QUALITY_WORK = WORK / "quality"
CACHE = WORK / "cache"
CALIB = dict(calib_samples=64, calib_seqlen=512, seed=42)  # the README's measurement protocol: its calibration size
RECIPES: dict[str, str | list[str]] = {
    "wiki": str(DATA / "valid.txt"),
    "self-chat": "self-chat",
    "mixed": [f"{DATA / 'valid.txt'}:0.5", "self-chat:0.5"],
}
#: slicing settings: name -> slice_checkpoint options (the paper's sparsity; a stored-parameter budget)
SLICINGS: dict[str, dict[str, Any]] = {
    "sparsity-0.25": {"sparsity": 0.25},
    "params-0.75": {"target_params": 0.75},
}
EVAL_WINDOWS = 64
logger = logging.getLogger("bench.quality")


@dataclasses.dataclass
class Clock:
    """Wall and process CPU seconds of a block."""

    wall: float = 0.0
    cpu: float = 0.0

    def __enter__(self) -> Clock:
        self._start = (time.perf_counter(), time.process_time())
        return self

    def __exit__(self, *exc: Any) -> None:
        self.wall = time.perf_counter() - self._start[0]
        self.cpu = time.process_time() - self._start[1]

    def to_dict(self) -> dict[str, float]:
        return {"wall_s": round(self.wall, 1), "cpu_s": round(self.cpu, 1)}


def evaluate(model: torch.nn.Module, dense: torch.nn.Module, tokenizer: Any, *, windows: int) -> dict[str, Any]:
    """Perplexities, fidelity and the greedy answer to the France prompt of `model` (a sliced or dense reference)."""
    from slicegpt_export.sources.text import text_windows
    from slicegpt_export.validation.fidelity import fidelity, greedy_answers
    from slicegpt_export.validation.perplexity import perplexity

    out: dict[str, Any] = {}
    with torch.no_grad():
        for name, text in (("test.txt", DATA / "test.txt"), ("python-stdlib", Path("python-stdlib"))):
            ids = text_windows(text, tokenizer, seqlen=512, windows=windows)
            out[f"ppl {name}"] = perplexity(lambda x: model(x).logits, ids)
    out["fidelity"] = fidelity(dense, model, tokenizer, cache_dir=CACHE, progress=False).to_dict()
    answers = greedy_answers(dense, model, tokenizer)
    out["answers"] = answers
    out["france"] = answers[0]["sliced"]
    return out


def dense_reference() -> tuple[torch.nn.Module, Any, int]:
    """The dense source (transformers), its tokenizer and its stored parameter count."""
    from slicegpt_export.checkpoint import parameter_count
    from slicegpt_export.sources.models import dense_model, load_source
    from slicegpt_export.validation.fidelity import TransformersLM

    source = load_source(None)
    params = parameter_count(source.tensors)
    tokenizer = source.tokenizer
    return TransformersLM(dense_model(source)), tokenizer, params


def generate_calibration(recipe: str) -> dict[str, float]:
    """Populate the generation cache for a recipe's built-in sources; returns the time it took (0 when cached)."""
    from slicegpt_export.converter.convert import fused_model
    from slicegpt_export.converter.mixture import DenseWriter, calibration_windows
    from slicegpt_export.sources.models import load_source

    source = load_source(None)
    fused = fused_model(source)[0]
    with Clock() as clock:
        calibration_windows(RECIPES[recipe], source.tokenizer, samples=CALIB["calib_samples"], seqlen=CALIB["calib_seqlen"],
                            seed=CALIB["seed"], writer=DenseWriter(fused, source.tokenizer, cache_dir=CACHE))  # fmt: skip
    return clock.to_dict()


def times_path(checkpoint: Path) -> Path:
    return checkpoint.parent / f"{checkpoint.name}.times.json"


def sliced(slicing: str, recipe: str) -> tuple[Path, dict[str, Any]]:
    """The sliced checkpoint of a setting and recipe (cached) and the time of its stages."""
    from slicegpt_export.converter.convert import slice_checkpoint

    out = QUALITY_WORK / f"{slicing}-{recipe}"
    times_file = times_path(out)
    if (out / "config.json").is_file() and times_file.is_file():
        return out, json.loads(times_file.read_text())
    times = {"generation": generate_calibration(recipe)}
    with Clock() as clock:
        slice_checkpoint(model=None, out=out, calib=RECIPES[recipe], **CALIB, **SLICINGS[slicing], device="cpu", progress=False,
                         overwrite=True)  # fmt: skip
    times["slicing"] = clock.to_dict()
    times_file.write_text(json.dumps(times))
    return out, times


def recovered(checkpoint: Path, steps: int, options: dict[str, Any], tag: str) -> tuple[Path, dict[str, Any]]:
    """`checkpoint` after `steps` of recovery (cached), the recovery time and its record."""
    from slicegpt_export.checkpoint import read_config
    from slicegpt_export.converter.recovery import recover_checkpoint

    out = checkpoint.with_name(f"{checkpoint.name}-recover{steps}{tag}")
    if not (out / "config.json").is_file():
        with Clock() as clock:
            recover_checkpoint(checkpoint=checkpoint, out=out, steps=steps, device="cpu", overwrite=True, progress=True, **options)
        times_path(out).write_text(json.dumps({"recovery": clock.to_dict()}))
    times = json.loads(times_path(out).read_text())
    return out, {**times, "record": read_config(out)[0].recovery}


def run(slicings: list[str], recipes: list[str], recover_steps: list[int], options: dict[str, Any], tag: str, windows: int) -> dict:
    from slicegpt_export.checkpoint import load_sliced, parameter_count, read_tensors

    dense, tokenizer, dense_params = dense_reference()
    dense_file = QUALITY_WORK / f"dense-{windows}.json"
    if not dense_file.is_file():
        with Clock() as clock:
            base = evaluate(dense, dense, tokenizer, windows=windows)
        QUALITY_WORK.mkdir(parents=True, exist_ok=True)
        dense_file.write_text(json.dumps({"slicing": "dense", "recipe": "-", "recover": 0, "params": dense_params, **base,
                                          "times": {"evaluation": clock.to_dict()}}))  # fmt: skip
    rows = [json.loads(dense_file.read_text())]
    print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    for slicing in slicings:
        for recipe in recipes:
            checkpoint, times = sliced(slicing, recipe)
            for steps in recover_steps:
                path, extra = (checkpoint, {}) if steps == 0 else recovered(checkpoint, steps, options, tag)
                row_times = {**times, **{k: v for k, v in extra.items() if k != "record"}}
                with Clock() as clock:
                    metrics = evaluate(load_sliced(path), dense, tokenizer, windows=windows)
                row_times["evaluation"] = clock.to_dict()
                rows.append({"slicing": slicing, "recipe": recipe, "recover": steps, "params": parameter_count(read_tensors(path)),
                             **metrics, "times": row_times, "recovery": extra.get("record")})  # fmt: skip
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return {"dense_params": dense_params, "threads": torch.get_num_threads(), "load_average": os.getloadavg(), "rows": rows}


def markdown(result: dict) -> str:
    dense = result["rows"][0]
    lines = [
        "| slicing | calibration | recovery steps | ppl test.txt | ppl python-stdlib (x dense) | KL (nats) | top-1 | "
        "'The capital of France is' | parameters vs dense | generation | slicing | recovery |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def stage(r: dict, name: str) -> str:
        t = r["times"].get(name)
        return "-" if not t else f"{t['wall_s']:.0f} s ({t['cpu_s']:.0f} cpu)"

    for r in result["rows"]:
        ratio = r["ppl python-stdlib"] / dense["ppl python-stdlib"]
        france = r["france"].strip().replace("|", "\\|").replace("\n", " ")[:60]
        lines.append(
            f"| {r['slicing']} | {r['recipe']} | {r['recover'] or '-'} | {r['ppl test.txt']:.2f} | {r['ppl python-stdlib']:.2f} ({ratio:.2f}x) "
            f"| {r['fidelity']['kl_divergence']:.3f} | {r['fidelity']['top1_agreement']:.1%} | {france} "
            f"| {r['params'] / result['dense_params'] - 1:+.1%} | {stage(r, 'generation')} | {stage(r, 'slicing')} | {stage(r, 'recovery')} |"
        )
    lines += [
        "",
        f"Perplexity: first {EVAL_WINDOWS} windows of 512 tokens; fidelity: the dense model's greedy answers to the "
        f"{dense['fidelity']['prompts']} held-out chat prompts ({dense['fidelity']['tokens']:,} tokens). Times: wall seconds "
        f"(process CPU seconds) with {result['threads']} thread(s); load average {result['load_average'][0]:.1f} at the end "
        "(the machine was shared). Generation is paid once and cached.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slicing", default=",".join(SLICINGS), help=f"comma-separated, from {', '.join(SLICINGS)}")
    parser.add_argument("--recipes", default=",".join(RECIPES))
    parser.add_argument("--recover", default="0,150", help="comma-separated recovery steps (0: none)")
    parser.add_argument("--recover-options", default="{}", help="JSON of recover_checkpoint options (e.g. loss, rank, lr)")
    parser.add_argument("--tag", default="", help="suffix of recovered checkpoints with non-default options")
    parser.add_argument("--windows", type=int, default=EVAL_WINDOWS)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--name", default="quality")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    result = run(args.slicing.split(","), args.recipes.split(","), [int(s) for s in args.recover.split(",")],
                 json.loads(args.recover_options), args.tag, args.windows)  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / f"{args.name}.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
