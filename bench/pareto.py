"""Perplexity against stored parameters and against measured decode speed, for every slicing mode (SmolLM2, the protocol).

    scripts/build_llama_cpp.sh && python bench/pareto.py [--rows paper:0.25,block-uniform:0.75,...] [--skip-speed] [--rounds 3]

Rows: paper-faithful slicing (`--sparsity s`: one basis per stage, uniform widths) at s = 0.1 ... 0.5,
and each budget mode (`--target-params R`: rotation x allocation) at R = 0.9, 0.8, 0.75, 0.6.  For each
row: stored parameters and weight multiply-accumulates per token against the dense model, perplexity
on the protocol (reference), and decode speed against the dense model exported the same way in the
same run: ONNX Runtime fp32 at batch 1 and 8 (dense = our fused dense graph, `--no-rotate`) and
llama.cpp q8_0 at batch 1 (dense = the embedded SmolLM2 requantized to q8_0 by llama.cpp itself,
stock `llama` architecture; llama.cpp's own llama-bench, tg128, every file in one invocation, and the Python
bindings' decode loop beside it, which adds a fixed cost per token, the same for every file), each beside its
bound (the dense/sliced ratio of weight MACs per token).
Also the llama.cpp perplexity of each default q8_0 file.  Perplexities are cached per row in
bench/work (they do not depend on the machine's load); speeds are measured afresh in every run, in --rounds
rounds (dense and every row in each), each speed-up against the dense model of its round: the table gives the
median over the rounds and the lowest and highest.
Writes pareto.json, pareto.md and pareto.png into --out.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import WORK, logger, protocol_checkpoint, sliced_checkpoint, spread, test_windows, write_results
from gguf_in_llama_cpp import NEW_TOKENS, THREADS, decode_speed, llama_bench, stock_dense_q8_0
from onnx_speed import PROMPT_LEN, Session, decode_tokens_per_second, weight_macs_per_token

PAPER = [0.1, 0.2, 0.25, 0.3, 0.5]
#: budget modes: slice_checkpoint options besides target_params
BUDGET_MODES = {
    "block-uniform": {"rotation": "block", "allocation": "uniform", "ffn_keep": 1.0},
    "block-spectrum": {"rotation": "block", "allocation": "spectrum", "ffn_keep": 1.0},
    "block-sensitivity": {"rotation": "block", "allocation": "sensitivity", "ffn_keep": 1.0},
    "stage-uniform": {"rotation": "stage", "allocation": "uniform", "ffn_keep": 1.0},
    "global-uniform": {"rotation": "global", "allocation": "uniform", "ffn_keep": 1.0},
    "block-uniform-ffn90": {"rotation": "block", "allocation": "uniform", "ffn_keep": 0.9},
    "block-uniform-ffn80": {"rotation": "block", "allocation": "uniform", "ffn_keep": 0.8},
    "block-uniform-ffn70": {"rotation": "block", "allocation": "uniform", "ffn_keep": 0.7},
    "block-uniform-ffn60": {"rotation": "block", "allocation": "uniform", "ffn_keep": 0.6},
    "block-uniform-ffn50": {"rotation": "block", "allocation": "uniform", "ffn_keep": 0.5},
    "block-sensitivity-ffn80": {"rotation": "block", "allocation": "sensitivity", "ffn_keep": 0.8},
    # MLP neurons only, as many as fit at full width: no PCA, no shortcut
    "mlp-only": {"rotation": "none", "allocation": "uniform"},
    # the same with the neurons ranked by their own output energy (--ffn-selection energy; every pruned row until 2026-11-27)
    "mlp-only-energy": {"rotation": "none", "allocation": "uniform", "ffn_selection": "energy"},
}
TARGETS = [0.9, 0.8, 0.75, 0.6]
DEFAULT_ROWS = [f"paper:{s:g}" for s in PAPER] + [f"{m}:{r:g}" for m in BUDGET_MODES for r in TARGETS]


def checkpoint_for(row: str) -> Path:
    mode, value = row.split(":")
    if mode == "paper":
        return sliced_checkpoint(float(value))
    return protocol_checkpoint(f"{mode}-{value}", target_params=float(value), **BUDGET_MODES[mode])


def quality(row: str, checkpoint: Path, windows: torch.Tensor) -> dict:
    """Size and reference perplexity of a row (cached beside the checkpoint)."""
    from slicegpt_export.checkpoint import load_sliced, read_config
    from slicegpt_export.validation.perplexity import perplexity

    cache = checkpoint / "pareto-quality.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    cfg, _ = read_config(checkpoint)
    model = load_sliced(checkpoint)
    widths = [cfg.embedding_width] + [w.mlp_out for w in cfg.layers]
    result = {
        "row": row, **cfg.size, "slicing": cfg.slicing,
        "widths": {"min": min(widths), "mean": sum(widths) / len(widths), "max": max(widths), "head_in": cfg.head_in},
        "perplexity": perplexity(lambda ids: model(ids).logits, windows, progress=True),
    }  # fmt: skip
    cache.write_text(json.dumps(result, indent=2))
    return result


def llama_cpp_perplexity(gguf_file: Path, windows: torch.Tensor) -> float:
    from slicegpt_export.validation.llama_cpp_runner import LlamaCppModel
    from slicegpt_export.validation.perplexity import perplexity

    cache = gguf_file.with_suffix(".ppl.json")
    if cache.is_file():
        return json.loads(cache.read_text())["perplexity"]
    model = LlamaCppModel(gguf_file, n_ctx=512, n_threads=THREADS)
    ppl = perplexity(model.logits, windows, batch_size=1, progress=True)
    model.close()
    cache.write_text(json.dumps({"perplexity": ppl}))
    return ppl


def exports(checkpoint: Path) -> tuple[Path, Path]:
    """The ONNX fp32 folder and the default q8_0 GGUF file of a checkpoint (cached; the GGUF under its variant's name,
    so a changed default is not read from a stale file)."""
    from slicegpt_export.exporters.onnx import export_onnx

    onnx_dir = checkpoint.with_name(checkpoint.name + "-onnx")
    if not (onnx_dir / "model.onnx").is_file():
        export_onnx(checkpoint=checkpoint, out=onnx_dir, overwrite=True)
    return onnx_dir, variant_file(checkpoint, *default_variant(checkpoint))


def variant_file(checkpoint: Path, residual_type: str, basis: str, tag: str = "", rounding: str = "least-squares") -> Path:
    """The q8_0 GGUF file with the residual path (shortcuts, tied projections) in `residual_type`, in `basis`, its blocks
    rounded as `rounding` says (exporters/quantize.py; cached)."""
    from slicegpt_export.exporters.gguf import export_gguf

    out = WORK / f"{checkpoint.name}-q8_0-residual-{residual_type}-{basis}-{rounding}{tag}"
    path = out / "model-q8_0.gguf"
    if not path.is_file():
        options = {"shortcut_type": residual_type, "basis": basis, "rounding": rounding}
        export_gguf(checkpoint=checkpoint, out=out, gguf_type="q8_0", overwrite=True, **options)
    return path


def default_variant(checkpoint: Path | None = None) -> tuple[str, str]:
    """(residual path type, basis) that export_gguf's defaults write in q8_0 for `checkpoint` (its own rules for both;
    no checkpoint: a rotated one)."""
    from slicegpt_export.checkpoint import read_config
    from slicegpt_export.exporters.gguf import GGUF_TYPES, file_basis, residual_path_type

    q8 = GGUF_TYPES["q8_0"][0]
    residual = residual_path_type("auto", q8)
    rotated = checkpoint is None or read_config(checkpoint)[0].rotated
    return ("f16" if residual is None else residual.name.lower()), file_basis(q8, residual, "auto", rotated=rotated)


def variant_name(residual_type: str, basis: str) -> str:
    return f"{residual_type}, {'PCA' if basis == 'pca' else basis}"


#: the other q8_0 file measured beside the default: the residual path in f16 (--gguf-shortcut-type f16, PCA basis)
F16_RESIDUAL = ("f16", "pca")


def speeds(onnx_dir: Path, gguf_file: Path, prompt: list[int]) -> dict:
    session = Session(onnx_dir)
    return {
        "onnx_b1": decode_tokens_per_second(session, 1),
        "onnx_b8": decode_tokens_per_second(session, 8),
        "llama_cpp_q8_0_bindings": decode_speed(gguf_file, prompt),
    }


def llama_bench_speeds(rows: list[dict], *, reverse: bool) -> dict[str, dict[str, float]]:
    """llama-bench tg128 tokens/s of the dense stock file and every row's q8_0 files, in one invocation (the same run),
    by name ("dense" or a row); `reverse`: in the opposite order, so that rounds in both orders cancel a drift of the
    machine's speed within an invocation."""
    files = {"dense": stock_dense_q8_0(), **{r["row"]: exports(checkpoint_for(r["row"]))[1] for r in rows},
             **{f"{r['row']} f16 residual": variant_file(checkpoint_for(r["row"]), *F16_RESIDUAL) for r in rows}}  # fmt: skip
    measured = llama_bench(dict(reversed(files.items())) if reverse else files)
    tok_s = {name: m[f"tg{NEW_TOKENS}"]["tok_s"] for name, m in measured.items()}
    return {"dense": {"llama_cpp_q8_0": tok_s["dense"]},
            **{r["row"]: {"llama_cpp_q8_0": tok_s[r["row"]], "llama_cpp_q8_0_f16_residual": tok_s[f"{r['row']} f16 residual"]}
               for r in rows}}  # fmt: skip


def speed_round(dense_onnx: Path, prompt: list[int], rows: list[dict], *, reverse: bool) -> dict[str, dict[str, float]]:
    """One round of every speed, tokens/s by name ("dense" or a row): the dense model and each row (ONNX b1 and b8,
    the bindings), then one llama-bench invocation over every file; `reverse`: in the opposite order."""
    files = {"dense": (dense_onnx, stock_dense_q8_0()), **{r["row"]: exports(checkpoint_for(r["row"])) for r in rows}}
    measured = {name: speeds(*files[name], prompt) for name in (reversed(files) if reverse else files)}
    for name, tok_s in llama_bench_speeds(rows, reverse=reverse).items():
        measured[name].update(tok_s)
    return measured


def speed_rounds(dense_onnx: Path, prompt: list[int], rows: list[dict], rounds: int) -> dict[str, list[float]]:
    """`rounds` rounds of speed_round, in alternating orders: each speed-up is taken against the dense model of its
    own round, so a change in the machine's load between rounds moves both.  Sets each row's `speed_rounds`
    (tokens/s per round) and `speedup` (median, min and max over the rounds); returns the dense tokens/s per round."""
    measured = []
    for n in range(rounds):
        measured.append(speed_round(dense_onnx, prompt, rows, reverse=n % 2 == 1))
        logger.info("speed round %d/%d: dense %s", n + 1, rounds, json.dumps(measured[-1]["dense"]))
    per_round = {name: {key: [m[name][key] for m in measured] for key in measured[0][name]} for name in measured[0]}
    for r in rows:
        r["speed_rounds"] = per_round[r["row"]]
        r["speedup"] = {}
        for key, values in r["speed_rounds"].items():
            ratios = [v / d for v, d in zip(values, per_round["dense"][DENSE_KEY.get(key, key)])]
            r["speedup"][key] = spread(ratios)
    return per_round["dense"]


#: the dense figure a speed is set against: the f16-residual file against the same dense q8_0 file as the default one
DENSE_KEY = {"llama_cpp_q8_0_f16_residual": "llama_cpp_q8_0"}


def fmt_speed(row: dict, key: str) -> str:
    """Median speed-up over the rounds, its fraction of the bound, and the range when there were several rounds."""
    if key not in row.get("speedup", {}):
        return "-"
    s = row["speedup"][key]
    spread = f"; {s['min']:.2f}-{s['max']:.2f}x" if s["max"] > s["min"] else ""
    return f"{s['median']:.2f}x ({s['median'] / row['bound']:.0%}{spread})"


def markdown(rows: list[dict], dense: dict | None) -> str:
    """The table; `dense`: the dense model's tokens/s per round (None: no speeds)."""
    lines = [
        "| slicing | widths min/mean/max (head) | stored params | vs dense | MACs/token vs dense = bound | perplexity "
        "| llama.cpp q8_0 ppl | ONNX fp32 b1 | ONNX fp32 b8 | llama.cpp q8_0 b1 (llama-bench) | llama.cpp q8_0 b1 (bindings) "
        "| llama.cpp q8_0, f16 residual path, b1 (llama-bench) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        w = r["widths"]
        speed = [
            fmt_speed(r, k)
            for k in ("onnx_b1", "onnx_b8", "llama_cpp_q8_0", "llama_cpp_q8_0_bindings", "llama_cpp_q8_0_f16_residual")
        ]
        lines.append(
            f"| {r['row']} | {w['min']}/{w['mean']:.0f}/{w['max']} ({w['head_in']}) | {r['parameters'] / 1e6:.1f}M "
            f"| {r['parameter_fraction']:.3f} | {r['mac_fraction']:.3f} = {r['bound']:.2f}x | {r['perplexity']:.2f} "
            f"| {format(r['llama_cpp_perplexity'], '.2f') if 'llama_cpp_perplexity' in r else '-'} | {' | '.join(speed)} |"
        )
    notes = [
        "",
        "Stored parameters count every tensor (a tied matrix once, shortcuts and projections included) against the dense",
        "model's 134.5M; the bound is dense/sliced weight MACs per token; speed-ups are against the dense model exported",
        "the same way and measured in the same round, with the fraction of the bound in brackets: the median over the",
        "rounds, and the lowest and highest round. llama.cpp files are the",
        f"default q8_0 export (residual path, basis: {variant_name(*default_variant())}; unrotated rows: their own basis); beside it the file with an f16",
        f"residual path ({variant_name(*F16_RESIDUAL)}: --gguf-shortcut-type f16; its perplexity: bench/residual_path.py).",
    ]
    if dense:

        def rate(key: str) -> str:
            return "/".join(f"{v:.1f}" for v in dense[key])

        notes.append(f"Dense decode in {len(dense['onnx_b1'])} rounds (tok/s per round): ONNX fp32 b1 {rate('onnx_b1')}, b8 {rate('onnx_b8')}; "
                     f"llama.cpp q8_0 (stock llama) {rate('llama_cpp_q8_0')} (llama-bench tg128), "
                     f"{rate('llama_cpp_q8_0_bindings')} (bindings).")  # fmt: skip
    return "\n".join(lines + notes) + "\n"


def plot(rows: list[dict], dense: dict | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 2 if dense else 1
    fig, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 4.5), squeeze=False)
    modes = sorted({r["row"].split(":")[0] for r in rows}, key=lambda m: (m != "paper", m))
    for mode in modes:
        mine = sorted((r for r in rows if r["row"].startswith(mode + ":")), key=lambda r: r["parameter_fraction"])
        axes[0][0].plot([r["parameter_fraction"] for r in mine], [r["perplexity"] for r in mine], marker="o", label=mode)
        if dense:
            xs = [r["speedup"]["llama_cpp_q8_0"]["median"] for r in mine]
            axes[0][1].plot(xs, [r["perplexity"] for r in mine], marker="o", label=mode)
    axes[0][0].set(xlabel="stored parameters / dense", ylabel="perplexity (WikiText-2 test)", title="Size")
    axes[0][0].axvline(1.0, color="gray", lw=0.5)
    if dense:
        axes[0][1].set(xlabel="llama.cpp q8_0 decode speed / dense (batch 1)", ylabel="perplexity", title="Speed")
        axes[0][1].axvline(1.0, color="gray", lw=0.5)
    for ax in axes[0]:
        ax.set_yscale("log")
        ax.legend()
    fig.tight_layout()
    from slicegpt_export.atomic import atomic_file

    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")


def main() -> None:
    from slicegpt_export.sources.tokenizer import load_tokenizer

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default=",".join(DEFAULT_ROWS))
    parser.add_argument("--skip-speed", action="store_true", help="sizes and perplexities only")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of speed measurement (each speed-up: the median over them)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_grad_enabled(False)

    dense_checkpoint = sliced_checkpoint(0.0, rotate=False)
    windows = test_windows(load_tokenizer(dense_checkpoint))
    dense_macs = weight_macs_per_token(dense_checkpoint)
    prompt = windows[0, :PROMPT_LEN].tolist()
    rows = []
    for row in args.rows.split(","):
        checkpoint = checkpoint_for(row)
        result = quality(row, checkpoint, windows)
        result["bound"] = dense_macs / result["macs_per_token"]
        if not args.skip_speed:
            result["llama_cpp_perplexity"] = llama_cpp_perplexity(exports(checkpoint)[1], windows)
        rows.append(result)
        print(json.dumps(result), file=sys.stderr)
    dense = None if args.skip_speed else speed_rounds(exports(dense_checkpoint)[0], prompt, rows, args.rounds)
    write_results(args.out, "pareto", {"dense": dense, "rows": rows}, markdown(rows, dense))
    plot(rows, dense, args.out / "pareto.png")


if __name__ == "__main__":
    main()
