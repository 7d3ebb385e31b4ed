"""The command line on a tiny model folder: a real run, and every bad input refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny import save_tiny_model
from typer.testing import CliRunner

from slicegpt_export.checkpoint import load_sliced
from slicegpt_export.cli import app

runner = CliRunner()
TEXT = "The quick brown fox jumps over the lazy dog. " * 40  # 1800 bytes = 1800 byte tokens


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    return save_tiny_model("llama", tmp_path_factory.mktemp("tiny") / "llama")


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(TEXT)
    return path


def slice_args(model: Path, out: Path, calib: Path, *extra: str) -> list[str]:
    return ["slice", "--model", str(model), "--out", str(out), "--calib", str(calib), "--calib-samples", "4",
            "--calib-seqlen", "64", "--device", "cpu", *extra]  # fmt: skip


def test_slice_and_perplexity_commands(tiny_folder, calib_file, tmp_path):
    out = tmp_path / "sliced"
    result = runner.invoke(app, slice_args(tiny_folder, out, calib_file, "--sparsity", "0.25"))
    assert result.exit_code == 0, result.output
    assert "parameters:" in result.output and "widths:" in result.output
    config = json.loads((out / "config.json").read_text())
    assert config["slicegpt"]["embedding_width"] == 48 and config["slicegpt"]["calibration"]["samples"] == 4
    assert (out / "tokenizer.json").is_file()
    model = load_sliced(out)
    assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()
    result = runner.invoke(app, ["perplexity", str(out), "--text", str(calib_file), "--seqlen", "64", "--windows", "4"])
    assert result.exit_code == 0, result.output
    ppl = float(result.output.strip().splitlines()[-1].split()[-1])
    assert 1.0 < ppl < 2 * 256  # a random 256-token model: finite and not worse than twice uniform


def assert_refused(result, message: str, out: Path) -> None:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], result.output
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.tmp-*")), "a temporary output folder was left behind"


@pytest.mark.parametrize("sparsity", ["1.0", "-0.1"])
def test_sparsity_outside_unit_interval(tiny_folder, calib_file, tmp_path, sparsity):
    out = tmp_path / "out"
    result = runner.invoke(app, slice_args(tiny_folder, out, calib_file, "--sparsity", sparsity))
    assert_refused(result, "sparsity must be in [0, 1)", out)


def copy_folder(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_unknown_model_type(tiny_folder, calib_file, tmp_path):
    folder = copy_folder(tiny_folder, tmp_path / "gpt")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "gpt_neox"}))
    out = tmp_path / "out"
    result = runner.invoke(app, slice_args(folder, out, calib_file))
    assert_refused(result, "unsupported architecture: model_type 'gpt_neox' (supported: llama, mistral, opt, phi, qwen2)", out)


def test_missing_weights(tiny_folder, calib_file, tmp_path):
    folder = copy_folder(tiny_folder, tmp_path / "noweights")
    (folder / "model.safetensors").unlink()
    out = tmp_path / "out"
    assert_refused(runner.invoke(app, slice_args(folder, out, calib_file)), "no safetensors weights found", out)


def test_truncated_weights(tiny_folder, calib_file, tmp_path):
    folder = copy_folder(tiny_folder, tmp_path / "truncated")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    out = tmp_path / "out"
    assert_refused(runner.invoke(app, slice_args(folder, out, calib_file)), "cannot read weights file", out)


def test_calibration_text_shorter_than_one_sample(tiny_folder, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("too short")
    out = tmp_path / "out"
    result = runner.invoke(app, slice_args(tiny_folder, out, short))
    assert_refused(result, "too little calibration text: 9 tokens, fewer than one sample of 64", out)


def test_existing_output_is_not_clobbered(tiny_folder, calib_file, tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = runner.invoke(app, slice_args(tiny_folder, out, calib_file))
    assert result.exit_code == 2 and "already exists" in result.output
    assert (out / "keep.txt").read_text() == "mine"


def test_without_calibration_text_the_model_samples_its_own(tiny_folder, tmp_path, caplog):
    import importlib.util

    from slicegpt_export.converter.convert import slice_checkpoint

    if importlib.util.find_spec("datasets") is not None:
        pytest.skip("`datasets` is installed: the hub would be tried first")
    with caplog.at_level("WARNING"):
        summary = slice_checkpoint(model=str(tiny_folder), out=tmp_path / "o", sparsity=0.25, calib=None,
                                   calib_samples=2, calib_seqlen=16, device="cpu", progress=False)  # fmt: skip
    assert "sampled from the model itself" in caplog.text
    assert summary.config.calibration["source"] == "self"
    assert summary.config.calibration["samples"] == 2 and summary.config.calibration["seqlen"] == 16
