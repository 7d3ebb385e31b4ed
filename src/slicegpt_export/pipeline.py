"""The one-shot job: slice, export, validate and report, each stage reusable when its recorded inputs match."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from slicegpt_export.atomic import atomic_file
from slicegpt_export.checkpoint import parameter_count, read_config, read_tensors
from slicegpt_export.errors import SliceGPTError

logger = logging.getLogger(__name__)
MARKER = ".stage.json"
FORMATS = {"onnx": ("onnx",), "gguf": ("gguf",), "all": ("onnx", "gguf")}


@dataclasses.dataclass
class StageRecord:
    name: str
    seconds: float
    reused: bool


class StageError(SliceGPTError):
    """A stage of the one-shot job failed; the message names it."""


def run_stage(name: str, marker: Path, inputs: dict[str, Any], action: Callable[[], None], records: list[StageRecord]) -> None:
    """Run `action` unless `marker` records the same inputs from a finished run; then record them."""
    if marker.is_file():
        try:
            if json.loads(marker.read_text()) == inputs:
                logger.info("stage %s: reusing %s (same inputs)", name, marker.parent)
                records.append(StageRecord(name, 0.0, True))
                return
        except json.JSONDecodeError:
            pass
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
    gguf_type: str = "f16", gguf_shortcut_type: str = "auto", validate: bool = True, overwrite: bool = False,
) -> Path:  # fmt: skip
    """Export `checkpoint` as `format` into `out`, then (by default) compare it with the PyTorch reference."""
    from slicegpt_export.exporters import export_artifact

    path = export_artifact(format=format, checkpoint=checkpoint, out=out, precision=precision, quantize=quantize,
                           gguf_type=gguf_type, gguf_shortcut_type=gguf_shortcut_type, overwrite=overwrite)  # fmt: skip
    if validate and format == "onnx":
        from slicegpt_export.validation.onnx_runner import validate_onnx

        validate_onnx(path, checkpoint)
    elif validate and format == "gguf":
        from slicegpt_export.validation.gguf_runner import validate_gguf

        validate_gguf(path, checkpoint)
    return path


def sweep_sparsities(checkpoint: Path, sparsities: list[float], *, text: Path, out: Path, seqlen: int, windows: int | None) -> list[dict]:
    """Slice the checkpoint's source again at each sparsity (same calibration) and measure perplexity and size."""
    from slicegpt_export.checkpoint import load_sliced
    from slicegpt_export.converter.convert import slice_checkpoint
    from slicegpt_export.sources.text import text_windows
    from slicegpt_export.sources.tokenizer import load_tokenizer
    from slicegpt_export.validation.perplexity import perplexity

    cfg, _ = read_config(checkpoint)
    calib = cfg.calibration
    ids = text_windows(text, load_tokenizer(checkpoint), seqlen=seqlen, windows=windows)
    rows = []
    for s in sparsities:
        target = out / f"sparsity-{s:g}"
        if not (target / "config.json").is_file():
            slice_checkpoint(
                model=cfg.source_model or None, out=target, sparsity=s, round_to=cfg.round_to, calib=calib.get("source"),
                calib_samples=calib.get("samples", 128), calib_seqlen=calib.get("seqlen", 2048), seed=calib.get("seed", 42),
                calib_batch_size=calib.get("batch_size", 8), device="auto", progress=False, overwrite=True,
            )  # fmt: skip
        model = load_sliced(target)
        with torch.no_grad():
            ppl = perplexity(lambda x: model(x).logits, ids)
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
    sweep: list[float] | None = None,
    tasks: list[str] | None = None,
) -> dict[str, Any]:
    """Slice `model`, export it as `formats`, validate every artifact and write the report into `out`."""
    from slicegpt_export.converter.convert import check_sparsity
    from slicegpt_export.converter.recovery import slice_and_recover
    from slicegpt_export.sources.models import default_model_path
    from slicegpt_export.validation.fidelity import quality_beyond_calibration
    from slicegpt_export.validation.report import validate_directory, write_report

    if formats not in FORMATS:
        raise SliceGPTError(f"unknown --format {formats!r} (choose from {', '.join(FORMATS)})")
    check_sparsity(sparsity)
    if tasks:
        require_lm_eval()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    source = str(default_model_path()) if model is None else str(model)
    records: list[StageRecord] = []
    checkpoint = out / "checkpoint"
    slice_inputs = {"model": source, "sparsity": sparsity, **{k: str(v) for k, v in slice_options.items() if k != "device"}}
    run_stage("slice", out / f"checkpoint{MARKER}", slice_inputs,
              lambda: slice_and_recover(model=source, out=checkpoint, sparsity=sparsity, overwrite=True, **slice_options), records)  # fmt: skip
    for fmt in FORMATS[formats]:
        target = out / fmt
        inputs = {"checkpoint": slice_inputs, "precision": precision, "quantize": quantize, "gguf_type": gguf_type,
                  "gguf_shortcut_type": gguf_shortcut_type, "format": fmt}
        run_stage(f"export {fmt}", out / f"{fmt}{MARKER}", inputs,
                  lambda fmt=fmt, target=target: export_validated(format=fmt, checkpoint=checkpoint, out=target, precision=precision,
                                                                 quantize=quantize, gguf_type=gguf_type, gguf_shortcut_type=gguf_shortcut_type,
                                                                 overwrite=True), records)  # fmt: skip
    results: list = []
    quality: dict[str, Any] = {}
    sweep_rows: list[dict] | None = None

    def validate() -> None:
        nonlocal sweep_rows
        results.extend(validate_directory(out, text=eval_text))
        quality.update(quality_beyond_calibration(checkpoint) or {})
        if sweep:
            if eval_text is None:
                raise SliceGPTError("--sweep needs --eval-text")
            first_text = eval_text[0] if isinstance(eval_text, list) else eval_text
            sweep_rows = sweep_sparsities(checkpoint, sweep, text=first_text, out=out / "sweep", seqlen=512, windows=64)

    start = time.perf_counter()
    validate()
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
