"""ONNX Runtime CPU speed of SmolLM2 graphs: ours (dense and sliced) against onnxruntime-genai's builder.

    python bench/onnx_speed.py [--sparsities 0,0.25,0.5] [--out bench/results]

Prefill: latency of one 1 x 512 forward (median of 5).  Decode: tokens per second over 128
greedy steps after a 32-token prompt, batch 1 and 8 (median of 3 runs after a warm-up run).  Each speed-up of a sliced graph is
shown beside its bound, the dense/sliced ratio of weight multiply-accumulates per token
(every MatMul, shortcuts and head included).  Writes onnx_speed.json and onnx_speed.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import WORK, hf_folder, sliced_checkpoint, write_results

PREFILL_LEN, PROMPT_LEN, NEW_TOKENS = 512, 32, 128


class Session:
    """Feeds any decoder graph with the Optimum/genai names (position_ids only when the graph takes it)."""

    def __init__(self, path: Path) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(path / "model.onnx"), options, providers=["CPUExecutionProvider"])
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.past_names = [n for n in self.inputs if n.startswith("past_key_values")]
        decoder = json.loads((path / "genai_config.json").read_text())["model"]["decoder"]  # the builder's KV dims are symbolic
        self.kv_heads, self.head_dim = decoder["num_key_value_heads"], decoder["head_size"]
        self.outputs = [o.name for o in self.session.get_outputs()]

    def step(self, ids: np.ndarray, mask: np.ndarray, past: dict) -> tuple[np.ndarray, dict]:
        feeds = {"input_ids": ids, "attention_mask": mask, **past}
        if "position_ids" in self.inputs:
            feeds["position_ids"] = np.broadcast_to(np.arange(mask.shape[1] - ids.shape[1], mask.shape[1]), ids.shape).astype(np.int64)
        out = dict(zip(self.outputs, self.session.run(self.outputs, feeds)))
        return out["logits"], {n: out[n.replace("past_key_values", "present")] for n in self.past_names}

    def empty(self, batch: int) -> dict:
        return {n: np.zeros((batch, self.kv_heads, 0, self.head_dim), np.float32) for n in self.past_names}


def prefill_seconds(s: Session, repeats: int = 5) -> float:
    ids = np.random.default_rng(0).integers(0, 1000, (1, PREFILL_LEN), dtype=np.int64)
    s.step(ids, np.ones_like(ids), s.empty(1))  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        s.step(ids, np.ones_like(ids), s.empty(1))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def decode_tokens_per_second(s: Session, batch: int, repeats: int = 3) -> float:
    """Median over `repeats` runs (after one warm-up run) of NEW_TOKENS greedy steps after the prompt."""
    rates = []
    for run in range(repeats + 1):
        ids = np.random.default_rng(run).integers(0, 1000, (batch, PROMPT_LEN), dtype=np.int64)
        mask = np.ones_like(ids)
        logits, past = s.step(ids, mask, s.empty(batch))
        start = time.perf_counter()
        for _ in range(NEW_TOKENS):
            ids = logits[:, -1:].argmax(-1).astype(np.int64)
            mask = np.concatenate([mask, np.ones_like(ids)], axis=1)
            logits, past = s.step(ids, mask, past)
        if run:
            rates.append(batch * NEW_TOKENS / (time.perf_counter() - start))
    return statistics.median(rates)


def weight_macs_per_token(checkpoint: Path) -> int:
    """Multiply-accumulates per token of every weight matrix (embedding lookups excluded, a tied head counted)."""
    from slicegpt_export import checkpoint as ckpt

    cfg, _ = ckpt.read_config(checkpoint)
    return ckpt.weight_macs_per_token(ckpt.read_tensors(checkpoint), tied_embeddings=cfg.tied_embeddings)


def measure(path: Path) -> dict:
    s = Session(path)
    return {"prefill_ms": 1000 * prefill_seconds(s), "decode_tps_b1": decode_tokens_per_second(s, 1),
            "decode_tps_b8": decode_tokens_per_second(s, 8)}  # fmt: skip


def markdown(rows: list[dict]) -> str:
    dense = next(r for r in rows if r["name"] == "ours dense")
    lines = ["| graph | MACs/token | bound | prefill 1x512 (ms) | speed-up | decode b1 (tok/s) | speed-up | decode b8 (tok/s) | speed-up |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        bound = dense["macs"] / r["macs"]
        lines.append(
            f"| {r['name']} | {r['macs'] / 1e6:.1f}M | {bound:.2f}x | {r['prefill_ms']:.1f} | {dense['prefill_ms'] / r['prefill_ms']:.2f}x "
            f"| {r['decode_tps_b1']:.1f} | {r['decode_tps_b1'] / dense['decode_tps_b1']:.2f}x "
            f"| {r['decode_tps_b8']:.1f} | {r['decode_tps_b8'] / dense['decode_tps_b8']:.2f}x |"
        )
    return "\n".join(lines) + "\n\nSpeed-ups are against our dense graph; the bound is the dense/sliced ratio of weight MACs per token.\n"


def main() -> None:
    from slicegpt_export.exporters.onnx import export_onnx

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sparsities", default="0,0.25,0.5")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args()
    rows = []
    builder_dir = WORK / "builder-fp32"
    if not (builder_dir / "model.onnx").is_file():
        subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_folder()), "-o", str(builder_dir),
                        "-p", "fp32", "-e", "cpu"], check=True, capture_output=True)  # fmt: skip
    dense_checkpoint = sliced_checkpoint(0.0, rotate=False)
    for sparsity in [float(s) for s in args.sparsities.split(",")]:
        checkpoint = sliced_checkpoint(sparsity, rotate=sparsity > 0)
        onnx_dir = WORK / f"onnx-{sparsity:g}"
        if not (onnx_dir / "model.onnx").is_file():
            export_onnx(checkpoint=checkpoint, out=onnx_dir, overwrite=True)
        name = "ours dense" if sparsity == 0 else f"ours sliced {sparsity:g}"
        rows.append({"name": name, "macs": weight_macs_per_token(checkpoint), **measure(onnx_dir)})
        print(json.dumps(rows[-1]), file=sys.stderr)
    # the builder's graph computes the same weight MACs per token as our unrotated dense graph
    rows.append({"name": "genai builder dense", "macs": weight_macs_per_token(dense_checkpoint), **measure(builder_dir)})
    write_results(args.out, "onnx_speed", rows, markdown(rows))


if __name__ == "__main__":
    main()
