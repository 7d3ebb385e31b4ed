"""What the residual path's type and basis cost in llama.cpp q8_0 files (SmolLM2, the protocol).

    scripts/build_llama_cpp.sh && python bench/residual_path.py [--rows paper:0.25,block-uniform-ffn60:0.75]

The residual path is the shortcut matrices and a tied model's embedding and head projections (they act
on the raw residual stream).  For each row (pareto.py's names) the q8_0 file is written five ways:
residual path f16 or q8_0, residual signals in the PCA basis or the incoherent one, and a q8_0 residual
path in the aligned basis with its shortcuts stored as corrections S - J (exporters/padding.py), every block
rounded as llama-quantize rounds it (what the exporter's default rounding changes: gguf_rounding.py); llama.cpp's
perplexity on the protocol's 64 test windows is set against the reference's.  Also the file size.  With
--seeds, the variants that draw random signs again with other signs (padding.INCOHERENCE_SEED), to show how
much the cost depends on the basis.  Perplexities are cached
beside each file in bench/work.  Writes residual_path.json and residual_path.md into --out.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import test_windows, write_results
from gguf_in_llama_cpp import stock_dense_q8_0
from pareto import WORK, checkpoint_for, default_variant, llama_cpp_perplexity, quality, variant_file, variant_name

#: name -> (residual path type, basis)
VARIANTS = {"f16, PCA": ("f16", "pca"), "f16, incoherent": ("f16", "incoherent"), "q8_0, PCA": ("q8_0", "pca"),
            "q8_0, incoherent": ("q8_0", "incoherent"), "q8_0, aligned": ("q8_0", "aligned")}  # fmt: skip
#: every variant's blocks rounded as llama-quantize rounds them (ggml's nearest rounding), so that the table shows the
#: residual path alone; what the exporter's default least-squares rounding changes: gguf_rounding.py
ROUNDING = "nearest"
#: the variants whose basis draws random signs, measured again with other signs by --seeds
SEEDED = ("f16, incoherent", "q8_0, incoherent", "q8_0, aligned")


@contextmanager
def incoherence_seed(seed: int) -> Iterator[None]:
    """Within the block, the incoherent basis draws its signs from `seed` (the exporter's constant restored after)."""
    from slicegpt_export.exporters import padding

    saved = padding.INCOHERENCE_SEED
    padding.INCOHERENCE_SEED = seed
    padding.incoherent_rotation.cache_clear()
    try:
        yield
    finally:
        padding.INCOHERENCE_SEED = saved
        padding.incoherent_rotation.cache_clear()


def seed_rows(row: str, checkpoint: Path, windows, seeds: list[int], names: list[str]) -> dict[str, dict[int, float]]:
    """llama.cpp perplexity of the seeded variants `names` with each seed's signs (files cached under their seed)."""
    result: dict[str, dict[int, float]] = {}
    for name in names:
        residual_type, basis = VARIANTS[name]
        for seed in seeds:
            with incoherence_seed(seed):
                path = variant_file(checkpoint, residual_type, basis, tag=f"-seed{seed}" if seed else "", rounding=ROUNDING)
            result.setdefault(name, {})[seed] = llama_cpp_perplexity(path, windows)
            print(json.dumps({row: {name: result[name]}}), file=sys.stderr)
    return result


def dense_q8_0_cost(windows: torch.Tensor) -> dict[str, float]:
    """Perplexity of the dense model (transformers, float32) and of llama.cpp's own q8_0 file of it (cached)."""
    from quality import dense_reference

    from slicegpt_export.validation.perplexity import perplexity

    cache = WORK / "llama-cpp-dense-stock" / "reference.ppl.json"
    if not cache.is_file():
        model = dense_reference(torch.device("cpu"))[0]
        cache.write_text(json.dumps({"perplexity": perplexity(lambda ids: model(ids).logits, windows, progress=True)}))
    reference = json.loads(cache.read_text())["perplexity"]
    return {"reference": reference, "q8_0": llama_cpp_perplexity(stock_dense_q8_0(), windows)}


def markdown(rows: list[dict], dense: dict[str, float] | None = None) -> str:
    lines = ["| slicing | reference | " + " | ".join(VARIANTS) + " | default |", "|---" * (len(VARIANTS) + 3) + "|"]
    for r in rows:
        cells = [f"{v['perplexity']:.2f} ({v['perplexity'] / r['reference'] - 1:+.2%}), {v['mib']:.1f} MiB" for v in r["variants"].values()]
        lines.append(f"| {r['row']} | {r['reference']:.2f} | {' | '.join(cells)} | {r['default']} |")
    notes = [
        "",
        "llama.cpp q8_0 perplexity on the protocol's 64 test windows (its change against the reference) and file size,",
        "for each type and basis of the residual path (shortcuts, tied projections); every other matrix is q8_0.",
        "Every block is rounded as llama-quantize rounds it (ggml's nearest rounding); the exporter's default rounds",
        "with a least-squares scale per block (gguf_rounding.md).",
    ]
    if dense:
        notes.append(f"The dense model in llama.cpp's own q8_0 (stock `llama`): {dense['q8_0']:.2f} against its reference "
                     f"{dense['reference']:.2f} ({dense['q8_0'] / dense['reference'] - 1:+.2%}).")
    for r in rows:
        for name, by_seed in r.get("seeds", {}).items():
            changes = ", ".join(f"seed {k}: {v / r['reference'] - 1:+.2%}" for k, v in by_seed.items())
            notes.append(f"{r['row']}, residual path and basis {name}, with the rotation's other signs: {changes}.")
    return "\n".join(lines + notes) + "\n"


def main() -> None:
    from slicegpt_export.sources.tokenizer import load_tokenizer

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="paper:0.25,block-uniform-ffn60:0.75")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--seeds", default="", help="comma-separated rotation seeds besides 0 (e.g. 1,2,3)")
    parser.add_argument("--seeded", default=";".join(SEEDED), help=f"which variants --seeds measures (';'-separated; default: {'; '.join(SEEDED)})")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    rows = []
    for row in args.rows.split(","):
        checkpoint = checkpoint_for(row)
        windows = test_windows(load_tokenizer(checkpoint))
        result = {"row": row, "reference": quality(row, checkpoint, windows)["perplexity"], "default": variant_name(*default_variant(checkpoint)), "variants": {}}
        for name, (residual_type, basis) in VARIANTS.items():
            path = variant_file(checkpoint, residual_type, basis, rounding=ROUNDING)
            result["variants"][name] = {"perplexity": llama_cpp_perplexity(path, windows), "mib": path.stat().st_size / 2**20}
            print(json.dumps({row: {name: result["variants"][name]}}), file=sys.stderr)
        if args.seeds:
            names = [name.strip() for name in args.seeded.split(";")]
            if unknown := [name for name in names if name not in SEEDED]:
                parser.error(f"--seeded: {', '.join(unknown)} draw no random signs (choose from {'; '.join(SEEDED)})")
            result["seeds"] = seed_rows(row, checkpoint, windows, [0] + [int(x) for x in args.seeds.split(",")], names)
        rows.append(result)
    dense = dense_q8_0_cost(windows)
    write_results(args.out, "residual_path", {"dense": dense, "rows": rows}, markdown(rows, dense))


if __name__ == "__main__":
    main()
