"""Data-parallel calibration on the protocol: SmolLM2 sliced at 0.25 by 1 process and by 2 (torchrun, gloo, CPU).

    python bench/data_parallel.py --baseline 58a3b3c

Reports the largest relative tensor difference between the two checkpoints (max |a - b| / max |a| per
tensor), WikiText-2 test perplexity of both (64 x 512), and the slicing time of each.  With
--baseline REF the same one-process command also runs from a git worktree of REF (the code before
streaming) first, in the same run, for the time ratio (target: the streamed converter at most 10%
slower).  Results: bench/results/data-parallel.json and .md.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DATA, REPO, WORK, write_results

logger = logging.getLogger("bench.data_parallel")
SLICE = ["slice", "--sparsity", "0.25", "--calib", str(DATA / "valid.txt"), "--calib-samples", "64", "--calib-seqlen", "512",
         "--seed", "42", "--device", "cpu", "--overwrite"]  # fmt: skip


def timed(argv: list[str], *, src: Path) -> float:
    env = {**os.environ, "PYTHONPATH": str(src)}
    start = time.perf_counter()
    done = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - start


def baseline_tree(ref: str) -> Path:
    tree = WORK / f"baseline-{ref}"
    if not tree.is_dir():
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(tree), ref], check=True, capture_output=True)
    return tree


def largest_relative_difference(a_dir: Path, b_dir: Path) -> tuple[float, str]:
    from slicegpt_export.checkpoint import read_tensors

    a, b = read_tensors(a_dir), read_tensors(b_dir)
    if a.keys() != b.keys():
        raise RuntimeError(f"the checkpoints hold different tensors: {sorted(a.keys() ^ b.keys())[:3]}")
    worst = max(((a[n] - b[n]).abs().max().item() / max(a[n].abs().max().item(), 1e-12), n) for n in a)
    return worst


def test_perplexity(checkpoint: Path) -> float:
    from slicegpt_export.validation.runners import reference_perplexities

    return reference_perplexities(checkpoint, texts=[DATA / "test.txt"], seqlen=512, windows=64, batch_size=8, device="cpu")[str(DATA / "test.txt")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", help="git ref of the converter to time against (e.g. the commit before streaming)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    python = [sys.executable, "-m", "slicegpt_export.cli"]
    times: dict[str, float] = {}
    if args.baseline:
        tree = baseline_tree(args.baseline)
        times[f"1 process, {args.baseline}"] = timed([*python, *SLICE, "--out", str(WORK / "dp-baseline")], src=tree / "src")
        logger.info("baseline: %.1f s", times[f"1 process, {args.baseline}"])
    times["1 process"] = timed([*python, *SLICE, "--out", str(WORK / "dp-1")], src=REPO / "src")
    logger.info("1 process: %.1f s", times["1 process"])
    times["2 processes (torchrun, gloo)"] = timed([*python, *SLICE, "--out", str(WORK / "dp-2"), "--nproc", "2"], src=REPO / "src")
    logger.info("2 processes: %.1f s", times["2 processes (torchrun, gloo)"])
    worst, name = largest_relative_difference(WORK / "dp-1", WORK / "dp-2")
    ppl = {"1 process": test_perplexity(WORK / "dp-1"), "2 processes": test_perplexity(WORK / "dp-2")}
    if args.baseline:
        ppl[f"1 process, {args.baseline}"] = test_perplexity(WORK / "dp-baseline")
    result: dict[str, Any] = {"command": f"python bench/data_parallel.py{' --baseline ' + args.baseline if args.baseline else ''}",
                              "seconds": {k: round(v, 1) for k, v in times.items()}, "largest_relative_difference": worst,
                              "worst_tensor": name, "test_perplexity": ppl}  # fmt: skip
    lines = ["# Data-parallel calibration (SmolLM2-135M-Instruct, the protocol, sparsity 0.25, CPU)", "", f"`{result['command']}`", "",
             "| run | slicing time (s) |", "| --- | ---: |"] + [f"| {k} | {v:.1f} |" for k, v in result["seconds"].items()]  # fmt: skip
    lines += ["", "| checkpoint | WikiText-2 test perplexity (64 x 512) |", "| --- | ---: |"] + [f"| {k} | {v:.4f} |" for k, v in ppl.items()]
    lines += ["", "Largest relative difference between the 1- and 2-process checkpoints: "
              + ("0 (every tensor the same bits)." if worst == 0 else f"{worst:.2e} (`{name}`).")]
    write_results(REPO / "bench" / "results", "data-parallel", result, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
