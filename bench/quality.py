"""Quality beyond the calibration text: calibration recipes, with and without recovery, on SmolLM2-135M-Instruct.

    python bench/quality.py --out bench/results                     # every row (hours on a 2-core CPU)
    python bench/quality.py --recipes mixed --recover 0,150          # some rows
    python bench/quality.py --device cuda --recipes mixed --recover 0,150,1000 --name quality-cuda   # on a GPU
    python bench/quality.py --checkpoints bench/work/smollm2-0.25,bench/work/smollm2-0.25-rec150   # checkpoints built elsewhere

For each slicing setting (``--slicing``; paper-faithful sparsity 0.25, and the stored-parameter
budget of issue 12 when it lands) and each calibration recipe (WikiText-2 ``valid.txt``;
``self-chat``; the two mixed half and half), with and without ``--recover`` steps, records:
perplexity on WikiText-2 ``test.txt`` and on the out-of-domain built-in text ``python-stdlib``
(first 64 windows of 512 tokens each), fidelity to the dense model on its answers to the
held-out chat prompts (KL(dense || sliced) and top-1 agreement), the greedy answer to
"The capital of France is", stored parameters against dense, and the time of each stage
(generation of calibration text, slicing, recovery; wall and CPU seconds, since the machine
may be shared).  Checkpoints are cached in bench/work/quality, generated text in
bench/work/cache; writes ``quality.json`` and ``quality.md`` into --out.  With ``--device cuda``
slicing, recovery and evaluation run on the GPU (checkpoints cached apart from the CPU ones,
since generated calibration text and PCA differ between devices).
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

from slicegpt_export.sources.generation import CACHE_ENV

sys.path.insert(0, str(Path(__file__).parent))
from common import DATA, REPO, WORK, write_results  # noqa: E402

QUALITY_WORK = WORK / "quality"
CACHE = WORK / "cache"
CALIB = dict(calib_samples=64, calib_seqlen=512, seed=42)  # the README's measurement protocol: its calibration size
RECIPES: dict[str, str | list[str]] = {
    "wiki": str(DATA / "valid.txt"),
    "self-chat": "self-chat",
    "mixed": [f"{DATA / 'valid.txt'}:0.5", "self-chat:0.5"],
    "chat-heavy": [f"{DATA / 'valid.txt'}:0.25", "self-chat:0.75"],
}
#: slicing settings: name -> slice_checkpoint options (the paper's sparsity; a stored-parameter budget)
SLICINGS: dict[str, dict[str, Any]] = {
    "sparsity-0.25": {"sparsity": 0.25},
    "params-0.75": {"target_params": 0.75},  # the budget default: MLP neurons only (rotation none)
    "params-0.75-block": {"target_params": 0.75, "rotation": "block"},  # one shortcut per block, the default until 2026-11-27
    "params-0.892": {"target_params": 0.892},  # the paper's 0.25 model's size, MLP neurons only
    # neurons chosen by their own output energy, the choice until 2026-11-27 (--ffn-selection energy)
    "params-0.75-energy": {"target_params": 0.75, "ffn_selection": "energy"},
    "params-0.75-block-energy": {"target_params": 0.75, "rotation": "block", "ffn_selection": "energy"},
    "params-0.892-energy": {"target_params": 0.892, "ffn_selection": "energy"},
}
EVAL_WINDOWS = 64
OOD_TEXT = "python-stdlib"  # the built-in out-of-domain text (a file holding the same text gives the same numbers)
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


class OnDevice(torch.nn.Module):
    """A model called like modeling.SlicedModel that computes on `device`: inputs go there, logits come back to the inputs' device."""

    def __init__(self, model: torch.nn.Module, device: torch.device) -> None:
        super().__init__()
        self.model = model.to(device)
        self.device = device

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, past_key_values: Any = None,
                use_cache: bool = False) -> Any:  # fmt: skip
        from slicegpt_export.modeling import ReferenceOutput

        mask = None if attention_mask is None else attention_mask.to(self.device)
        out = self.model(input_ids.to(self.device), attention_mask=mask, past_key_values=past_key_values, use_cache=use_cache)
        return ReferenceOutput(out.logits.to(input_ids.device), out.past_key_values)


def evaluate(model: torch.nn.Module, dense: torch.nn.Module, tokenizer: Any, *, windows: int, ood: str = OOD_TEXT) -> dict[str, Any]:
    """Perplexities, fidelity and the greedy answer to the France prompt of `model` (a sliced or dense reference)."""
    from slicegpt_export.sources.text import text_windows
    from slicegpt_export.validation.fidelity import fidelity, greedy_answers
    from slicegpt_export.validation.perplexity import perplexity

    out: dict[str, Any] = {}
    with torch.no_grad():
        for name, text in (("test.txt", DATA / "test.txt"), (OOD_TEXT, Path(ood))):
            ids = text_windows(text, tokenizer, seqlen=512, windows=windows)
            out[f"ppl {name}"] = perplexity(lambda x: model(x).logits, ids)
    out["fidelity"] = fidelity(dense, model, tokenizer, cache_dir=CACHE, progress=False).to_dict()
    answers = greedy_answers(dense, model, tokenizer)
    out["answers"] = answers
    out["france"] = answers[0]["sliced"]
    return out


def dense_reference(device: torch.device) -> tuple[torch.nn.Module, Any, int]:
    """The dense source (transformers) on `device`, its tokenizer and its stored parameter count."""
    from slicegpt_export.checkpoint import parameter_count
    from slicegpt_export.sources.models import dense_model, load_source
    from slicegpt_export.validation.fidelity import TransformersLM

    source = load_source(None)
    params = parameter_count(source.tensors)
    tokenizer = source.tokenizer
    return OnDevice(TransformersLM(dense_model(source)), device), tokenizer, params


def generate_calibration(recipe: str, device: str) -> dict[str, float]:
    """Populate the generation cache for a recipe's built-in sources; returns the time it took (0 when cached)."""
    from slicegpt_export.converter.convert import fused_model
    from slicegpt_export.converter.mixture import DenseWriter, calibration_windows
    from slicegpt_export.sources.models import load_source

    source = load_source(None)
    fused = fused_model(source)[0]
    with Clock() as clock:
        calibration_windows(RECIPES[recipe], source.tokenizer, samples=CALIB["calib_samples"], seqlen=CALIB["calib_seqlen"],
                            seed=CALIB["seed"], writer=DenseWriter(fused, source.tokenizer, device=torch.device(device), cache_dir=CACHE))  # fmt: skip
    return clock.to_dict()


def times_path(checkpoint: Path) -> Path:
    return checkpoint.parent / f"{checkpoint.name}.times.json"


def device_suffix(device: str) -> str:
    return "" if device == "cpu" else f"-{device}"


def sliced(slicing: str, recipe: str, device: str) -> tuple[Path, dict[str, Any]]:
    """The sliced checkpoint of a setting and recipe (cached) and the time of its stages."""
    from slicegpt_export.converter.convert import slice_checkpoint

    out = QUALITY_WORK / f"{slicing}-{recipe}{device_suffix(device)}"
    times_file = times_path(out)
    if (out / "config.json").is_file() and times_file.is_file():
        return out, json.loads(times_file.read_text())
    times = {"generation": generate_calibration(recipe, device)}
    with Clock() as clock:
        slice_checkpoint(model=None, out=out, calib=RECIPES[recipe], **CALIB, **SLICINGS[slicing], device=device, progress=False,
                         overwrite=True)  # fmt: skip
    times["slicing"] = clock.to_dict()
    times_file.write_text(json.dumps(times))
    return out, times


def recovered(checkpoint: Path, steps: int, options: dict[str, Any], tag: str, device: str) -> tuple[Path, dict[str, Any]]:
    """`checkpoint` after `steps` of recovery (cached), the recovery time and its record."""
    from slicegpt_export.checkpoint import read_config
    from slicegpt_export.converter.recovery import recover_checkpoint

    out = checkpoint.with_name(f"{checkpoint.name}-recover{steps}{tag}")
    if not (out / "config.json").is_file():
        with Clock() as clock:
            recover_checkpoint(checkpoint=checkpoint, out=out, steps=steps, device=device, overwrite=True, progress=True, **options)
        times_path(out).write_text(json.dumps({"recovery": clock.to_dict()}))
    times = json.loads(times_path(out).read_text())
    return out, {**times, "record": read_config(out)[0].recovery}


def settings_tag(record: dict[str, Any] | None) -> str:
    """The recovery settings of a row that differ from today's defaults, e.g. " (train_shortcuts=True)", and its training
    windows when they are not the checkpoint's calibration windows, e.g. " (256 windows)"."""
    from slicegpt_export.converter.recovery import RecoverySettings

    record = record or {}
    defaults = dataclasses.asdict(RecoverySettings(steps=1))
    changed = [f"{k}={v}" for k, v in record.items() if k in defaults and k not in ("steps", "seed") and v != defaults[k]]
    if isinstance(record.get("data"), dict):
        changed.append(f"{record['data']['samples']} windows")
    return f" ({', '.join(changed)})" if changed else ""


def recipe_name(source: Any) -> str:
    """The bench's name of a recorded calibration source (the recorded value itself when it is none of the recipes)."""
    return next((name for name, spec in RECIPES.items() if spec == source), str(source))


def recorded_row(path: Path) -> dict[str, Any]:
    """Slicing, recipe, recovery steps and recovery time of a checkpoint built elsewhere, read from its config."""
    from slicegpt_export.checkpoint import read_config

    cfg = read_config(path)[0]
    target = cfg.slicing.get("target_params")
    recovery = cfg.recovery or {}
    times = {"recovery": {"wall_s": recovery["seconds"], "cpu_s": None}} if recovery else {}
    block = "-block" if cfg.slicing.get("rotation") == "block" else ""
    pruned = (cfg.slicing.get("ffn_keep") or 1.0) < 1
    energy = "-energy" if pruned and cfg.slicing.get("ffn_selection", "energy") == "energy" else ""  # no key: before obs
    return {"slicing": f"params-{target:g}{block}{energy}" if target else f"sparsity-{cfg.sparsity:g}", "recipe": recipe_name(cfg.calibration.get("source")),
            "recover": recovery.get("steps", 0), "times": times, "recovery": recovery or None, "checkpoint": str(path)}  # fmt: skip


def run(slicings: list[str], recipes: list[str], recover_steps: list[int], options: dict[str, Any], tag: str, windows: int,
        device: str = "cpu", ood: str = OOD_TEXT, checkpoints: list[Path] = ()) -> dict:  # fmt: skip
    """Rows of the grid slicings x recipes x recover_steps, or (with `checkpoints`) of those checkpoints instead."""
    from slicegpt_export.checkpoint import load_sliced, parameter_count, read_tensors

    dev = torch.device(device)
    dense, tokenizer, dense_params = dense_reference(dev)
    dense_file = QUALITY_WORK / f"dense-{windows}{device_suffix(device)}.json"
    if not dense_file.is_file():
        with Clock() as clock:
            base = evaluate(dense, dense, tokenizer, windows=windows, ood=ood)
        QUALITY_WORK.mkdir(parents=True, exist_ok=True)
        dense_file.write_text(json.dumps({"slicing": "dense", "recipe": "-", "recover": 0, "params": dense_params, **base,
                                          "times": {"evaluation": clock.to_dict()}}))  # fmt: skip
    rows = [json.loads(dense_file.read_text())]
    print(json.dumps(rows[-1]), file=sys.stderr, flush=True)

    def measure(path: Path, row: dict[str, Any]) -> None:
        with Clock() as clock:
            metrics = evaluate(OnDevice(load_sliced(path), dev), dense, tokenizer, windows=windows, ood=ood)
        row["times"]["evaluation"] = clock.to_dict()
        rows.append({**row, "params": parameter_count(read_tensors(path)), **metrics})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)

    for path in checkpoints:
        measure(path, recorded_row(path))
    for slicing in slicings if not checkpoints else []:
        for recipe in recipes:
            checkpoint, times = sliced(slicing, recipe, device)
            for steps in recover_steps:
                path, extra = (checkpoint, {}) if steps == 0 else recovered(checkpoint, steps, options, tag, device)
                row_times = {**times, **{k: v for k, v in extra.items() if k != "record"}}
                measure(path, {"slicing": slicing, "recipe": recipe, "recover": steps, "times": row_times,
                               "recovery": extra.get("record")})  # fmt: skip
    return {"dense_params": dense_params, "threads": torch.get_num_threads(), "load_average": os.getloadavg(), "rows": rows,
            "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"}


def markdown(result: dict) -> str:
    dense = result["rows"][0]
    lines = [
        "| slicing | calibration | recovery steps | ppl test.txt | ppl python-stdlib (x dense) | KL (nats) | top-1 | "
        "'The capital of France is' | parameters vs dense | generation | slicing | recovery |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def stage(r: dict, name: str) -> str:
        t = r["times"].get(name)
        if not t:
            return "-"
        return f"{t['wall_s']:.0f} s" + ("" if t["cpu_s"] is None else f" ({t['cpu_s']:.0f} cpu)")

    for r in result["rows"]:
        ratio = r["ppl python-stdlib"] / dense["ppl python-stdlib"]
        france = r["france"].strip().replace("|", "\\|").replace("\n", " ")[:60]
        lines.append(
            f"| {r['slicing']} | {r['recipe']} | {r['recover'] or '-'}{settings_tag(r.get('recovery'))} | {r['ppl test.txt']:.2f} | {r['ppl python-stdlib']:.2f} ({ratio:.2f}x) "
            f"| {r['fidelity']['kl_divergence']:.3f} | {r['fidelity']['top1_agreement']:.1%} | {france} "
            f"| {r['params'] / result['dense_params'] - 1:+.1%} | {stage(r, 'generation')} | {stage(r, 'slicing')} | {stage(r, 'recovery')} |"
        )
    lines += [
        "",
        f"Perplexity: first {EVAL_WINDOWS} windows of 512 tokens; fidelity: the dense model's greedy answers to the "
        f"{dense['fidelity']['prompts']} held-out chat prompts ({dense['fidelity']['tokens']:,} tokens). Times: wall seconds "
        f"(process CPU seconds) on {result.get('device', 'cpu')} with {result['threads']} CPU thread(s); load average {result['load_average'][0]:.1f} at the end"
        f"{' (the machine was shared)' if result['load_average'][0] > result['threads'] else ''}. Generation is paid once and cached.",
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
    parser.add_argument("--device", default="cpu", help="where slicing, recovery and evaluation run (cpu, cuda)")
    parser.add_argument("--ood", default=OOD_TEXT, help="the out-of-domain text: the built-in name or a file holding the same text")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--name", default="quality")
    parser.add_argument("--checkpoints", default="", help="comma-separated checkpoint folders to measure instead of the grid "
                        "(slicing, recipe and recovery read from each; times: the recovery's own record)")  # fmt: skip
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault(CACHE_ENV, str(CACHE))  # slicing and recovery read the text generate_calibration wrote
    result = run(args.slicing.split(","), args.recipes.split(","), [int(s) for s in args.recover.split(",")],
                 json.loads(args.recover_options), args.tag, args.windows, args.device, args.ood,
                 [Path(p) for p in args.checkpoints.split(",") if p])  # fmt: skip
    write_results(args.out, args.name, result, markdown(result))


if __name__ == "__main__":
    main()
