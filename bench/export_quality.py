"""Perplexity and size of every exported artifact of SmolLM2 at a sparsity, on the README's measurement protocol.

    python bench/export_quality.py [--sparsity 0.25] [--out bench/results]

Reference (PyTorch) perplexity; ONNX Runtime fp32/int8/int4; GGUF f32/f16/bf16/q8_0/q4_0 through the
file-only runner; each file's size beside the dense SmolLM2 exported the same way.  Writes
export_quality.json and export_quality.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import WORK, sliced_checkpoint, test_windows, write_results


def main() -> None:
    from slicegpt_export.checkpoint import load_sliced
    from slicegpt_export.exporters.gguf import export_gguf
    from slicegpt_export.exporters.onnx import export_onnx
    from slicegpt_export.sources.tokenizer import load_tokenizer
    from slicegpt_export.validation.gguf_runner import GGUFModel
    from slicegpt_export.validation.onnx_runner import OnnxDecoder
    from slicegpt_export.validation.perplexity import perplexity
    from slicegpt_export.validation.report import size_mb

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sparsity", type=float, default=0.25)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--round-to", type=int, default=8, help="slice with this --round-to (32 keeps every row block-aligned)")
    parser.add_argument("--skip-onnx", action="store_true")
    parser.add_argument("--gguf-types", default="f32,f16,bf16,q8_0,q4_0")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    sliced, dense = sliced_checkpoint(args.sparsity, round_to=args.round_to), sliced_checkpoint(0.0, rotate=False)
    tag = f"{args.sparsity:g}" + ("" if args.round_to == 8 else f"-r{args.round_to}")
    report_tag = tag + ("-gguf" if args.skip_onnx else "")
    windows = test_windows(load_tokenizer(sliced))
    model = load_sliced(sliced)
    rows = [{"artifact": "PyTorch reference", "perplexity": perplexity(lambda ids, m=model: m(ids).logits, windows)}]
    del model
    for quantize in () if args.skip_onnx else (None, "int8", "int4"):
        kind = quantize or "fp32"
        paths = {}
        for name, checkpoint in (("sliced", sliced), ("dense", dense)):
            paths[name] = WORK / f"onnx-{name}-{tag}-{kind}" if name == "sliced" else WORK / f"onnx-dense-{kind}"
            if not (paths[name] / "model.onnx").is_file():
                export_onnx(checkpoint=checkpoint, out=paths[name], quantize=quantize, overwrite=True)
        ppl = perplexity(OnnxDecoder(paths["sliced"]).logits, windows)
        rows.append({"artifact": f"ONNX {kind}", "perplexity": ppl, "size_mb": size_mb(paths["sliced"]), "dense_size_mb": size_mb(paths["dense"])})
        print(json.dumps(rows[-1]), file=sys.stderr)
    for gguf_type in args.gguf_types.split(","):
        path = export_gguf(checkpoint=sliced, out=WORK / f"gguf-{tag}-{gguf_type}", gguf_type=gguf_type, overwrite=True)
        dense_path = export_gguf(checkpoint=dense, out=WORK / f"gguf-dense-{gguf_type}", gguf_type=gguf_type, overwrite=True)
        ppl = perplexity(GGUFModel(path).logits, windows)
        rows.append({"artifact": f"GGUF {gguf_type}", "perplexity": ppl, "size_mb": size_mb(path), "dense_size_mb": size_mb(dense_path)})
        print(json.dumps(rows[-1]), file=sys.stderr)
    reference = rows[0]["perplexity"]
    lines = ["| artifact | perplexity | vs reference | size (MiB) | dense, same type (MiB) |", "|---|---|---|---|---|"]
    for r in rows:
        size = f"{r['size_mb']:.1f} | {r['dense_size_mb']:.1f}" if "size_mb" in r else "- | -"
        lines.append(f"| {r['artifact']} | {r['perplexity']:.3f} | {r['perplexity'] / reference - 1:+.3%} | {size} |")
    table = "\n".join(lines) + (f"\n\nSmolLM2-135M-Instruct sliced at {args.sparsity:g} (--round-to {args.round_to}); "
                                 "README measurement protocol (64 x 512 test tokens).\n")  # fmt: skip
    write_results(args.out, f"export_quality-{report_tag}", rows, table)


if __name__ == "__main__":
    main()
