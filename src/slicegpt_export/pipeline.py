"""The one-shot job: slice, export, validate and report, each stage reusable when its recorded inputs match."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from slicegpt_export.atomic import atomic_file, make_output_folder
from slicegpt_export.checkpoint import parameter_count, read_config, read_tensors
from slicegpt_export.errors import SliceGPTError

logger = logging.getLogger(__name__)
MARKER = ".stage.json"  # <stage output>.stage.json: the inputs of a finished stage
JOB_MARKER = ".slicegpt-export-job.json"  # in --out: the folder is the one-shot job's own
FORMATS = {"onnx": ("onnx",), "gguf": ("gguf",), "all": ("onnx", "gguf")}


@dataclasses.dataclass
class StageRecord:
    name: str
    seconds: float
    reused: bool


class StageError(SliceGPTError):
    """A stage of the one-shot job failed; the message names it."""


def flat(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested stage inputs as {"checkpoint.sparsity": 0.25, ...}."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def changed_inputs(recorded: dict[str, Any], inputs: dict[str, Any]) -> list[str]:
    """'sparsity 0.25 -> 0.3' for every input that differs from the recorded one."""
    old, new = flat(recorded), flat(inputs)
    return [f"{k} {old.get(k, '(unset)')} -> {new.get(k, '(unset)')}" for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k)]


def why_redo(marker: Path, inputs: dict[str, Any], output: Path | None) -> str | None:
    """Why a stage that ran before must run again, or None when its recorded inputs match and its output is there."""
    try:
        recorded = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return f"its record {marker.name} is unreadable"
    if output is not None and not output.exists():
        return f"its output {output} is missing"
    changes = changed_inputs(recorded, inputs) if isinstance(recorded, dict) else ["(unreadable record)"]
    return f"inputs changed: {'; '.join(changes)}" if changes else None


def run_stage(
    name: str, marker: Path, inputs: dict[str, Any], action: Callable[[], None], records: list[StageRecord], *,
    output: Path | None = None, redo: str | None = None,
) -> None:  # fmt: skip
    """Run `action` unless `marker` records the same inputs from a finished run (and `output` exists); then record them.

    A stage that ran before and runs again says why: `redo` (e.g. --overwrite), a changed input, or a missing output.
    """
    if marker.is_file():
        reason = redo or why_redo(marker, inputs, output)
        if reason is None:
            logger.info("stage %s: reusing %s (same inputs)", name, output or marker.parent)
            records.append(StageRecord(name, 0.0, True))
            return
        logger.info("stage %s: redone, %s; the earlier output is replaced when it finishes", name, reason)
    else:
        logger.info("stage %s ...", name)
    start = time.perf_counter()
    try:
        action()
    except SliceGPTError as exc:
        raise StageError(f"stage '{name}' failed: {exc}") from exc
    with atomic_file(marker) as tmp:
        tmp.write_text(json.dumps(inputs, indent=2, sort_keys=True))
    records.append(StageRecord(name, time.perf_counter() - start, False))


def export_validated(
    *, format: str, checkpoint: Path, out: Path, precision: str = "fp32", quantize: str | None = None,
    gguf_type: str = "f16", gguf_shortcut_type: str = "auto", gguf_arch: str = "auto", execution_provider: str = "cpu", validate: bool = True,
    overwrite: bool = False,
) -> Path:  # fmt: skip
    """Export `checkpoint` as `format` into `out`, then (by default) compare it with the PyTorch reference."""
    from slicegpt_export.exporters import export_artifact

    path = export_artifact(format=format, checkpoint=checkpoint, out=out, precision=precision, quantize=quantize, gguf_type=gguf_type,
                           gguf_shortcut_type=gguf_shortcut_type, gguf_arch=gguf_arch, execution_provider=execution_provider,
                           overwrite=overwrite)  # fmt: skip
    if validate and format == "onnx":
        from slicegpt_export.validation.onnx_runner import validate_onnx

        validate_onnx(path, checkpoint)
    elif validate and format == "gguf":
        from slicegpt_export.validation.gguf_runner import validate_gguf

        validate_gguf(path, checkpoint)
    return path


def sweep_sparsities(
    checkpoint: Path, sparsities: list[float], *, text: Path, out: Path, seqlen: int, windows: int | None,
    ids: torch.Tensor | None = None,
) -> list[dict]:  # fmt: skip
    """Slice the checkpoint's source again at each sparsity (same calibration) and measure perplexity and size.

    `ids`: the evaluation windows already tokenized for the artifacts (else `text` is tokenized here).
    """
    from slicegpt_export.checkpoint import load_sliced
    from slicegpt_export.converter.convert import slice_checkpoint
    from slicegpt_export.validation.perplexity import perplexity
    from slicegpt_export.validation.report import evaluation_ids

    cfg, _ = read_config(checkpoint)
    calib = cfg.calibration
    ids = evaluation_ids(checkpoint, text, seqlen=seqlen, windows=windows) if ids is None else ids
    rows = []
    for s in sparsities:
        target = out / f"sparsity-{s:g}"
        if not (target / "config.json").is_file():
            logger.info("sweep: slicing at sparsity %g with the checkpoint's calibration (%s)", s, calib.get("source"))
            slice_checkpoint(
                model=cfg.source_model or None, out=target, sparsity=s, round_to=cfg.round_to, calib=calib.get("source"),
                calib_samples=calib.get("samples", 128), calib_seqlen=calib.get("seqlen", 2048), seed=calib.get("seed", 42),
                calib_batch_size=calib.get("batch_size", 8), device="auto", progress=False, overwrite=True,
            )  # fmt: skip
        model = load_sliced(target)
        with torch.no_grad():
            ppl = perplexity(lambda x: model(x).logits, ids, progress=True, label=f"sparsity {s:g}")
        rows.append({"sparsity": s, "perplexity": ppl, "parameters": parameter_count(read_tensors(target))})
        logger.info("sweep %.2f: perplexity %.3f", s, ppl)
    return rows


def run_job(
    *,
    out: Path,
    formats: str,
    model: str | None,
    sparsity: float,
    eval_text: Path | list[Path] | None,
    slice_options: dict[str, Any],
    precision: str = "fp32",
    quantize: str | None = None,
    gguf_type: str = "f16",
    gguf_shortcut_type: str = "auto",
    gguf_arch: str = "auto",
    sweep: list[float] | None = None,
    tasks: list[str] | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Slice `model`, export it as `formats`, validate every artifact and write the report into `out`.

    `out` must be new, empty or this job's own earlier output (whose finished stages are reused when their
    inputs match); `overwrite` writes into any folder and redoes every stage.  `slice_options` are
    slice_checkpoint's keyword arguments; calibration sizes left None default by device (calibration_size).
    """
    from slicegpt_export.converter.calibration import calibration_size
    from slicegpt_export.converter.convert import check_sparsity
    from slicegpt_export.converter.recovery import slice_and_recover
    from slicegpt_export.device import resolve_device
    from slicegpt_export.sources.models import default_model_path
    from slicegpt_export.validation.fidelity import quality_beyond_calibration
    from slicegpt_export.validation.report import evaluation_ids, evaluation_texts, validate_directory, write_report

    if formats not in FORMATS:
        raise SliceGPTError(f"unknown --format {formats!r} (choose from {', '.join(FORMATS)})")
    check_sparsity(sparsity)
    if sweep and eval_text is None:
        raise SliceGPTError("--sweep needs --eval-text")
    if tasks:
        require_lm_eval()
    out = Path(out)
    claim_output_folder(out, overwrite=overwrite)
    device = slice_options.get("device", "auto")
    samples, seqlen = calibration_size(slice_options.get("calib_samples"), slice_options.get("calib_seqlen"), resolve_device(device))
    slice_options = {**slice_options, "calib_samples": samples, "calib_seqlen": seqlen}
    source = str(default_model_path()) if model is None else str(model)
    records: list[StageRecord] = []
    checkpoint = out / "checkpoint"
    redo = "--overwrite redoes every stage" if overwrite else None
    slice_inputs = {"model": source, "sparsity": sparsity, **{k: str(v) for k, v in slice_options.items() if k != "device"}}
    run_stage("slice", out / f"checkpoint{MARKER}", slice_inputs,
              lambda: slice_and_recover(model=source, out=checkpoint, sparsity=sparsity, overwrite=True, **slice_options), records,
              output=checkpoint, redo=redo)  # fmt: skip
    for fmt in FORMATS[formats]:
        target = out / fmt
        inputs = {"checkpoint": slice_inputs, "precision": precision, "quantize": quantize, "gguf_type": gguf_type,
                  "gguf_shortcut_type": gguf_shortcut_type, "gguf_arch": gguf_arch, "format": fmt}
        run_stage(f"export {fmt}", out / f"{fmt}{MARKER}", inputs,
                  lambda fmt=fmt, target=target: export_validated(format=fmt, checkpoint=checkpoint, out=target, precision=precision,
                                                                 quantize=quantize, gguf_type=gguf_type, gguf_shortcut_type=gguf_shortcut_type,
                                                                 gguf_arch=gguf_arch,
                                                                 overwrite=True), records, output=target, redo=redo)  # fmt: skip
    sweep_rows: list[dict] | None = None
    logger.info("stage validate ...")
    start = time.perf_counter()
    texts = evaluation_texts(eval_text)
    ids = evaluation_ids(checkpoint, texts[0]) if texts else None  # tokenized once, shared by every artifact and the sweep
    results = validate_directory(out, text=texts or None, ids=ids, device=device)
    quality = quality_beyond_calibration(checkpoint) or {}
    if sweep:
        sweep_rows = sweep_sparsities(checkpoint, sweep, text=texts[0], out=out / "sweep", seqlen=512, windows=64, ids=ids)
    records.append(StageRecord("validate", time.perf_counter() - start, False))
    cfg, _ = read_config(checkpoint)
    summary = {
        "stages": [dataclasses.asdict(r) for r in records],
        "parameters": parameter_count(read_tensors(checkpoint)),
        "zero_shot": zero_shot(checkpoint, tasks) if tasks else None,
        "quality": quality or None,
    }
    write_report(out, results, checkpoint=checkpoint, extra=summary, sweep=sweep_rows)
    return {"config": cfg, "results": results, "records": records, **summary, "report": out / "report.md"}


def claim_output_folder(out: Path, *, overwrite: bool) -> None:
    """Make `out` the job's folder: create it, or accept it empty or holding this job's earlier output; else refuse.

    Earlier output is recognised by the job marker or by stage markers (written before the job marker existed).
    """
    make_output_folder(out)
    entries = list(out.iterdir())
    ours = any(p.name == JOB_MARKER or p.name.endswith(MARKER) for p in entries)
    if entries and not ours and not overwrite:
        raise SliceGPTError(f"output folder {out} is not empty and was not written by slicegpt-export "
                            "(choose a new --out, or pass --overwrite to write into it)")  # fmt: skip
    if not (out / JOB_MARKER).is_file():
        with atomic_file(out / JOB_MARKER) as tmp:
            tmp.write_text(json.dumps({"written_by": "slicegpt-export", "version": importlib.metadata.version("slicegpt-export")}) + "\n")


def require_lm_eval() -> None:
    import importlib.util

    if importlib.util.find_spec("lm_eval") is None:
        raise SliceGPTError("zero-shot --tasks need lm-eval-harness: pip install lm-eval (its datasets are downloaded from the hub)")


def zero_shot(checkpoint: Path, tasks: list[str], *, limit: int | None = None) -> dict[str, Any]:
    """Zero-shot accuracy through lm-eval-harness, loading the checkpoint with trust_remote_code (needs lm-eval and its datasets)."""
    require_lm_eval()
    import lm_eval

    try:
        results = lm_eval.simple_evaluate(
            model="hf", model_args=f"pretrained={checkpoint},trust_remote_code=True", tasks=tasks, limit=limit
        )
    except Exception as exc:  # dataset downloads and task lookups fail in many ways; all end the same here
        raise SliceGPTError(f"zero-shot evaluation of {', '.join(tasks)} failed: {type(exc).__name__}: {str(exc)[:200]}") from exc
    return {task: metrics for task, metrics in results["results"].items()}
