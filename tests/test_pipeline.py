"""The one-shot job and `validate` on a tiny model: artifacts, report figures recomputed, reuse, failures."""

from __future__ import annotations

import json

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
    result = runner.invoke(app, args)
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


def test_checkpoint_loads_in_transformers_with_remote_code(job):
    from transformers import AutoModelForCausalLM

    root, _, _ = job
    checkpoint = root / "out" / "checkpoint"
    hf = AutoModelForCausalLM.from_pretrained(checkpoint, trust_remote_code=True)
    reference = load_sliced(checkpoint)
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(5))
    assert (hf(ids).logits - reference(ids).logits).abs().max().item() <= 1e-5
    from slicegpt_export.modeling import generate

    prompt = ids[:1, :8]
    expected = generate(reference, prompt, max_new_tokens=12)
    got = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False)
    assert got.tolist() == expected.tolist()


def test_validate_command_with_a_sweep(job):
    root, _, _ = job
    out = root / "out"
    result = runner.invoke(app, ["validate", str(out), "--text", str(root / "eval.txt"), "--seqlen", "128", "--sweep", "0.1,0.5"])
    assert result.exit_code == 0, result.output
    sweep = json.loads((out / "report.json").read_text())["sweep"]
    assert [s["sparsity"] for s in sweep] == [0.1, 0.5]
    assert sweep[0]["parameters"] > sweep[1]["parameters"]
    assert all(1 < s["perplexity"] < 512 for s in sweep)
    assert (out / "sweep.png").is_file()
