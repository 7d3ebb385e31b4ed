"""What least-squares block rounding (exporters/quantize.py) changes in llama.cpp q8_0 files (SmolLM2, the protocol).

    scripts/build_llama_cpp.sh && python bench/gguf_rounding.py [--rows dense,paper:0.25,block-uniform-ffn60:0.75]
        [--seeds 0,1,2]

For each row (pareto.py's names, and "dense": the unsliced model through this exporter) and each draw of the
aligned basis' random signs (padding.INCOHERENCE_SEED; the exporter's own is 0), the default q8_0 file is written
twice: its blocks rounded as llama-quantize rounds them (ggml's nearest rounding) and with a least-squares scale
per block (the default).  llama.cpp runs each over the protocol's 64 test windows beside the reference, window by
window: perplexity, and per predicted token the mean KL(reference || file) and the top-1 agreement; KL moves less
from draw to draw than perplexity does.  Also the squared error of the checkpoint's own matrices (rows of 32) in
each rounding, against the nearest rounding's.  With the dense row, llama.cpp's own q8_0 file of the dense model
(stock `llama`, llama-quantize) is measured the same way: what 8-bit rounding costs before any slicing.
Results are cached beside each file in bench/work.  Writes gguf_rounding.json and gguf_rounding.md into --out.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import sliced_checkpoint, test_windows, write_results
from gguf_in_llama_cpp import stock_dense_q8_0
from pareto import THREADS, checkpoint_for, default_variant, quality, variant_file
from residual_path import incoherence_seed

ROUNDINGS = ("nearest", "least-squares")


@torch.no_grad()
def agreement(gguf_file: Path, reference: torch.nn.Module, windows: torch.Tensor) -> dict[str, float]:
    """llama.cpp's perplexity of `gguf_file` on `windows`, and its mean KL(reference || file) and top-1 agreement per
    predicted token (cached beside the file)."""
    from slicegpt_export.validation.llama_cpp_runner import LlamaCppModel

    cache = gguf_file.with_suffix(".agreement.json")
    if cache.is_file():
        return json.loads(cache.read_text())
    model = LlamaCppModel(gguf_file, n_ctx=512, n_threads=THREADS)
    nll = kl = agree = 0.0
    for window in tqdm(windows, desc=f"agreement: {gguf_file.parent.name}", unit="window"):
        ids = window[None]  # (1, T)
        p = F.log_softmax(reference(ids).logits[0, :-1].float(), dim=-1)  # (T-1, V): predicting tokens 1..T-1
        q = F.log_softmax(torch.as_tensor(model.logits(ids))[0, :-1].float(), dim=-1)
        nll -= q.gather(-1, window[1:, None]).sum().item()
        kl += F.kl_div(q, p, log_target=True, reduction="sum").item()
        agree += (p.argmax(-1) == q.argmax(-1)).sum().item()
    model.close()
    count = windows[:, 1:].numel()
    result = {"perplexity": math.exp(nll / count), "kl": kl / count, "top1": agree / count}
    cache.write_text(json.dumps(result))
    return result


def weight_error_ratio(checkpoint: Path) -> dict[str, float]:
    """Squared error of the checkpoint's matrices whose rows hold whole 32-blocks, in q8_0 and q4_0 with least-squares
    rounding, against the nearest rounding's (the exporter's padded, rotated matrices differ; the blocks are alike)."""
    import gguf
    from safetensors.numpy import load_file

    from slicegpt_export.exporters.quantize import quantize

    matrices = [t for t in load_file(checkpoint / "model.safetensors").values() if t.ndim == 2 and t.shape[-1] % 32 == 0]
    ratios = {}
    for qtype in (gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q4_0):
        err = dict.fromkeys(ROUNDINGS, 0.0)
        for x in matrices:
            x = x.astype(np.float32)
            for rounding in ROUNDINGS:
                err[rounding] += float(((gguf.quants.dequantize(quantize(x, qtype, rounding), qtype) - x) ** 2).sum())
        ratios[qtype.name.lower()] = err["least-squares"] / err["nearest"]
    return ratios


def markdown(rows: list[dict]) -> str:
    lines = ["| slicing | reference | signs | nearest: perplexity | KL | top-1 | least-squares: perplexity | KL | top-1 |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        for seed, by_rounding in r["seeds"].items():
            cells = []
            for rounding in ROUNDINGS:
                m = by_rounding[rounding]
                cells += [
                    f"{m['perplexity']:.2f} ({m['perplexity'] / r['reference'] - 1:+.2%})",
                    f"{m['kl']:.5f}",
                    f"{m['top1']:.2%}",
                ]
            lines.append(f"| {r['row']} | {r['reference']:.2f} | {seed} | {' | '.join(cells)} |")
    for r in rows:
        if "stock" in r:
            m = r["stock"]
            lines.append(
                f"| {r['row']}: llama-quantize's own q8_0 (stock `llama`) | {r['reference']:.2f} | - | "
                f"{m['perplexity']:.2f} ({m['perplexity'] / r['reference'] - 1:+.2%}) | {m['kl']:.5f} | {m['top1']:.2%} | | | |"
            )
    lines += ["", "Means over the draws of signs (change of perplexity against the reference; KL):", ""]
    for r in rows:
        for rounding in ROUNDINGS:
            runs = [by_rounding[rounding] for by_rounding in r["seeds"].values()]
            change = statistics.mean(m["perplexity"] / r["reference"] - 1 for m in runs)
            lines.append(f"- {r['row']}, {rounding}: {change:+.2%}, KL {statistics.mean(m['kl'] for m in runs):.5f}")
    lines += ["", "Squared error of the checkpoint's matrices, least-squares against nearest rounding:", ""]
    lines += [f"- {r['row']}: " + ", ".join(f"{k} {v:.3f}" for k, v in r["weight_error_ratio"].items()) for r in rows]
    lines += ["", "llama.cpp q8_0 files (the default residual path and basis) on the protocol's 64 test windows; KL and",
              "top-1 agreement per predicted token against the reference (PyTorch, float32). Signs: padding.INCOHERENCE_SEED",
              "of the aligned basis (the exporter's is 0)."]  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    from slicegpt_export.checkpoint import load_sliced
    from slicegpt_export.sources.tokenizer import load_tokenizer

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="dense,paper:0.25,block-uniform-ffn60:0.75")
    parser.add_argument("--seeds", default="0,1,2", help="the rotation's signs of the sliced rows (the dense row: 0)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    residual_type, basis = default_variant()
    rows = []
    for row in args.rows.split(","):
        checkpoint = sliced_checkpoint(0.0, rotate=False) if row == "dense" else checkpoint_for(row)
        windows = test_windows(load_tokenizer(checkpoint))
        reference = load_sliced(checkpoint)
        result = {"row": row, "reference": quality(row, checkpoint, windows)["perplexity"], "seeds": {}}
        if row == "dense":
            result["stock"] = agreement(stock_dense_q8_0(), reference, windows)
        for seed in [0] if row == "dense" else [int(s) for s in args.seeds.split(",")]:
            for rounding in ROUNDINGS:
                with incoherence_seed(seed) if seed else nullcontext():
                    path = variant_file(checkpoint, residual_type, basis, tag=f"-seed{seed}" if seed else "", rounding=rounding)
                result["seeds"].setdefault(seed, {})[rounding] = agreement(path, reference, windows)
                print(json.dumps({row: {seed: result["seeds"][seed]}}), file=sys.stderr)
        result["weight_error_ratio"] = weight_error_ratio(checkpoint)
        rows.append(result)
    write_results(args.out, "gguf_rounding", rows, markdown(rows))


if __name__ == "__main__":
    main()
