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
    sparsity: Annotated[float, typer.Option(help="Fraction of the hidden width to remove, in [0, 1).")] = 0.25,
    out: Annotated[Path, typer.Option(help="Output folder of the one-shot job.")] = Path("slicegpt-out"),
    calib: Annotated[list[str] | None, typer.Option(help=CALIB_HELP)] = None,
    calib_samples: Annotated[int, typer.Option(help="Number of calibration windows.")] = 128,
    calib_seqlen: Annotated[int, typer.Option(help="Tokens per calibration window.")] = 2048,
    calib_batch_size: Annotated[int, typer.Option(help="Windows per forward batch.")] = 8,
    seed: Annotated[int, typer.Option(help="Seed for drawing calibration windows.")] = 42,
    round_to: Annotated[int, typer.Option(help="Round sliced widths down to a multiple of this.")] = 8,
    recover: Annotated[int, typer.Option(help=RECOVER_HELP)] = 0,
    recover_loss: Annotated[str, typer.Option(help=RECOVER_LOSS_HELP)] = "kl",
    device: Annotated[str, typer.Option(help="auto, cpu or cuda[:N].")] = "auto",
    eval_text: Annotated[list[Path] | None, typer.Option(help="Evaluation text for perplexity, repeatable; python-stdlib is built in (else logits are compared on random tokens).")] = None,
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

    options = dict(round_to=round_to, calib=calib_option(calib), calib_samples=calib_samples, calib_seqlen=calib_seqlen,
                   calib_batch_size=calib_batch_size, seed=seed, device=device)  # fmt: skip
    if recover:
        options.update(recover_steps=recover, recover_loss=recover_loss)
    try:
        job = run_job(out=out, formats=format, model=model, sparsity=sparsity, eval_text=eval_text or None, slice_options=options,
                      precision=precision, quantize=quantize, gguf_type=gguf_type, gguf_shortcut_type=gguf_shortcut_type, sweep=parse_sweep(sweep),
                      tasks=tasks.split(",") if tasks else None)  # fmt: skip
    except KeyboardInterrupt:
        typer.echo("error: interrupted; finished stages are kept, the interrupted one left no output", err=True)
        raise typer.Exit(130) from None
    print_job_summary(job)


CALIB_HELP = ("Calibration source, repeatable as SOURCE[:WEIGHT] (windows shared in proportion to the weights): a .txt/.jsonl/.parquet "
              "file or folder, a HF dataset NAME[:CONFIG], or the built-ins self (text the model writes) and self-chat "
              "(its answers to the project's chat prompts).")  # fmt: skip
RECOVER_HELP = "Recovery fine-tuning steps after slicing (LoRA distillation from the dense model; 0: none; 150 recommended)."
RECOVER_LOSS_HELP = "Recovery loss: kl (distillation from the dense model) or ce (next-token cross-entropy, the paper's RFT)."


def calib_option(values: list[str] | None) -> str | list[str] | None:
    """One --calib value as a string (the protocol's form), several as a list, none as None."""
    if not values:
        return None
    return values[0] if len(values) == 1 else list(values)


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
    typer.echo(f"parameters: {cfg.dense_parameters:,} dense -> {job['parameters']:,} sliced (shortcuts and untied head included)")
    typer.echo(markdown_table(job["results"]))
    typer.echo("time per stage: " + ", ".join(f"{r.name} {'reused' if r.reused else f'{r.seconds:.1f} s'}" for r in job["records"]))
    typer.echo(f"report: {job['report']}")


def describe_widths(cfg: SlicedConfig) -> str:
    """'embedding 432 | attn in/out 432/432 ... | head 576' collapsed over identical layers."""
    layer_kinds = sorted({(w.attn_in, w.attn_out, w.mlp_in, w.mlp_out) for w in cfg.layers})
    layers = ", ".join(f"{a}/{b}/{c}/{d}" for a, b, c, d in layer_kinds)
    return f"D {cfg.hidden_size} | embedding {cfg.embedding_width} | layers attn_in/attn_out/mlp_in/mlp_out {layers} | head {cfg.head_in}"


@app.command("slice")
@one_line_errors
def slice_command(
    out: Annotated[Path, typer.Option(help="Output folder for the sliced checkpoint.")],
    sparsity: Annotated[float, typer.Option(help="Fraction of the hidden width to remove, in [0, 1).")] = 0.25,
    model: Annotated[str | None, typer.Option(help="HF folder, hub id or .gguf file (default: embedded SmolLM2-135M-Instruct).")] = None,
    round_to: Annotated[int, typer.Option(help="Round sliced widths down to a multiple of this.")] = 8,
    slice_head: Annotated[bool, typer.Option(help="Also slice the head input.")] = False,
    calib: Annotated[list[str] | None, typer.Option(help=CALIB_HELP)] = None,
    calib_samples: Annotated[int, typer.Option(help="Number of calibration windows.")] = 128,
    calib_seqlen: Annotated[int, typer.Option(help="Tokens per window (capped by the model's context).")] = 2048,
    calib_batch_size: Annotated[int, typer.Option(help="Windows per forward batch.")] = 8,
    seed: Annotated[int, typer.Option(help="Seed for drawing calibration windows.")] = 42,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda[:N].")] = "auto",
    dtype: Annotated[str, typer.Option(help="float32, float64, float16 or bfloat16.")] = "float32",
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output folder.")] = False,
    rotate: Annotated[bool, typer.Option(help="--no-rotate with --sparsity 0 writes the fused dense model (no PCA, no shortcuts).")] = True,
    recover: Annotated[int, typer.Option(help=RECOVER_HELP)] = 0,
    recover_loss: Annotated[str, typer.Option(help=RECOVER_LOSS_HELP)] = "kl",
) -> None:
    """Fuse, rotate and slice a model into a sliced checkpoint folder."""
    from slicegpt_export.converter.recovery import slice_and_recover

    summary, recovery = slice_and_recover(
        recover_steps=recover,
        recover_loss=recover_loss,
        model=model,
        out=out,
        sparsity=sparsity,
        round_to=round_to,
        slice_head=slice_head,
        calib=calib_option(calib),
        calib_samples=calib_samples,
        calib_seqlen=calib_seqlen,
        calib_batch_size=calib_batch_size,
        seed=seed,
        device=device,
        dtype=parse_dtype(dtype),
        overwrite=overwrite,
        rotate=rotate,
    )
    change = summary.params_after / summary.params_before - 1
    typer.echo(f"sliced checkpoint: {summary.out}")
    typer.echo(f"widths: {describe_widths(summary.config)}")
    typer.echo(
        f"parameters: {summary.params_before:,} before -> {summary.params_after:,} after ({change:+.1%}, "
        f"shortcuts and untied head included)"
    )
    typer.echo(f"time: {summary.seconds:.1f} s, peak resident memory {summary.peak_rss_mb:,.0f} MiB")
    if recovery is not None:
        echo_recovery(recovery)


def echo_recovery(result: Any) -> None:
    s = result.settings
    typer.echo(f"recovery: {s.steps} steps ({s.loss}) in {result.seconds:.1f} s, {s.loss} {result.first_loss:.4f} -> {result.last_loss:.4f}, "
               f"{result.trainable_parameters:,} trained parameters merged into the weights")  # fmt: skip


@app.command("recover")
@one_line_errors
def recover_command(
    checkpoint: Annotated[Path, typer.Argument(help="A sliced checkpoint folder (its dense source must be at hand: it is the teacher).")],
    out: Annotated[Path, typer.Option(help="Output folder for the recovered checkpoint.")],
    steps: Annotated[int, typer.Option(help="Training steps of 2 windows each.")] = 150,
    loss: Annotated[str, typer.Option(help=RECOVER_LOSS_HELP)] = "kl",
    calib: Annotated[list[str] | None, typer.Option(help="Training text as for slice --calib (default: the checkpoint's calibration).")] = None,
    calib_samples: Annotated[int | None, typer.Option(help="Number of training windows (default: the checkpoint's calibration).")] = None,
    calib_seqlen: Annotated[int | None, typer.Option(help="Tokens per window (default: the checkpoint's calibration).")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed (default: the checkpoint's calibration seed).")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda[:N].")] = "auto",
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output folder.")] = False,
) -> None:
    """Recovery fine-tuning: LoRA adapters trained to follow the dense model, merged into an ordinary sliced checkpoint."""
    from slicegpt_export.converter.recovery import recover_checkpoint

    result = recover_checkpoint(checkpoint=checkpoint, out=out, steps=steps, loss=loss, calib=calib_option(calib), calib_samples=calib_samples,
                                calib_seqlen=calib_seqlen, seed=seed, device=device, overwrite=overwrite)  # fmt: skip
    typer.echo(f"recovered checkpoint: {out}")
    echo_recovery(result)


@app.command("perplexity")
@one_line_errors
def perplexity_command(
    path: Annotated[str, typer.Argument(help="A sliced checkpoint folder, or a source model (folder or .gguf) for the dense figure.")],
    text: Annotated[list[Path], typer.Option(help="Evaluation text (.txt/.jsonl/.parquet file or folder, or the built-in python-stdlib); repeatable.")],
    seqlen: Annotated[int, typer.Option(help="Tokens per window.")] = 512,
    windows: Annotated[int | None, typer.Option(help="Number of consecutive windows (default: all).")] = 64,
    batch_size: Annotated[int, typer.Option(help="Windows per batch.")] = 8,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda[:N].")] = "auto",
) -> None:
    """Perplexity of a sliced checkpoint (or a dense source model) on consecutive windows of each text."""
    from slicegpt_export.validation.runners import reference_perplexities

    ppls = reference_perplexities(path, texts=text, seqlen=seqlen, windows=windows, batch_size=batch_size, device=device)
    for name, ppl in ppls.items():
        typer.echo(f"perplexity: {ppl:.4f}" if len(ppls) == 1 else f"perplexity ({name}): {ppl:.4f}")


@app.command("validate")
@one_line_errors
def validate_command(
    directory: Annotated[Path, typer.Argument(help="A folder holding a sliced checkpoint and its exports (one level deep).")],
    text: Annotated[list[Path] | None, typer.Option(help="Evaluation text for perplexity (a file, folder or python-stdlib); repeatable.")] = None,
    seqlen: Annotated[int, typer.Option(help="Tokens per window.")] = 512,
    windows: Annotated[int | None, typer.Option(help="Number of consecutive windows.")] = 64,
    sweep: Annotated[str | None, typer.Option(help="Also slice at these sparsities, e.g. 0.1,0.2,0.3.")] = None,
    fidelity: Annotated[bool, typer.Option(help="Compare with the dense source on held-out chat prompts (fidelity, greedy answers).")] = True,
) -> None:
    """Perplexity and logit agreement of every artifact found; writes report.md, report.json and plots."""
    from slicegpt_export.pipeline import sweep_sparsities
    from slicegpt_export.validation.fidelity import quality_beyond_calibration
    from slicegpt_export.validation.report import find_artifacts, markdown_table, quality_markdown, validate_directory, write_report

    sparsities = parse_sweep(sweep)
    if sparsities and not text:
        raise SliceGPTError("--sweep needs --text")
    results = validate_directory(directory, text=text, seqlen=seqlen, windows=windows)
    checkpoint = find_artifacts(directory).checkpoint
    rows = sweep_sparsities(checkpoint, sparsities, text=text[0], out=directory / "sweep", seqlen=seqlen, windows=windows) if sparsities else None
    quality = quality_beyond_calibration(checkpoint) if fidelity else None
    report = write_report(directory, results, checkpoint=checkpoint, sweep=rows, extra={"quality": quality})
    typer.echo(markdown_table(results))
    if quality:
        typer.echo("\n".join(quality_markdown(quality)))
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
