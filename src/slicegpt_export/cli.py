"""Command line: thin typer commands over the keyword-only library functions."""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import logging
import sys
import warnings
from collections.abc import Callable, Iterator
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
    rich_markup_mode=None,  # plain help: flags without a <bool> type column
    subcommand_metavar="[COMMAND [ARGS]...]",  # the one-shot form takes no command
)
PACKAGE = "slicegpt_export"
logger = logging.getLogger(PACKAGE)
#: libraries that log through handlers of their own instead of (only) the root logger's
SELF_HANDLING_LOGGERS = ("transformers", "huggingface_hub")

DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}
F = TypeVar("F", bound=Callable[..., Any])


def is_ours(record: logging.LogRecord) -> bool:
    return record.name == PACKAGE or record.name.startswith(PACKAGE + ".")


class CliLogFilter(logging.Filter):
    """This package's records from INFO (DEBUG with --verbose); other libraries' only from ERROR (INFO with --verbose)."""

    def __init__(self, verbose: bool) -> None:
        super().__init__()
        self.verbose = verbose

    def filter(self, record: logging.LogRecord) -> bool:
        if is_ours(record):
            return record.levelno >= (logging.DEBUG if self.verbose else logging.INFO)
        return record.levelno >= (logging.INFO if self.verbose else logging.ERROR)


class CliLogFormatter(logging.Formatter):
    """Our progress lines as plain text; anything else prefixed with its level (and its library when not ours)."""

    def format(self, record: logging.LogRecord) -> str:
        message = super().format(record)
        if is_ours(record):
            return message if record.levelno == logging.INFO else f"{record.levelname.lower()}: {message}"
        return f"{record.levelname.lower()} ({record.name}): {message}"


@contextlib.contextmanager
def cli_output(verbose: bool) -> Iterator[None]:
    """Logging and warnings for one command: ours readable, other libraries' kept below ERROR unless `verbose`.

    Everything is put back when the command ends (the handler removed, levels and warning filters restored).
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(CliLogFilter(verbose))
    handler.setFormatter(CliLogFormatter())
    root = logging.getLogger()
    saved = {name: logging.getLogger(name).level for name in ("", PACKAGE, *SELF_HANDLING_LOGGERS)}
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    if not verbose:
        for name in SELF_HANDLING_LOGGERS:
            logging.getLogger(name).setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            if not verbose:
                warnings.filterwarnings("ignore")
                warnings.filterwarnings("default", module=rf"{PACKAGE}(\.|$)")
            yield
    finally:
        root.removeHandler(handler)
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


def show_version(value: bool) -> None:
    if value:
        typer.echo(f"slicegpt-export {importlib.metadata.version('slicegpt-export')}")
        raise typer.Exit(0)


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


def parse_checkpoint_dtype(name: str) -> torch.dtype | None:
    """--dtype of a written checkpoint: `source` (None) keeps the source's."""
    return None if name == "source" else parse_dtype(name)


def without_option(argv: list[str], name: str) -> list[str]:
    """argv with `--name VALUE` / `--name=VALUE` taken out."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == name:
            skip = True
        elif not arg.startswith(f"{name}="):
            out.append(arg)
    return out


def relaunch_with_torchrun(nproc: int) -> int:
    """This command again under torchrun with `nproc` processes on this machine; their exit status."""
    import subprocess

    argv = without_option(sys.argv[1:], "--nproc")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m", "slicegpt_export.cli", *argv]
    return subprocess.run(cmd, check=False).returncode


GGUF_ARCH_HELP = ("GGUF architecture: stock (the family's own, for any llama.cpp: Llama, Mistral and Qwen2 checkpoints that kept every width and one MLP "
                  "width, as --target-params makes them by default), slicegpt (any slicing; llama.cpp built by scripts/build_llama_cpp.sh), "
                  "or auto: stock where it holds the checkpoint.")
MODEL_HELP = "HF folder, hub id or .gguf file (default: the embedded SmolLM2-135M-Instruct)."
CALIB_HELP = "Calibration text: a .txt/.jsonl/.parquet file or folder, or a HF dataset NAME[:CONFIG] (default: WikiText-2 from the hub, else text sampled from the model)."
SAMPLES_HELP = "Number of calibration windows (default: 64 on CPU, the paper's 128 on CUDA)."
SEQLEN_HELP = "Tokens per calibration window, capped by the model's context (default: 512 on CPU, the paper's 2048 on CUDA)."
SWEEP_HELP = ("Also slice the checkpoint's source model again at these sparsities, e.g. 0.1,0.2,0.3, with the checkpoint's own "
              "calibration (same text, windows and seed), and plot perplexity and parameters against sparsity.")  # fmt: skip
WINDOWS_HELP = "Number of consecutive evaluation windows; 0 for every complete window of the text."


@app.callback(invoke_without_command=True)
@one_line_errors
def main(
    ctx: typer.Context,
    format: Annotated[str | None, typer.Option("--format", help="Run the whole job into --out: slice the model, export it as onnx, gguf or all (both), validate every artifact against the PyTorch reference and write report.md with plots.")] = None,
    model: Annotated[str | None, typer.Option(help=MODEL_HELP)] = None,
    sparsity: Annotated[float | None, typer.Option(help=SPARSITY_HELP)] = None,
    target_params: Annotated[float | None, typer.Option(help=TARGET_HELP)] = None,
    rotation: Annotated[str | None, typer.Option(help=ROTATION_HELP)] = None,
    allocation: Annotated[str, typer.Option(help=ALLOCATION_HELP)] = "uniform",
    ffn_keep: Annotated[float | None, typer.Option(help=FFN_KEEP_HELP)] = None,
    ffn_selection: Annotated[str, typer.Option(help=FFN_SELECTION_HELP)] = "obs",
    embed_keep: Annotated[float, typer.Option(help=EMBED_KEEP_HELP)] = 1.0,
    out: Annotated[Path, typer.Option(help="Output folder of the one-shot job (new, empty, or an earlier run's: finished stages with the same inputs are reused).")] = Path("slicegpt-out"),
    calib: Annotated[list[str] | None, typer.Option(help=CALIB_HELP)] = None,
    calib_samples: Annotated[int | None, typer.Option(help=SAMPLES_HELP)] = None,
    calib_seqlen: Annotated[int | None, typer.Option(help=SEQLEN_HELP)] = None,
    calib_batch_size: Annotated[int, typer.Option(help="Windows per forward batch.")] = 8,
    seed: Annotated[int, typer.Option(help="Seed for drawing calibration windows.")] = 42,
    round_to: Annotated[int, typer.Option(help="Round sliced widths down to a multiple of this (32 for q8_0/q4_0 GGUF).")] = 8,
    slice_head: Annotated[bool, typer.Option("--slice-head", help="Also slice the head input.")] = False,
    no_rotate: Annotated[bool, typer.Option("--no-rotate", help="With --sparsity 0: keep the fused dense model (no PCA, no shortcuts).")] = False,
    recover: Annotated[int, typer.Option(help=RECOVER_HELP)] = 0,
    recover_loss: Annotated[str, typer.Option(help=RECOVER_LOSS_HELP)] = "kl",
    device: Annotated[str, typer.Option(help="auto, cpu or cuda[:N].")] = "auto",
    dtype: Annotated[str, typer.Option(help="Slicing dtype: float32, float64, float16 or bfloat16.")] = "float32",
    eval_text: Annotated[list[Path] | None, typer.Option(help="Evaluation text for perplexity, repeatable; python-stdlib is built in (else logits are compared on random tokens).")] = None,
    precision: Annotated[str, typer.Option(help="ONNX: fp32 or fp16.")] = "fp32",
    quantize: Annotated[str | None, typer.Option(help="ONNX: int8 or int4 weight-only.")] = None,
    gguf_type: Annotated[str, typer.Option(help="GGUF: f32, f16, bf16, q8_0 or q4_0.")] = "f16",
    gguf_shortcut_type: Annotated[str, typer.Option(help="GGUF residual path (shortcuts, tied projections): auto (q8_0 in q8_0 files, shortcuts stored as corrections in an aligned basis; f16 in q4_0 files) or a type.")] = "auto",
    gguf_arch: Annotated[str, typer.Option(help=GGUF_ARCH_HELP)] = "auto",
    sweep: Annotated[str | None, typer.Option(help=SWEEP_HELP)] = None,
    tasks: Annotated[str | None, typer.Option(help="Zero-shot lm-eval-harness tasks, e.g. piqa,arc_easy (needs lm-eval).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Write into a non-empty --out this tool did not create, and redo every stage.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging, and other libraries' logs and warnings.")] = False,
    version: Annotated[bool, typer.Option("--version", help="Show the version and exit.", callback=show_version, is_eager=True)] = False,
) -> None:
    """Slice Hugging Face models with SliceGPT and export them for ONNX Runtime and GGUF toolchains.

    With --format and no command, runs the whole job into --out: slice, export, validate, report.
    """
    ctx.with_resource(cli_output(verbose))
    if ctx.invoked_subcommand is not None:
        return
    if format is None:
        typer.echo(ctx.get_help())
        raise typer.Exit(0)
    from slicegpt_export.pipeline import run_job

    options = dict(round_to=round_to, slice_head=slice_head, rotate=not no_rotate, calib=calib_option(calib), calib_samples=calib_samples,
                   calib_seqlen=calib_seqlen, calib_batch_size=calib_batch_size, seed=seed, device=device, dtype=parse_dtype(dtype),
                   **budget_options(target_params, rotation, allocation, ffn_keep, ffn_selection, embed_keep))  # fmt: skip
    if recover:
        options.update(recover_steps=recover, recover_loss=recover_loss)
    try:
        job = run_job(out=out, formats=format, model=model, sparsity=paper_sparsity(sparsity, target_params), eval_text=eval_text or None, slice_options=options,
                      precision=precision, quantize=quantize, gguf_type=gguf_type, gguf_shortcut_type=gguf_shortcut_type, gguf_arch=gguf_arch,
                      sweep=parse_sweep(sweep),
                      tasks=tasks.split(",") if tasks else None, overwrite=overwrite)  # fmt: skip
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
                 "global: one basis, no shortcut; none: every width kept, only MLP neurons pruned. Default: stage for "
                 "--sparsity; for --target-params none where the MLPs alone can meet it (with the default --allocation and "
                 "no --ffn-keep), else block.")  # fmt: skip
FFN_KEEP_HELP = ("Fraction of every MLP's neurons to keep, the down projection refitted by least squares "
                 "(default: all with --sparsity; with --target-params as many as fit under --rotation none, else 0.6).")  # fmt: skip
FFN_SELECTION_HELP = ("How pruned MLPs choose the neurons they keep: obs (backward elimination that refits the down projection "
                      "as it goes) or energy (each neuron's own output energy, the choice until 2026-11-27).")  # fmt: skip
EMBED_KEEP_HELP = "Fraction of a tied embedding matrix's columns to keep (tied models only)."
DEFAULT_SPARSITY = 0.25


def paper_sparsity(sparsity: float | None, target_params: float | None) -> float:
    """--sparsity as given, its default without a budget, 0 with one (the library refuses both together)."""
    if sparsity is not None:
        return sparsity
    return 0.0 if target_params is not None else DEFAULT_SPARSITY


def budget_options(target_params: float | None, rotation: str | None, allocation: str, ffn_keep: float | None, ffn_selection: str,
                   embed_keep: float) -> dict[str, Any]:  # fmt: skip
    return {"target_params": target_params, "rotation": rotation, "allocation": allocation, "ffn_keep": ffn_keep,
            "ffn_selection": ffn_selection, "embed_keep": embed_keep}  # fmt: skip


def describe_size(cfg: SlicedConfig) -> str:
    """The paper's slicing fraction beside the honest ones: stored parameters and weight MACs per token vs dense."""
    size = cfg.size
    return (f"slicing fraction {cfg.sparsity:.3f} of the width (the paper's measure); stored parameters "
            f"{size['dense_parameters'] / 1e6:.1f}M dense -> {size['parameters'] / 1e6:.1f}M ({size['parameter_fraction']:.3f} of dense, "
            f"every tensor, tied ones once); weight MACs/token {size['dense_macs_per_token'] / 1e6:.1f}M -> "
            f"{size['macs_per_token'] / 1e6:.1f}M ({size['mac_fraction']:.3f})")  # fmt: skip


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
    from slicegpt_export.validation.report import agreement_note, markdown_table

    cfg = job["config"]
    typer.echo("")
    typer.echo(f"widths: {describe_widths(cfg)}")
    typer.echo(f"size: {describe_size(cfg)}")
    typer.echo(markdown_table(job["results"]))
    if agreement_note(job["results"]):
        typer.echo(agreement_note(job["results"]))
    typer.echo("time per stage: " + ", ".join(f"{r.name} {'reused' if r.reused else f'{r.seconds:.1f} s'}" for r in job["records"]))
    typer.echo(f"report: {job['report']}")


def describe_widths(cfg: SlicedConfig) -> str:
    """'embedding 432 | attn in/out 432/432 ... | head 576' collapsed over identical layers."""
    layer_kinds = sorted({(w.attn_in, w.attn_out, w.mlp_in, w.mlp_out) for w in cfg.layers})
    if len(layer_kinds) <= 3:
        layers = "layers attn_in/attn_out/mlp_in/mlp_out " + ", ".join(f"{a}/{b}/{c}/{d}" for a, b, c, d in layer_kinds)
    else:  # per-layer widths (a budget's allocation): each block's output width
        layers = "block outputs " + " ".join(str(w.mlp_out) for w in cfg.layers)
    neurons = sorted({w.intermediate for w in cfg.layers if w.intermediate is not None})
    mlp = f" | MLP neurons {'/'.join(map(str, neurons))} of {cfg.intermediate_size}" if neurons else ""
    return f"D {cfg.hidden_size} | embedding {cfg.embedding_width} | {layers}{mlp} | head {cfg.head_in}"


def window_count(windows: int) -> int | None:
    """--windows 0 means every complete window."""
    if windows < 0:
        raise SliceGPTError(f"--windows must be 0 (all) or a positive count, got {windows}")
    return windows or None


@app.command("slice", short_help="Slice a model into a sliced checkpoint folder.")
@one_line_errors
def slice_command(
    out: Annotated[Path, typer.Option(help="Output folder for the sliced checkpoint.")],
    sparsity: Annotated[float | None, typer.Option(help=SPARSITY_HELP)] = None,
    target_params: Annotated[float | None, typer.Option(help=TARGET_HELP)] = None,
    rotation: Annotated[str | None, typer.Option(help=ROTATION_HELP)] = None,
    allocation: Annotated[str, typer.Option(help=ALLOCATION_HELP)] = "uniform",
    ffn_keep: Annotated[float | None, typer.Option(help=FFN_KEEP_HELP)] = None,
    ffn_selection: Annotated[str, typer.Option(help=FFN_SELECTION_HELP)] = "obs",
    embed_keep: Annotated[float, typer.Option(help=EMBED_KEEP_HELP)] = 1.0,
    model: Annotated[str | None, typer.Option(help=MODEL_HELP)] = None,
    round_to: Annotated[int, typer.Option(help="Round sliced widths down to a multiple of this (32 for q8_0/q4_0 GGUF).")] = 8,
    slice_head: Annotated[bool, typer.Option("--slice-head", help="Also slice the head input.")] = False,
    calib: Annotated[list[str] | None, typer.Option(help=CALIB_HELP)] = None,
    calib_samples: Annotated[int | None, typer.Option(help=SAMPLES_HELP)] = None,
    calib_seqlen: Annotated[int | None, typer.Option(help=SEQLEN_HELP)] = None,
    calib_batch_size: Annotated[int, typer.Option(help="Windows per forward batch.")] = 8,
    seed: Annotated[int, typer.Option(help="Seed for drawing calibration windows.")] = 42,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda[:N].")] = "auto",
    dtype: Annotated[str, typer.Option(help="Dtype of the written checkpoint: source (the source's; float32 for a GGUF source), float32, float64, float16 or bfloat16. Slicing computes in float32 either way.")] = "source",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing output folder.")] = False,
    no_rotate: Annotated[bool, typer.Option("--no-rotate", help="With --sparsity 0: write the fused dense model (no PCA, no shortcuts).")] = False,
    recover: Annotated[int, typer.Option(help=RECOVER_HELP)] = 0,
    recover_loss: Annotated[str, typer.Option(help=RECOVER_LOSS_HELP)] = "kl",
    in_memory: Annotated[bool, typer.Option("--in-memory", help="Hold the whole model in memory instead of streaming it block by block.")] = False,
    max_shard_size: Annotated[float, typer.Option(help="Largest safetensors shard written, in GB.")] = 5.0,
    nproc: Annotated[int, typer.Option(help="Data-parallel calibration: run under torchrun with this many processes (gloo on CPU, NCCL on CUDA).")] = 1,
) -> None:
    """Fuse, rotate and slice a model into a sliced checkpoint folder."""
    from slicegpt_export.converter.distributed import data_parallel, launched_world_size
    from slicegpt_export.converter.recovery import slice_and_recover
    from slicegpt_export.device import resolve_device

    if nproc < 1:
        raise SliceGPTError(f"--nproc must be at least 1, got {nproc}")
    if nproc > 1 and launched_world_size() == 1:
        raise typer.Exit(relaunch_with_torchrun(nproc))
    try:
        with data_parallel(resolve_device(device)) as dp:
            if dp is not None and recover:
                raise SliceGPTError("--recover runs in one process: slice under torchrun first, then `recover` the checkpoint")
            summary, recovery = slice_and_recover(
                recover_steps=recover, recover_loss=recover_loss, model=model, out=out, sparsity=paper_sparsity(sparsity, target_params), round_to=round_to, slice_head=slice_head,
                calib=calib_option(calib), calib_samples=calib_samples, calib_seqlen=calib_seqlen, calib_batch_size=calib_batch_size, seed=seed,
                device=device, dtype=parse_checkpoint_dtype(dtype), overwrite=overwrite, rotate=not no_rotate, stream=not in_memory,
                data_parallel=dp, max_shard_bytes=int(max_shard_size * 1e9),
                **budget_options(target_params, rotation, allocation, ffn_keep, ffn_selection, embed_keep),
            )  # fmt: skip
    except KeyboardInterrupt:
        kept = f"; the existing {out} is unchanged" if out.exists() else ""
        typer.echo(f"error: interrupted while slicing {model or 'the default model'}: nothing was written to {out}{kept}", err=True)
        raise typer.Exit(130) from None
    if summary.out is None:  # a data-parallel process other than the first: process 0 reports
        return
    typer.echo(f"sliced checkpoint: {summary.out}")
    typer.echo(f"widths: {describe_widths(summary.config)}")
    typer.echo(f"size: {describe_size(summary.config)}")
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


@app.command("perplexity", short_help="Perplexity of a checkpoint, slicegpt GGUF or dense model.")
@one_line_errors
def perplexity_command(
    path: Annotated[str, typer.Argument(metavar="PATH", help="A sliced checkpoint folder, a slicegpt .gguf file, or a source model (folder or stock .gguf) for the dense figure.")],
    text: Annotated[list[Path], typer.Option(help="Evaluation text (.txt/.jsonl/.parquet file or folder, or the built-in python-stdlib); repeatable.")],
    seqlen: Annotated[int, typer.Option(help="Tokens per window.")] = 512,
    windows: Annotated[int, typer.Option(help=WINDOWS_HELP)] = 64,
    batch_size: Annotated[int, typer.Option(help="Windows per batch.")] = 8,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda[:N].")] = "auto",
    stream: Annotated[bool, typer.Option("--stream", help="Sliced checkpoint: read one block at a time from its shards (for models larger than memory).")] = False,
) -> None:
    """Perplexity on consecutive windows of each text: of a sliced checkpoint, of a slicegpt GGUF file (its own runner,
    and llama.cpp when built), or of a dense source model."""
    from slicegpt_export.validation.runners import gguf_perplexities, is_slicegpt_gguf, reference_perplexities

    options = {"seqlen": seqlen, "windows": window_count(windows), "batch_size": batch_size, "device": device}
    if stream and is_slicegpt_gguf(path):
        raise SliceGPTError("--stream reads a sliced checkpoint's shards; a GGUF file is read by its own runner")
    if is_slicegpt_gguf(path):
        for one in text:
            for runner, ppl in gguf_perplexities(path, text=one, **options):
                typer.echo(f"perplexity: {ppl:.4f} ({runner})" if len(text) == 1 else f"perplexity ({one}, {runner}): {ppl:.4f}")
        return
    ppls = reference_perplexities(path, texts=text, stream=stream, **options)
    for name, ppl in ppls.items():
        typer.echo(f"perplexity: {ppl:.4f}" if len(ppls) == 1 else f"perplexity ({name}): {ppl:.4f}")


@app.command("validate", short_help="Check every artifact in a folder; write the report.")
@one_line_errors
def validate_command(
    directory: Annotated[Path, typer.Argument(metavar="DIRECTORY", help="A folder holding a sliced checkpoint and its exports (one level deep).")],
    text: Annotated[list[Path] | None, typer.Option(help="Evaluation text for perplexity (a file, folder or python-stdlib); repeatable.")] = None,
    seqlen: Annotated[int, typer.Option(help="Tokens per window.")] = 512,
    windows: Annotated[int, typer.Option(help=WINDOWS_HELP)] = 64,
    sweep: Annotated[str | None, typer.Option(help=SWEEP_HELP)] = None,
    device: Annotated[str, typer.Option(help="Where the PyTorch reference and the dense source run: auto, cpu or cuda[:N].")] = "auto",
    fidelity: Annotated[bool, typer.Option(help="Compare with the dense source on held-out chat prompts (fidelity, greedy answers).")] = True,
    stream: Annotated[bool, typer.Option("--stream", help="Run the reference one block at a time from the checkpoint's shards (for models larger than memory); "
                                                          "leaves out the dense source and fidelity, which load whole models.")] = False,
) -> None:
    """Perplexity and logit agreement of every artifact found; writes report.md, report.json and plots."""
    from slicegpt_export.pipeline import sweep_sparsities
    from slicegpt_export.validation.fidelity import quality_beyond_calibration
    from slicegpt_export.validation.report import (
        agreement_note,
        evaluation_ids,
        find_artifacts,
        markdown_table,
        quality_markdown,
        validate_directory,
        write_report,
    )  # fmt: skip

    sparsities = parse_sweep(sweep)
    if sparsities and not text:
        raise SliceGPTError("--sweep needs --text")
    checkpoint = find_artifacts(directory).checkpoint
    count = window_count(windows)
    texts = text or []
    ids = evaluation_ids(checkpoint, texts[0], seqlen=seqlen, windows=count) if texts else None  # shared by all
    results = validate_directory(directory, text=texts or None, seqlen=seqlen, windows=count, device=device, ids=ids, stream=stream)
    rows = sweep_sparsities(checkpoint, sparsities, text=texts[0], out=directory / "sweep", seqlen=seqlen, windows=count, ids=ids) if sparsities else None
    if stream and fidelity:
        logger.info("no fidelity measurement with --stream: it loads the dense source and the checkpoint whole")
    quality = quality_beyond_calibration(checkpoint) if fidelity and not stream else None
    report = write_report(directory, results, checkpoint=checkpoint, sweep=rows, extra={"quality": quality})
    typer.echo(markdown_table(results))
    if agreement_note(results):
        typer.echo(agreement_note(results))
    if quality:
        typer.echo("\n".join(quality_markdown(quality)))
    typer.echo(f"report: {report}")


@app.command("export", short_help="Export a sliced checkpoint as ONNX or GGUF, then check it.")
@one_line_errors
def export_command(
    checkpoint: Annotated[Path, typer.Argument(metavar="CHECKPOINT", help="A sliced checkpoint folder.")],
    out: Annotated[Path, typer.Option(help="Output folder.")],
    format: Annotated[str, typer.Option("--format", help="onnx (ONNX Runtime / onnxruntime-genai folder) or gguf (a GGUF file for llama.cpp, see --gguf-arch).")] = "onnx",
    precision: Annotated[str, typer.Option(help="ONNX: fp32 (CPU) or fp16 (CUDA).")] = "fp32",
    quantize: Annotated[str | None, typer.Option(help="ONNX: weight-only int8 or int4 (MatMulNBits).")] = None,
    gguf_type: Annotated[str, typer.Option(help="GGUF: f32, f16, bf16, q8_0 or q4_0.")] = "f16",
    gguf_shortcut_type: Annotated[str, typer.Option(help="GGUF residual path (shortcuts, tied projections): auto (q8_0 in q8_0 files, shortcuts stored as corrections in an aligned basis; f16 in q4_0 files) or a type.")] = "auto",
    gguf_arch: Annotated[str, typer.Option(help=GGUF_ARCH_HELP)] = "auto",
    execution_provider: Annotated[str, typer.Option(help="ONNX: the runtime the graph is built for: cpu (ai.onnx ops) or cuda (GroupQueryAttention and fused norms, as onnxruntime-genai's builder emits; also runs on the CPU provider).")] = "cpu",
    validate: Annotated[bool, typer.Option(help="Compare the artifact with the PyTorch reference after export.")] = True,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing output folder.")] = False,
) -> None:
    """Export a sliced checkpoint; then validate it against the PyTorch reference."""
    from slicegpt_export.pipeline import export_validated

    try:
        export_validated(
            format=format, checkpoint=checkpoint, out=out, precision=precision, quantize=quantize, gguf_type=gguf_type,
            gguf_shortcut_type=gguf_shortcut_type, gguf_arch=gguf_arch, execution_provider=execution_provider, validate=validate,
            overwrite=overwrite,
        )  # fmt: skip
    except KeyboardInterrupt:
        typer.echo(f"error: interrupted while exporting {checkpoint}: nothing was written to {out}", err=True)
        raise typer.Exit(130) from None
    typer.echo(f"{format} export: {out}")


if __name__ == "__main__":
    app()
