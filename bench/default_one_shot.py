"""The headline command with no other option, as a new user runs it: wall time, stages, and silences.

    python bench/default_one_shot.py --out bench/results

Runs `slicegpt-export --format onnx` (nothing else) in a fresh folder under bench/work, so it
writes ./slicegpt-out with every default: the embedded SmolLM2-135M-Instruct, sparsity 0.25,
the device's calibration size, and -- with no hub here -- calibration text sampled from the
model.  Records the wall time, the time per stage the tool prints, the longest stretch without
any new output on the terminal (progress bars included: "progress visible throughout"), and the
machine's load average while it ran, since the machine is shared.  Writes
``default_one_shot.json`` and ``default_one_shot.md`` into --out.
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORK = REPO / "bench" / "work" / "default-one-shot"
COMMAND = ["slicegpt-export", "--format", "onnx"]


def load_sampler(samples: list[float], stop: threading.Event, every: float = 10.0) -> None:
    """Append the 1-minute load average every `every` seconds until `stop` is set."""
    while not stop.is_set():
        samples.append(os.getloadavg()[0])
        stop.wait(every)


def run(command: list[str], cwd: Path) -> dict:
    """Run `command`, echoing its output; returns wall time, output and the longest silence between output chunks."""
    stop, loads = threading.Event(), []
    sampler = threading.Thread(target=load_sampler, args=(loads, stop), daemon=True)
    sampler.start()
    start = last = time.perf_counter()
    longest, longest_after = 0.0, ""
    chunks: list[bytes] = []
    # a fresh generation cache: a new user has none, so the sampled calibration text is timed in full
    env = {**os.environ, "SLICEGPT_CACHE": str(cwd / "cache")}
    proc = subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    assert proc.stdout is not None
    selector = selectors.DefaultSelector()
    selector.register(proc.stdout, selectors.EVENT_READ)
    while True:
        selector.select()
        chunk = os.read(proc.stdout.fileno(), 65536)
        if not chunk:
            break
        now = time.perf_counter()
        if now - last > longest:
            tail = b"".join(chunks)[-200:].decode(errors="replace").replace("\r", "\n").strip().splitlines()
            longest, longest_after = now - last, tail[-1] if tail else ""
        last = now
        chunks.append(chunk)
        sys.stderr.write(chunk.decode(errors="replace"))
        sys.stderr.flush()
    code = proc.wait()
    wall = time.perf_counter() - start
    stop.set()
    sampler.join()
    output = b"".join(chunks).decode(errors="replace")
    return {"exit_code": code, "wall_seconds": round(wall, 1), "longest_silence_seconds": round(longest, 1),
            "longest_silence_after": longest_after, "load_average_1min": loads, "output": output}  # fmt: skip


def stage_times(output: str) -> dict[str, str]:
    """The tool's own 'time per stage: slice 12.3 s, export onnx 4.5 s, ...' line as a dict."""
    line = next((line for line in output.splitlines() if line.startswith("time per stage: ")), "")
    return dict(part.split(" ", 1)[::-1] for part in line.removeprefix("time per stage: ").split(", ") if part)


def markdown(result: dict) -> str:
    loads = result["load_average_1min"]
    stages = ", ".join(f"{name} {value}" for name, value in result["stages"].items())
    return "\n".join([
        "`slicegpt-export --format onnx` with no other option, in a fresh folder (2-core CPU, no hub: calibration sampled from the model).",
        "",
        "| exit | wall time | per stage (the tool's own figures) | longest silence | load average (1 min) while running |",
        "|---|---|---|---|---|",
        (f"| {result['exit_code']} | {result['wall_seconds'] / 60:.1f} min | {stages} | {result['longest_silence_seconds']:.1f} s "
         f"| {min(loads):.1f} to {max(loads):.1f}, mean {sum(loads) / len(loads):.1f} |"),
        "",
        (f"Calibration: {result['calibration']}. The longest silence is the longest time without any new output on the "
         f"terminal (progress bars included); it followed: `{result['longest_silence_after']}`. The machine was shared "
         "with other jobs: a load average above 2 means the run had less than the 2 cores to itself."),
        "",
    ])  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args()
    if shutil.which(COMMAND[0]) is None:
        sys.exit(f"{COMMAND[0]} is not on PATH: activate the virtual environment first")
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    result = run(COMMAND, WORK)
    if result["exit_code"] != 0:
        sys.exit(f"{' '.join(COMMAND)} failed with exit status {result['exit_code']}")
    result["stages"] = stage_times(result["output"])
    config = json.loads((WORK / "slicegpt-out" / "checkpoint" / "config.json").read_text())["slicegpt"]["calibration"]
    result["calibration"] = f"{config['samples']} x {config['seqlen']} tokens {config['source']}"
    result["command"] = " ".join(COMMAND)
    args.out.mkdir(parents=True, exist_ok=True)
    saved = {k: v for k, v in result.items() if k != "output"}
    (args.out / "default_one_shot.json").write_text(json.dumps(saved, indent=2) + "\n")
    (args.out / "default_one_shot.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
