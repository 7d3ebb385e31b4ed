"""SmolLM2 sliced at a sparsity, run by llama.cpp itself: perplexity against the reference, decode speed against dense.

    scripts/build_llama_cpp.sh && python bench/gguf_in_llama_cpp.py [--sparsity 0.25] [--out bench/results]

Perplexity on the README's measurement protocol (same token windows as the reference) for the f32 and
q8_0 files, q8_0 also with `--gguf-shortcut-type q8_0`; decode tokens/s (batch 1, 2 threads, 128
greedy tokens after a 128-token prompt, best of 3) of the sliced q8_0 files beside the dense
SmolLM2 as a stock `llama` q8_0 file (requantized by llama.cpp from the embedded Q4_1 GGUF) and
beside our dense export (fused, sparsity 0, no rotation) in the same build.  The bound is the
dense/sliced ratio of weight multiply-accumulates per token.  Writes llama_cpp-<sparsity>[-r<round-to>].json and .md.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import WORK, sliced_checkpoint, test_windows
from onnx_speed import weight_macs_per_token

PROMPT_TOKENS = 128
NEW_TOKENS = 128
THREADS = 2


def stock_dense_q8_0() -> Path:
    """The embedded SmolLM2 GGUF requantized to q8_0 by llama.cpp (architecture `llama`)."""
    from slicegpt_export.sources.models import default_model_path
    from slicegpt_export.validation.llama_cpp_runner import import_llama_cpp

    llama_cpp = import_llama_cpp()
    out = WORK / "llama-cpp-dense-stock" / "model-q8_0.gguf"
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0
        params.allow_requantize = True
        params.nthread = THREADS
        tmp = out.with_suffix(".tmp")
        if llama_cpp.llama_model_quantize(str(default_model_path()).encode(), str(tmp).encode(), ctypes.byref(params)) != 0:
            raise RuntimeError("llama.cpp could not requantize the SmolLM2 GGUF")
        tmp.rename(out)
    return out


def decode_speed(path: Path, prompt: list[int]) -> float:
    from slicegpt_export.validation.llama_cpp_runner import LlamaCppModel

    model = LlamaCppModel(path, n_ctx=PROMPT_TOKENS + NEW_TOKENS + 8, n_threads=THREADS)
    best = max(model.decode_tokens_per_second(prompt, NEW_TOKENS) for _ in range(3))
    model.close()
    return best


def reference_perplexity(checkpoint: Path, windows: torch.Tensor) -> float:
    from slicegpt_export.checkpoint import load_sliced
    from slicegpt_export.validation.perplexity import perplexity

    model = load_sliced(checkpoint)
    return perplexity(lambda ids: model(ids).logits, windows)


def main() -> None:
    from slicegpt_export.exporters.gguf import export_gguf
    from slicegpt_export.sources.tokenizer import load_tokenizer
    from slicegpt_export.validation.llama_cpp_runner import LlamaCppModel
    from slicegpt_export.validation.perplexity import perplexity

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sparsity", type=float, default=0.25)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--round-to", type=int, default=8, help="slice with this --round-to (32: every row q8_0-aligned)")
    args = parser.parse_args()
    torch.set_grad_enabled(False)

    checkpoint = sliced_checkpoint(args.sparsity, round_to=args.round_to)
    tag = f"{args.sparsity:g}" + ("" if args.round_to == 8 else f"-r{args.round_to}")
    dense_checkpoint = sliced_checkpoint(0.0, rotate=False)
    windows = test_windows(load_tokenizer(checkpoint))
    ref_ppl = reference_perplexity(checkpoint, windows)

    result: dict = {"sparsity": args.sparsity, "round_to": args.round_to, "reference_perplexity": ref_ppl, "perplexity": {}}
    files = {}
    variants = {"f32": ("f32", "auto"), "q8_0": ("q8_0", "auto"), "q8_0, q8_0 shortcuts": ("q8_0", "q8_0")}
    for name, (gguf_type, shortcut_type) in variants.items():
        files[name] = export_gguf(checkpoint=checkpoint, out=WORK / f"llama-cpp-{tag}-{gguf_type}-{shortcut_type}",
                                  gguf_type=gguf_type, shortcut_type=shortcut_type, overwrite=True)  # fmt: skip
        model = LlamaCppModel(files[name], n_ctx=512, n_threads=THREADS)
        result["perplexity"][name] = perplexity(model.logits, windows, batch_size=1, progress=True)
        model.close()
    ours_dense = export_gguf(checkpoint=dense_checkpoint, out=WORK / "llama-cpp-dense-q8_0", gguf_type="q8_0", overwrite=True)

    prompt = windows[0, :PROMPT_TOKENS].tolist()
    dense_macs, sliced_macs = weight_macs_per_token(dense_checkpoint), weight_macs_per_token(checkpoint)
    result["decode"] = {
        "dense stock llama q8_0": {"tok_s": decode_speed(stock_dense_q8_0(), prompt), "macs": dense_macs},
        "dense slicegpt q8_0 (sparsity 0, no rotation)": {"tok_s": decode_speed(ours_dense, prompt), "macs": dense_macs},
        f"sliced {tag} q8_0 (f16 shortcuts, the default)": {"tok_s": decode_speed(files["q8_0"], prompt), "macs": sliced_macs},
        f"sliced {tag} q8_0, q8_0 shortcuts": {"tok_s": decode_speed(files["q8_0, q8_0 shortcuts"], prompt), "macs": sliced_macs},
    }

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"llama_cpp-{tag}.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / f"llama_cpp-{tag}.md").write_text(markdown(result))
    print(markdown(result))


def markdown(r: dict) -> str:
    lines = [f"SmolLM2-135M-Instruct sliced at {r['sparsity']:g} (--round-to {r['round_to']}), llama.cpp (llama-cpp-python 0.3.36 + integrations/llama.cpp), CPU, {THREADS} threads.",
             "", "| file | perplexity | vs reference |", "|---|---|---|",
             f"| PyTorch reference | {r['reference_perplexity']:.3f} | |"]  # fmt: skip
    for kind, ppl in r["perplexity"].items():
        lines.append(f"| llama.cpp {kind} | {ppl:.3f} | {100 * (ppl / r['reference_perplexity'] - 1):+.2f}% |")
    dense = next(iter(r["decode"].values()))
    lines += ["", f"| model | MACs/token | bound | decode tok/s (b1, {PROMPT_TOKENS}+{NEW_TOKENS}) | speed-up | of bound |", "|---|---|---|---|---|---|"]
    for name, d in r["decode"].items():
        bound, speedup = dense["macs"] / d["macs"], d["tok_s"] / dense["tok_s"]
        lines.append(f"| {name} | {d['macs'] / 1e6:.1f}M | {bound:.2f}x | {d['tok_s']:.1f} | {speedup:.2f}x | {100 * speedup / bound:.0f}% |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
