"""Slicing benchmark on the README's measurement protocol: width, parameters, perplexity, time and memory per sparsity.

    python bench/slicing.py --sparsities 0,0.1,0.2,0.25,0.3,0.5 --out bench/results

Each sparsity runs in its own process (so peak resident memory is its own); the dense
forward over the calibration tokens is timed once for the ratio the issue asks for.
Writes ``slicing.json`` and ``slicing.md`` into --out.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import DATA, REPO, write_results

logger = logging.getLogger("bench.slicing")


def run_one(sparsity: float) -> dict:
    """Slice at `sparsity`, measure perplexity; runs inside a fresh process."""
    from slicegpt_export.checkpoint import load_sliced
    from slicegpt_export.converter.convert import slice_checkpoint
    from slicegpt_export.sources.text import text_windows
    from slicegpt_export.sources.tokenizer import load_tokenizer
    from slicegpt_export.validation.perplexity import perplexity

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "sliced"
        summary = slice_checkpoint(
            model=None, out=out, sparsity=sparsity, calib=str(DATA / "valid.txt"),
            calib_samples=64, calib_seqlen=512, seed=42, device="cpu", progress=False,
        )  # fmt: skip
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        model = load_sliced(out)
        windows = text_windows(DATA / "test.txt", load_tokenizer(out), seqlen=512, windows=64)
        with torch.no_grad():
            ppl = perplexity(lambda ids: model(ids).logits, windows)
    return {
        "sparsity": sparsity,
        "width": summary.config.embedding_width,
        "head_in": summary.config.head_in,
        "params": summary.params_after,
        "params_dense": summary.params_before,
        "perplexity": round(ppl, 4),
        "slice_seconds": round(summary.seconds, 1),
        "peak_rss_mb": round(peak_mb),
    }


def dense_forward_seconds() -> float:
    """One plain forward (logits included) of the dense model over the protocol's 64 x 512 calibration tokens."""
    from slicegpt_export.converter.convert import fused_model
    from slicegpt_export.sources.models import load_source
    from slicegpt_export.sources.text import sample_windows, tokenize_text

    source = load_source(None)
    ids = sample_windows(tokenize_text((DATA / "valid.txt").read_text(), source.tokenizer), samples=64, seqlen=512, seed=42)
    model = fused_model(source)[0]
    start = time.perf_counter()
    with torch.no_grad():
        for batch in ids.split(8):
            model(batch)
    return time.perf_counter() - start


def markdown(rows: list[dict], dense_seconds: float) -> str:
    lines = [
        "| sparsity | width | parameters (with shortcuts) | vs dense | perplexity | slicing time (s) | x dense forward | peak RSS (MiB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['sparsity']} | {r['width']} | {r['params'] / 1e6:.1f}M | {r['params'] / r['params_dense'] - 1:+.1%} "
            f"| {r['perplexity']:.2f} | {r['slice_seconds']:.1f} | {r['slice_seconds'] / dense_seconds:.2f} | {r['peak_rss_mb']:,} |"
        )
    lines.append("")
    lines.append(f"Dense model: {rows[0]['params_dense'] / 1e6:.1f}M parameters; one dense forward over the 64 x 512 calibration tokens: {dense_seconds:.1f} s.")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sparsities", default="0,0.1,0.2,0.25,0.3,0.5")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--one", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--dense-forward", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.one is not None:
        json.dump(run_one(args.one), sys.stdout)
        return
    if args.dense_forward:
        json.dump({"seconds": dense_forward_seconds()}, sys.stdout)
        return
    rows = []
    for s in [float(x) for x in args.sparsities.split(",")]:
        done = subprocess.run([sys.executable, __file__, "--one", str(s)], check=True, capture_output=True, text=True)
        rows.append(json.loads(done.stdout))
        print(json.dumps(rows[-1]), file=sys.stderr)
    done = subprocess.run([sys.executable, __file__, "--dense-forward"], check=True, capture_output=True, text=True)
    dense = json.loads(done.stdout)["seconds"]
    write_results(args.out, "slicing", {"dense_forward_seconds": dense, "runs": rows}, markdown(rows, dense))


if __name__ == "__main__":
    main()
