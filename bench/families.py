"""The families of issue 15 (Qwen3, SmolLM3, Phi-3, Gemma 2, Gemma 3) in every runtime, and what Gemma's post-norms cost.

    python bench/families.py --out bench/results        # about 2 minutes on 2 cores

1. Agreement, on the tiny random models of the test suite (tests/tiny.py): at sparsity 0 the
   fused, rotated reference against transformers (float32); at 0.25 every artifact against
   the sliced reference -- ONNX Runtime (prefill), the GGUF f32 file-only runner, llama.cpp
   (f32 file) -- as max |logit difference| on 8 random prompts of 32 tokens, and whether
   greedy continuations (16 tokens) agree with the reference's.
2. Stored parameters of Gemma 2 2B and Gemma 3 1B shapes (their published configs) at
   sparsity 0.25 (the paper's two shortcuts per block, and one), against the dense model, with post-norms as implemented (each a
   D x d matrix after a weightless norm, branch outputs D wide) and, for comparison, the
   count a pre-norm-only model of the same shape would store.  Counted in closed form
   (converter/budget.py, tested equal to written checkpoints); no weights are needed.

Writes families.json and families.md into --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from common import REPO, write_results

sys.path.insert(0, str(REPO / "tests"))

FAMILIES = ("qwen3", "smollm3", "phi3", "gemma2", "gemma3_text")
#: published shapes (Hugging Face config.json of google/gemma-2-2b and google/gemma-3-1b-pt)
GEMMA_SHAPES: dict[str, dict[str, Any]] = {
    "gemma-2-2b": {"model_type": "gemma2", "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
                   "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256, "vocab_size": 256000,
                   "query_pre_attn_scalar": 256, "sliding_window": 4096, "attn_logit_softcapping": 50.0,
                   "final_logit_softcapping": 30.0, "max_position_embeddings": 8192},
    "gemma-3-1b": {"model_type": "gemma3_text", "hidden_size": 1152, "intermediate_size": 6912, "num_hidden_layers": 26,
                   "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 256, "vocab_size": 262144,
                   "query_pre_attn_scalar": 256, "sliding_window": 512, "max_position_embeddings": 32768},
}  # fmt: skip


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def agreement(family: str, root: Path) -> dict[str, Any]:
    """max |logit diff| of every runtime against the reference, and greedy agreement, for one tiny family."""
    from test_families import calibration, source_of
    from tiny import VOCAB, tiny_hf_model, write_sliced_checkpoint

    from slicegpt_export.checkpoint import load_sliced
    from slicegpt_export.converter.convert import slice_source
    from slicegpt_export.exporters.gguf import export_gguf
    from slicegpt_export.exporters.onnx import export_onnx
    from slicegpt_export.modeling import generate
    from slicegpt_export.validation.gguf_runner import GGUFModel
    from slicegpt_export.validation.llama_cpp_runner import LlamaCppModel, llama_cpp_available
    from slicegpt_export.validation.onnx_runner import OnnxDecoder

    ids = torch.randint(0, VOCAB, (8, 32), generator=torch.Generator().manual_seed(3))
    hf = tiny_hf_model(family)
    dense, _ = slice_source(source_of(hf), calibration(), sparsity=0.0)
    row: dict[str, Any] = {"family": family, "transformers vs reference (sparsity 0)": max_diff(dense(ids).logits, hf(ids).logits)}
    checkpoint = write_sliced_checkpoint(family, 0.25, root / family / "checkpoint")
    reference = load_sliced(checkpoint)
    want = reference(ids).logits
    export_onnx(checkpoint=checkpoint, out=root / family / "onnx")
    gguf = export_gguf(checkpoint=checkpoint, out=root / family / "gguf", gguf_type="f32")
    row["onnx"] = max_diff(OnnxDecoder(root / family / "onnx").logits(ids), want)
    row["gguf f32 runner"] = max_diff(GGUFModel(gguf).logits(ids), want)
    prompt = ids[:1, :16]
    greedy = generate(reference, prompt, max_new_tokens=16)[0, 16:].tolist()
    if llama_cpp_available():
        llama = LlamaCppModel(gguf, n_ctx=64)
        row["llama.cpp"] = max_diff(llama.logits(ids), want)
        row["llama.cpp greedy = reference"] = llama.greedy(prompt[0].tolist(), 16) == greedy
    return row


def stored_parameters(name: str, shape: dict[str, Any], rotation: str) -> dict[str, Any]:
    """Dense, sliced (post-norms as implemented) and pre-norm-only counts of a Gemma shape at sparsity 0.25."""
    from slicegpt_export.converter.adapters import adapter_for
    from slicegpt_export.converter.budget import plan_cost, signal_count
    from slicegpt_export.converter.slicing import sliced_width

    cfg = adapter_for(shape).dense_config()
    cfg.tied_embeddings = True
    D, L = cfg.hidden_size, cfg.num_layers
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    norms = 4 * D * L + D + (2 * cfg.head_dim * L if cfg.qk_norm else 0)
    dense = cfg.vocab_size * D + L * (D * (q + 2 * kv) + q * D + 3 * D * cfg.intermediate_size) + norms
    d = sliced_width(D, 0.25, 8)
    widths = [d] * (signal_count(cfg, rotation) - 1) + [D]  # every signal d, the head D
    post = plan_cost(cfg, widths, rotation).parameters
    pre = plan_cost(dataclasses.replace(cfg, post_norms=False), widths, rotation).parameters
    return {"model": name, "rotation": rotation, "D": D, "d": d, "dense": dense, "sliced (post-norms)": post,
            "pre-norm-only equivalent": pre, "post-norm cost": post - pre}  # fmt: skip


def markdown(result: dict[str, Any]) -> str:
    lines = ["| family | transformers vs reference (sparsity 0) | ONNX Runtime | GGUF f32 runner | llama.cpp | llama.cpp greedy |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for r in result["agreement"]:
        lines.append(f"| {r['family']} | {r['transformers vs reference (sparsity 0)']:.1e} | {r['onnx']:.1e} | {r['gguf f32 runner']:.1e} "
                     f"| {r.get('llama.cpp', float('nan')):.1e} | {'same' if r.get('llama.cpp greedy = reference') else 'differs'} |")  # fmt: skip
    lines += ["", "Max |logit difference| on 8 random prompts of 32 tokens; runtimes at sparsity 0.25 against the sliced reference.", "",
              "| shape | rotation | D | d (0.25) | dense stored | sliced, post-norms as implemented | pre-norm-only equivalent | post-norm cost |",
              "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in result["parameters"]:
        lines.append(f"| {r['model']} | {r['rotation']} | {r['D']} | {r['d']} | {r['dense'] / 1e6:.1f}M | {r['sliced (post-norms)'] / 1e6:.1f}M "
                     f"({r['sliced (post-norms)'] / r['dense']:.3f}) | {r['pre-norm-only equivalent'] / 1e6:.1f}M "
                     f"({r['pre-norm-only equivalent'] / r['dense']:.3f}) | +{r['post-norm cost'] / 1e6:.1f}M |")  # fmt: skip
    lines += ["", "Sparsity 0.25, head kept at D, tied embedding counted once; rotation stage: the paper's two shortcuts per "
              "block, block: one (`--rotation block`)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [agreement(f, Path(tmp)) for f in FAMILIES]
    parameters = [stored_parameters(n, s, rotation) for n, s in GEMMA_SHAPES.items() for rotation in ("stage", "block")]
    result = {"agreement": rows, "parameters": parameters}
    write_results(args.out, "families", result, markdown(result))


if __name__ == "__main__":
    main()
