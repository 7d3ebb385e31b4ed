"""SmolLM2 sliced at a sparsity, run by llama.cpp itself: perplexity against the reference, decode speed against dense.

    scripts/build_llama_cpp.sh && python bench/gguf_in_llama_cpp.py [--sparsity 0.25] [--out bench/results]

Perplexity on the README's measurement protocol (same token windows as the reference) for the f32 and
q8_0 files, q8_0 also with `--gguf-shortcut-type q8_0`; decode tokens/s (batch 1, 2 threads, 128
greedy tokens after a 128-token prompt, best of 3) of the sliced q8_0 files beside the dense
SmolLM2 as a stock `llama` q8_0 file (requantized by llama.cpp from the embedded Q4_1 GGUF) and
beside our dense export (fused, sparsity 0, no rotation) in the same build.  The bound is the
dense/sliced ratio of weight multiply-accumulates per token.

With llama.cpp's own programs (scripts/build_llama_cpp.sh builds them from the same patched tree): the same
four q8_0 files in one `llama-bench` run (pp128 and tg128, 2 threads, 5 repetitions, its default f16 KV
cache; `--poll 0`, threads sleeping between graphs as the bindings' do, since busy-waiting threads starve
each other on a shared CPU), and `llama-perplexity` over test.txt for the dense stock and sliced q8_0 files.  llama-perplexity
chunks the text its own way (the whole file tokenized, 512-token chunks, only the second half of each
chunk scored, the first 64 chunks here), so its figures are not the protocol's and compare only with each
other.  Writes llama_cpp-<sparsity>[-r<round-to>].json and .md.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DATA, WORK, sliced_checkpoint, test_windows, write_results
from onnx_speed import weight_macs_per_token

PROMPT_TOKENS = 128
NEW_TOKENS = 128
THREADS = 2
BENCH_REPETITIONS = 5
PERPLEXITY_CHUNKS = 64
FINAL_ESTIMATE = re.compile(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)")


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


def llama_bench(files: dict[str, Path], *, poll: int = 0) -> dict[str, dict]:
    """llama-bench over every file in one run: tokens/s (mean and standard deviation) of pp128 and tg128.  `poll`: how
    long (0-100) worker threads busy-wait for work before they sleep; 0 here by default, llama.cpp's own default is 50."""
    from slicegpt_export.validation.llama_cpp_tools import run_tool

    args = ["-o", "json", "-p", str(PROMPT_TOKENS), "-n", str(NEW_TOKENS), "-t", str(THREADS), "-r", str(BENCH_REPETITIONS),
            "--poll", str(poll)]  # fmt: skip
    for path in files.values():
        args += ["-m", str(path)]
    rows = json.loads(run_tool("llama-bench", args, timeout=3600).stdout)
    names = {str(path): name for name, path in files.items()}
    result: dict[str, dict] = {name: {} for name in files}
    for row in rows:
        test = f"pp{row['n_prompt']}" if row["n_gen"] == 0 else f"tg{row['n_gen']}"
        result[names[row["model_filename"]]][test] = {"tok_s": row["avg_ts"], "stddev": row["stddev_ts"]}
    return result


def llama_perplexity(path: Path) -> dict[str, float]:
    """llama-perplexity on test.txt with its own chunking (512-token chunks, second halves scored, the first 64)."""
    from slicegpt_export.validation.llama_cpp_tools import run_tool

    args = ["-m", str(path), "-f", str(DATA / "test.txt"), "-c", "512", "-b", "512", "-t", str(THREADS), "--poll", "0",
            "--chunks", str(PERPLEXITY_CHUNKS)]  # fmt: skip
    done = run_tool("llama-perplexity", args, timeout=3600)
    found = FINAL_ESTIMATE.search(done.stdout + done.stderr)
    if found is None:
        raise RuntimeError(f"llama-perplexity printed no final estimate for {path}")
    return {"perplexity": float(found.group(1)), "plus_minus": float(found.group(2))}


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
    timed = {  # name -> (file, weight MACs per token)
        "dense stock llama q8_0": (stock_dense_q8_0(), dense_macs),
        "dense slicegpt q8_0 (sparsity 0, no rotation)": (ours_dense, dense_macs),
        f"sliced {tag} q8_0 (f16 shortcuts, the default)": (files["q8_0"], sliced_macs),
        f"sliced {tag} q8_0, q8_0 shortcuts": (files["q8_0, q8_0 shortcuts"], sliced_macs),
    }
    result["decode"] = {name: {"tok_s": decode_speed(path, prompt), "macs": macs} for name, (path, macs) in timed.items()}
    result["llama_bench"] = llama_bench({name: path for name, (path, _) in timed.items()})
    perplexity_files = {"dense stock llama q8_0": timed["dense stock llama q8_0"][0], f"sliced {tag} q8_0": files["q8_0"],
                        f"sliced {tag} q8_0, q8_0 shortcuts": files["q8_0, q8_0 shortcuts"]}  # fmt: skip
    result["llama_perplexity"] = {name: llama_perplexity(path) for name, path in perplexity_files.items()}

    write_results(args.out, f"llama_cpp-{tag}", result, markdown(result))


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
    if "llama_bench" in r:
        lines += bench_markdown(r)
    return "\n".join(lines) + "\n"


def bench_markdown(r: dict) -> list[str]:
    """The llama-bench table (with the bindings' decode ratio beside tg) and the llama-perplexity table."""
    bench, decode = r["llama_bench"], r["decode"]
    dense_name = next(iter(bench))
    pp, tg = f"pp{PROMPT_TOKENS}", f"tg{NEW_TOKENS}"
    title = (f"llama-bench (same build, one run, {THREADS} threads, --poll 0, {BENCH_REPETITIONS} repetitions, "
             "f16 KV cache; tokens/s, mean ± sd):")  # fmt: skip
    lines = ["", title, "", f"| model | {pp} | {tg} | {tg} vs dense | bindings decode vs dense | ratio difference |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for name, b in bench.items():
        tg_ratio = b[tg]["tok_s"] / bench[dense_name][tg]["tok_s"]
        decode_ratio = decode[name]["tok_s"] / decode[dense_name]["tok_s"]
        speeds = f"{b[pp]['tok_s']:.1f} ± {b[pp]['stddev']:.1f} | {b[tg]['tok_s']:.1f} ± {b[tg]['stddev']:.1f}"
        lines.append(f"| {name} | {speeds} | {tg_ratio:.2f}x | {decode_ratio:.2f}x | {100 * (tg_ratio / decode_ratio - 1):+.1f}% |")
    title = (f"llama-perplexity on test.txt, its own chunking ({PERPLEXITY_CHUNKS} chunks of 512 tokens, second halves scored): "
             "not the protocol's figures, comparable only with each other:")  # fmt: skip
    lines += ["", title, "", "| file | perplexity | vs dense |", "|---|---|---|"]
    ppl = r["llama_perplexity"]
    dense_ppl = next(iter(ppl.values()))["perplexity"]
    for name, p in ppl.items():
        change = 100 * (p["perplexity"] / dense_ppl - 1)
        lines.append(f"| {name} | {p['perplexity']:.3f} ± {p['plus_minus']:.3f} | {change:+.1f}% |")
    return lines


if __name__ == "__main__":
    main()
