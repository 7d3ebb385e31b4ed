"""Decode speed in onnxruntime-genai, the ONNX client this tool's graphs are made for, beside a plain ONNX Runtime loop.

    python bench/genai_speed.py [--rows mlp-only:0.75] [--rounds 6]

Our dense graph (fused, no rotation) and each row's graph (bench/pareto.py's row names) decode greedily
NEW_TOKENS tokens after a PROMPT_LEN-token prompt at batch 1 and 8, in two clients:

* onnxruntime-genai (``og.Generator``, the graph's own genai_config.json, its default session options), which
  keeps the KV cache between steps itself;
* the plain ONNX Runtime session loop of bench/onnx_speed.py (numpy feeds, every present fed back as the next
  past), the figure bench/pareto.py reports.

Each round measures every graph in both clients, in alternating orders; each speed-up is against the dense graph of
its own round and client, shown beside its bound (the dense/sliced ratio of weight multiply-accumulates per token).
Also recorded: the cores each client keeps busy (process CPU seconds / wall seconds while decoding), since a client
that computes on fewer threads spends less of each token waiting for them.  Writes genai_speed.json and .md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import sliced_checkpoint, spread, write_results
from onnx_speed import NEW_TOKENS, PROMPT_LEN, Session, decode_tokens_per_second, weight_macs_per_token
from pareto import checkpoint_for, exports

BATCHES = (1, 8)
CLIENTS = ("genai", "session")


def genai_decode(model: object, batch: int, repeats: int = 3) -> tuple[float, float]:
    """onnxruntime-genai: median tokens/s over `repeats` runs (after a warm-up run) of NEW_TOKENS greedy steps after a
    random PROMPT_LEN-token prompt per sequence, and the cores busy meanwhile (CPU seconds / wall seconds)."""
    import onnxruntime_genai as og

    rates, busy = [], []
    for run in range(repeats + 1):
        ids = np.random.default_rng(run).integers(0, 1000, (batch, PROMPT_LEN), dtype=np.int32)  # (batch, prompt)
        params = og.GeneratorParams(model)
        length = PROMPT_LEN + NEW_TOKENS
        params.set_search_options(max_length=length, min_length=length, batch_size=batch, do_sample=False)
        generator = og.Generator(model, params)
        generator.append_tokens(ids)
        wall, cpu, steps = time.perf_counter(), time.process_time(), 0
        while not generator.is_done():
            generator.generate_next_token()
            steps += 1
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        if steps != NEW_TOKENS:
            raise RuntimeError(f"onnxruntime-genai decoded {steps} steps, expected {NEW_TOKENS}")
        if run:
            rates.append(batch * steps / wall)
            busy.append(cpu / wall)
    return statistics.median(rates), statistics.median(busy)


def session_decode(session: Session, batch: int) -> tuple[float, float]:
    """The plain session loop's tokens/s (bench/onnx_speed.py) and the cores busy meanwhile."""
    wall, cpu = time.perf_counter(), time.process_time()
    rate = decode_tokens_per_second(session, batch)
    return rate, (time.process_time() - cpu) / (time.perf_counter() - wall)


def measure(onnx_dir: Path) -> dict[str, dict[str, float]]:
    """Tokens/s and cores busy of one graph: {"genai b1": {"tok_s": ..., "cores": ...}, "session b8": ...}."""
    import onnxruntime_genai as og

    model, session = og.Model(str(onnx_dir)), Session(onnx_dir)
    out = {}
    for batch in BATCHES:
        for client, run in (("genai", lambda b: genai_decode(model, b)), ("session", lambda b: session_decode(session, b))):
            rate, cores = run(batch)
            out[f"{client} b{batch}"] = {"tok_s": rate, "cores": cores}
    return out


def markdown(result: dict) -> str:
    lines = ["| graph | MACs/token | bound | client | batch | tok/s (median) | speed-up (median; range) | cores busy |",
             "|---" * 8 + "|"]  # fmt: skip
    dense = result["graphs"]["dense"]
    for name, g in result["graphs"].items():
        for key in g["speedup"]:
            client, batch = key.split(" b")
            s = g["speedup"][key]
            lines.append(f"| {name} | {g['macs'] / 1e6:.1f}M | {dense['macs'] / g['macs']:.2f}x | {client} | {batch} | "
                         f"{statistics.median(m[key]['tok_s'] for m in g['rounds']):.1f} | {s['median']:.2f}x; {s['min']:.2f}-{s['max']:.2f}x | "
                         f"{statistics.median(m[key]['cores'] for m in g['rounds']):.2f} |")  # fmt: skip
    note = (f"{result['rounds']} rounds, alternating orders, each speed-up against the dense graph of its round and client; "
            f"{NEW_TOKENS} greedy steps after a {PROMPT_LEN}-token prompt (median of 3 runs after a warm-up run). genai: "
            "onnxruntime-genai with the graph's genai_config.json; session: bench/onnx_speed.py's plain ONNX Runtime loop.")
    lines += ["", note]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="mlp-only:0.75", help="comma-separated bench/pareto.py row names")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args()
    checkpoints = {"dense": sliced_checkpoint(0.0, rotate=False), **{row: checkpoint_for(row) for row in args.rows.split(",")}}
    graphs = {name: {"onnx": exports(path)[0], "macs": weight_macs_per_token(path), "rounds": []} for name, path in checkpoints.items()}
    for n in range(args.rounds):
        for name in list(graphs)[:: -1 if n % 2 else 1]:
            graphs[name]["rounds"].append(measure(graphs[name]["onnx"]))
        print(json.dumps({name: {k: round(v["tok_s"], 1) for k, v in g["rounds"][-1].items()} for name, g in graphs.items()}),
              file=sys.stderr, flush=True)  # fmt: skip
    for g in graphs.values():
        ratios = {key: [m[key]["tok_s"] / d[key]["tok_s"] for m, d in zip(g["rounds"], graphs["dense"]["rounds"])] for key in g["rounds"][0]}
        g["speedup"] = {key: spread(r) for key, r in ratios.items()}
        g["onnx"] = str(g["onnx"])
    result = {"rounds": args.rounds, "graphs": graphs}
    write_results(args.out, "genai_speed", result, markdown(result))


if __name__ == "__main__":
    main()
