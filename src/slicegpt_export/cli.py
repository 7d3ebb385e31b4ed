"""Command line: thin typer commands over the keyword-only library functions."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import torch
import typer

from slicegpt_export.checkpoint import SlicedConfig
from slicegpt_export.errors import SliceGPTError

app = typer.Typer(
    help="Slice Hugging Face models with SliceGPT and export them for ONNX Runtime and GGUF toolchains.",
    pretty_exceptions_enable=False,
    no_args_is_help=True,
)
logger = logging.getLogger("slicegpt_export")

DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}
F = TypeVar("F", bound=Callable[..., Any])


def one_line_errors(fn: F) -> F:
    """Turn a SliceGPTError into `error: ...` on stderr and exit status 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except SliceGPTError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise SliceGPTError(f"unknown dtype {name!r} (choose from {', '.join(DTYPES)})")
    return DTYPES[name]


@app.callback(invoke_without_command=True)
@one_line_errors
def main(
    ctx: typer.Context,
    format: Annotated[str | None, typer.Option("--format", help="One-shot job: slice, export onnx|gguf|all, validate, report.")] = None,
    model: Annotated[str | None, typer.Option(help="HF folder, hub id or .gguf file (default: embedded SmolLM2-135M-Instruct).")] = None,
    sparsity: Annotated[float | None, typer.Option(help=SPARSITY_HELP)] = None,
    target_params: Annotated[float | None, typer.Option(help=TARGET_HELP)] = None,
    rotation: Annotated[str | None, typer.Option(help=ROTATION_HELP)] = None,
    allocation: Annotated[str, typer.Option(help=ALLOCATION_HELP)] = "uniform",
    ffn_keep: Annotated[float, typer.Option(help=FFN_KEEP_HELP)] = 1.0,
    embed_keep: Annotated[float, typer.Option(help=EMBED_KEEP_HELP)] = 1.0,
    out: Annotated[Path, typer.Option(help="Output folder of the one-shot job.")] = Path("slicegpt-out"),
    calib: Annotated[str | None, typer.Option(help="Calibration text (file, folder or dataset).")] = None,
    calib_samples: Annotated[int, typer.Option(help="Number of calibration windows.")] = 128,
    calib_seqlen: Annotated[int, typer.Option(help="Tokens per calibration window.")] = 2048,
    calib_batch_size: Annotated[int, typer.Option(help="Windows per forward batch.")] = 8,
    seed: Annotated[int, typer.Option(help="Seed for drawing calibration windows.")] = 42,
    round_to: Annotated[int, typer.Option(help="Round sliced widths down to a multiple of this.")] = 8,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda[:N].")] = "auto",
    eval_text: Annotated[Path | None, typer.Option(help="Evaluation text for perplexity (else logits are compared on random tokens).")] = None,
    precision: Annotated[str, typer.Option(help="ONNX: fp32 or fp16.")] = "fp32",
    quantize: Annotated[str | None, typer.Option(help="ONNX: int8 or int4 weight-only.")] = None,
    gguf_type: Annotated[str, typer.Option(help="GGUF: f32, f16, bf16, q8_0 or q4_0.")] = "f16",
    gguf_shortcut_type: Annotated[str, typer.Option(help="GGUF shortcut matrices: auto (f16 in q8_0/q4_0 files) or a type; q8_0 decodes faster, costs perplexity.")] = "auto",
    sweep: Annotated[str | None, typer.Option(help="Also slice at these sparsities, e.g. 0.1,0.2,0.3, for the sweep plot.")] = None,
    tasks: Annotated[str | None, typer.Option(help="Zero-shot lm-eval-harness tasks, e.g. piqa,arc_easy (needs lm-eval).")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
) -> None:
    """Slice Hugging Face models with SliceGPT and export them for ONNX Runtime and GGUF toolchains.

    With --format and no command, runs the whole job into --out: slice, export, validate, report.
    """
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if ctx.invoked_subcommand is not None:
        return
    if format is None:
        typer.echo(ctx.get_help())
        raise typer.Exit(0)
    from slicegpt_export.pipeline import run_job

    options = dict(round_to=round_to, calib=calib, calib_samples=calib_samples, calib_seqlen=calib_seqlen,
                   calib_batch_size=calib_batch_size, seed=seed, device=device, **budget_options(target_params, rotation, allocation, ffn_keep, embed_keep))  # fmt: skip
    try:
        job = run_job(out=out, formats=format, model=model, sparsity=paper_sparsity(sparsity, target_params), eval_text=eval_text, slice_options=options,
                      precision=precision, quantize=quantize, gguf_type=gguf_type, gguf_shortcut_type=gguf_shortcut_type, sweep=parse_sweep(sweep),
                      tasks=tasks.split(",") if tasks else None)  # fmt: skip
    except KeyboardInterrupt:
        typer.echo("error: interrupted; finished stages are kept, the interrupted one left no output", err=True)
        raise typer.Exit(130) from None
    print_job_summary(job)


SPARSITY_HELP = "The paper's slicing fraction of the hidden width, in [0, 1) (default 0.25 unless --target-params)."
TARGET_HELP = ("Stored-parameter budget R in (0, 1): the sliced model holds at most R x the dense model's stored "
               "parameters (every tensor, tied ones once); widths are chosen to fit.")  # fmt: skip
ALLOCATION_HELP = ("How a --target-params budget is spread over layers: uniform (one width), sensitivity (measured per layer) "
                   "or spectrum (from the PCA spectra).")  # fmt: skip
ROTATION_HELP = ("stage: a basis per attention/MLP output, two shortcuts per block (the paper); block: one shortcut per block; "
                 "global: one basis, no shortcut. Default: stage for --sparsity, block for --target-params.")  # fmt: skip
FFN_KEEP_HELP = "Fraction of every MLP's neurons to keep (the down projection refitted by least squares)."
EMBED_KEEP_HELP = "Fraction of a tied embedding matrix's columns to keep (tied models only)."
DEFAULT_SPARSITY = 0.25


def paper_sparsity(sparsity: float | None, target_params: float | None) -> float:
    """--sparsity as given, its default without a budget, 0 with one (the library refuses both together)."""
    if sparsity is not None:
        return sparsity
    return 0.0 if target_params is not None else DEFAULT_SPARSITY


def budget_options(target_params: float | None, rotation: str | None, allocation: str, ffn_keep: float, embed_keep: float) -> dict[str, Any]:
    return {"target_params": target_params, "rotation": rotation, "allocation": allocation, "ffn_keep": ffn_keep, "embed_keep": embed_keep}


def describe_size(cfg: SlicedConfig) -> str:
    """The paper's slicing fraction beside the honest ones: stored parameters and weight MACs per token vs dense."""
    size = cfg.size
    return (f"slicing fraction {cfg.sparsity:.3f} of the width (the paper's measure); stored parameters "
            f"{size['dense_parameters'] / 1e6:.1f}M dense -> {size['parameters'] / 1e6:.1f}M ({size['parameter_fraction']:.3f} of dense, "
            f"every tensor, tied ones once); weight MACs/token {size['dense_macs_per_token'] / 1e6:.1f}M -> "
            f"{size['macs_per_token'] / 1e6:.1f}M ({size['mac_fraction']:.3f})")  # fmt: skip


def parse_sweep(text: str | None) -> list[float] | None:
    if not text:
        return None
    try:
        return [float(x) for x in text.split(",")]
    except ValueError as exc:
        raise SliceGPTError(f"--sweep takes comma-separated sparsities, got {text!r}") from exc


def print_job_summary(job: dict[str, Any]) -> None:
    from slicegpt_export.validation.report import markdown_table

    cfg = job["config"]
    typer.echo("")
    typer.echo(f"widths: {describe_widths(cfg)}")
    typer.echo(f"size: {describe_size(cfg)}")
    typer.echo(markdown_table(job["results"]))
    typer.echo("time per stage: " + ", ".join(f"{r.name} {'reused' if r.reused else f'{r.seconds:.1f} s'}" for r in job["records"]))
    typer.echo(f"report: {job['report']}")


def describe_widths(cfg: SlicedConfig) -> str:
    """'embedding 432 | attn in/out 432/432 ... | head 576' collapsed over identical layers."""
    layer_kinds = sorted({(w.attn_in, w.attn_out, w.mlp_in, w.mlp_out) for w in cfg.layers})
    if len(layer_kinds) <= 3:
        layers = "layers attn_in/attn_out/mlp_in/mlp_out " + ", ".join(f"{a}/{b}/{c}/{d}" for a, b, c, d in layer_kinds)
    else:  # per-layer widths (a budget's allocation): each block's output width
        layers = "block outputs " + " ".join(str(w.mlp_out) for w in cfg.layers)
    return f"D {cfg.hidden_size} | embedding {cfg.embedding_width} | {layers} | head {cfg.head_in}"


@app.command("slice")
@one_line_errors
def slice_command(
    out: Annotated[Path, typer.Option(help="Output folder for the sliced checkpoint.")],
    sparsity: Annotated[float | None, typer.Option(help=SPARSITY_HELP)] = None,
    target_params: Annotated[float | None, typer.Option(help=TARGET_HELP)] = None,
    rotation: Annotated[str | None, typer.Option(help=ROTATION_HELP)] = None,
    allocation: Annotated[str, typer.Option(help=ALLOCATION_HELP)] = "uniform",
    ffn_keep: Annotated[float, typer.Option(help=FFN_KEEP_HELP)] = 1.0,
    embed_keep: Annotated[float, typer.Option(help=EMBED_KEEP_HELP)] = 1.0,
    model: Annotated[str | None, typer.Option(help="HF folder, hub id or .gguf file (default: embedded SmolLM2-135M-Instruct).")] = None,
    round_to: Annotated[int, typer.Option(help="Round sliced widths down to a multiple of this.")] = 8,
    slice_head: Annotated[bool, typer.Option(help="Also slice the head input.")] = False,
    calib: Annotated[str | None, typer.Option(help="Calibration .txt/.jsonl/.parquet file or folder, or a HF dataset NAME[:CONFIG].")] = None,
    calib_samples: Annotated[int, typer.Option(help="Number of calibration windows.")] = 128,
    calib_seqlen: Annotated[int, typer.Option(help="Tokens per window (capped by the model's context).")] = 2048,
    calib_batch_size: Annotated[int, typer.Option(help="Windows per forward batch.")] = 8,
    seed: Annotated[int, typer.Option(help="Seed for drawing calibration windows.")] = 42,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda[:N].")] = "auto",
    dtype: Annotated[str, typer.Option(help="float32, float64, float16 or bfloat16.")] = "float32",
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output folder.")] = False,
    rotate: Annotated[bool, typer.Option(help="--no-rotate with --sparsity 0 writes the fused dense model (no PCA, no shortcuts).")] = True,
) -> None:
    """Fuse, rotate and slice a model into a sliced checkpoint folder."""
    from slicegpt_export.converter.convert import slice_checkpoint

    summary = slice_checkpoint(
        model=model,
        out=out,
        sparsity=paper_sparsity(sparsity, target_params),
        **budget_options(target_params, rotation, allocation, ffn_keep, embed_keep),
        round_to=round_to,
        slice_head=slice_head,
        calib=calib,
        calib_samples=calib_samples,
        calib_seqlen=calib_seqlen,
        calib_batch_size=calib_batch_size,
        seed=seed,
        device=device,
        dtype=parse_dtype(dtype),
        overwrite=overwrite,
        rotate=rotate,
    )
    typer.echo(f"sliced checkpoint: {summary.out}")
    typer.echo(f"widths: {describe_widths(summary.config)}")
    typer.echo(f"size: {describe_size(summary.config)}")
    typer.echo(f"time: {summary.seconds:.1f} s, peak resident memory {summary.peak_rss_mb:,.0f} MiB")


@app.command("perplexity")
@one_line_errors
def perplexity_command(
    path: Annotated[str, typer.Argument(help="A sliced checkpoint folder, or a source model (folder or .gguf) for the dense figure.")],
    text: Annotated[Path, typer.Option(help="Evaluation text (.txt/.jsonl/.parquet file or folder).")],
    seqlen: Annotated[int, typer.Option(help="Tokens per window.")] = 512,
    windows: Annotated[int | None, typer.Option(help="Number of consecutive windows (default: all).")] = 64,
    batch_size: Annotated[int, typer.Option(help="Windows per batch.")] = 8,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda[:N].")] = "auto",
) -> None:
    """Perplexity of a sliced checkpoint (or a dense source model) on consecutive windows of a text."""
    from slicegpt_export.validation.runners import reference_perplexity

    ppl = reference_perplexity(path, text=text, seqlen=seqlen, windows=windows, batch_size=batch_size, device=device)
    typer.echo(f"perplexity: {ppl:.4f}")


@app.command("validate")
@one_line_errors
def validate_command(
    directory: Annotated[Path, typer.Argument(help="A folder holding a sliced checkpoint and its exports (one level deep).")],
    text: Annotated[Path | None, typer.Option(help="Evaluation text for perplexity.")] = None,
    seqlen: Annotated[int, typer.Option(help="Tokens per window.")] = 512,
    windows: Annotated[int | None, typer.Option(help="Number of consecutive windows.")] = 64,
    sweep: Annotated[str | None, typer.Option(help="Also slice at these sparsities, e.g. 0.1,0.2,0.3.")] = None,
) -> None:
    """Perplexity and logit agreement of every artifact found; writes report.md, report.json and plots."""
    from slicegpt_export.pipeline import sweep_sparsities
    from slicegpt_export.validation.report import find_artifacts, markdown_table, validate_directory, write_report

    sparsities = parse_sweep(sweep)
    if sparsities and text is None:
        raise SliceGPTError("--sweep needs --text")
    results = validate_directory(directory, text=text, seqlen=seqlen, windows=windows)
    checkpoint = find_artifacts(directory).checkpoint
    rows = sweep_sparsities(checkpoint, sparsities, text=text, out=directory / "sweep", seqlen=seqlen, windows=windows) if sparsities else None
    report = write_report(directory, results, checkpoint=checkpoint, sweep=rows)
    typer.echo(markdown_table(results))
    typer.echo(f"report: {report}")


@app.command("export")
@one_line_errors
def export_command(
    checkpoint: Annotated[Path, typer.Argument(help="A sliced checkpoint folder.")],
    out: Annotated[Path, typer.Option(help="Output folder.")],
    format: Annotated[str, typer.Option("--format", help="onnx or gguf.")] = "onnx",
    precision: Annotated[str, typer.Option(help="ONNX: fp32 (CPU) or fp16 (CUDA).")] = "fp32",
    quantize: Annotated[str | None, typer.Option(help="ONNX: weight-only int8 or int4 (MatMulNBits).")] = None,
    gguf_type: Annotated[str, typer.Option(help="GGUF: f32, f16, bf16, q8_0 or q4_0.")] = "f16",
    gguf_shortcut_type: Annotated[str, typer.Option(help="GGUF shortcut matrices: auto (f16 in q8_0/q4_0 files) or a type; q8_0 decodes faster, costs perplexity.")] = "auto",
    validate: Annotated[bool, typer.Option(help="Compare the artifact with the PyTorch reference after export.")] = True,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output folder.")] = False,
) -> None:
    """Export a sliced checkpoint; then validate it against the PyTorch reference."""
    from slicegpt_export.pipeline import export_validated

    export_validated(
        format=format, checkpoint=checkpoint, out=out, precision=precision, quantize=quantize, gguf_type=gguf_type,
        gguf_shortcut_type=gguf_shortcut_type, validate=validate, overwrite=overwrite,
    )  # fmt: skip
    typer.echo(f"{format} export: {out}")


if __name__ == "__main__":
    app()
