"""The command line on a tiny model folder: a real run, and every bad input refused in one line."""

from __future__ import annotations

import json
import re
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
    assert "stored parameters" in result.output and "widths:" in result.output
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
    assert_refused(result, "unsupported architecture: model_type 'gpt_neox' (supported: gemma2, gemma3_text, llama, mistral, opt, "
                           "phi, phi3, qwen2, qwen3, smollm3)", out)  # fmt: skip


def test_known_unsupported_variant_is_named(tiny_folder, calib_file, tmp_path):
    folder = copy_folder(tiny_folder, tmp_path / "moe")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "qwen3_moe"}))
    out = tmp_path / "out"
    result = runner.invoke(app, slice_args(folder, out, calib_file))
    assert_refused(result, "Qwen3 MoE (model_type qwen3_moe) is not supported: mixture-of-experts MLPs; dense Qwen3 (qwen3) is", out)


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


def test_slice_to_a_parameter_budget(tiny_folder, calib_file, tmp_path):
    out = tmp_path / "budget"
    result = runner.invoke(app, slice_args(tiny_folder, out, calib_file, "--target-params", "0.7"))
    assert result.exit_code == 0, result.output
    size = json.loads((out / "config.json").read_text())["slicegpt"]["size"]
    assert size["parameter_fraction"] <= 0.7 and size["parameters"] <= 0.7 * size["dense_parameters"]
    assert f"({size['parameter_fraction']:.3f} of dense" in result.output
    assert size["mac_fraction"] == pytest.approx(size["macs_per_token"] / size["dense_macs_per_token"])
    # 0.7 is below what pruning MLP neurons alone reaches in this model (0.74): the residual is narrowed too
    assert json.loads((out / "config.json").read_text())["slicegpt"]["slicing"]["rotation"] == "block"


def test_a_budget_the_mlps_can_meet_prunes_only_mlp_neurons(tiny_folder, calib_file, tmp_path):
    out = tmp_path / "mlp-only"
    result = runner.invoke(app, slice_args(tiny_folder, out, calib_file, "--target-params", "0.9"))
    assert result.exit_code == 0, result.output
    sliced = json.loads((out / "config.json").read_text())["slicegpt"]
    assert sliced["slicing"]["rotation"] == "none" and sliced["size"]["parameters"] <= 0.9 * sliced["size"]["dense_parameters"]
    # every residual width kept (64), 64 of the 96 neurons: 96 would not fit
    assert all(w["attn_in"] == w["attn_out"] == w["mlp_out"] == 64 and w["intermediate"] == 64 for w in sliced["layers"])
    assert "MLP neurons 64 of 96" in result.output
    assert sliced["slicing"]["ffn_selection"] == "obs"


def test_unknown_neuron_selection_is_refused(tiny_folder, calib_file, tmp_path):
    out = tmp_path / "out"
    result = runner.invoke(app, slice_args(tiny_folder, out, calib_file, "--target-params", "0.9", "--ffn-selection", "random"))
    assert_refused(result, "unknown --ffn-selection 'random'", out)


def test_sparsity_and_budget_together_are_refused(tiny_folder, calib_file, tmp_path):
    out = tmp_path / "out"
    result = runner.invoke(app, slice_args(tiny_folder, out, calib_file, "--sparsity", "0.25", "--target-params", "0.7"))
    assert_refused(result, "give either --sparsity", out)


# ----- the first hour of a new user (issue 14) ---------------------------------------------------------------


@pytest.mark.parametrize("value", ["{tmp}/nope.txt", "./no-such-calib", "~/no-such-calib", "data/sub/calib", "data/calib", "valid.jsonl"])
def test_mistyped_calibration_path_says_no_such_file(tiny_folder, tmp_path, value):
    calib = value.format(tmp=tmp_path)
    out = tmp_path / "out"
    result = runner.invoke(app, slice_args(tiny_folder, out, calib))
    assert_refused(result, f"calibration text {calib}: no such file or folder", out)


def test_a_bare_name_is_still_a_dataset(tiny_folder, tmp_path):
    out = tmp_path / "out"
    result = runner.invoke(app, slice_args(tiny_folder, out, "no_such_dataset_name"))
    assert_refused(result, "calibration dataset 'no_such_dataset_name'", out)


LINUX_PSEUDO = pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc and /sys")


@LINUX_PSEUDO
@pytest.mark.parametrize("root", ["/proc", "/sys"])
def test_unwritable_out_is_one_error_line(tiny_folder, calib_file, root):
    out = Path(root) / "slicegpt-export-test"
    assert_refused(runner.invoke(app, slice_args(tiny_folder, out, calib_file)), f"cannot write {out}", out)
    assert_refused(runner.invoke(app, ["--format", "onnx", "--out", str(out)]), f"cannot write {out}", out)


@LINUX_PSEUDO
def test_unwritable_export_out_is_one_error_line(tiny_folder, calib_file, tmp_path):
    checkpoint = tmp_path / "sliced"
    assert runner.invoke(app, slice_args(tiny_folder, checkpoint, calib_file)).exit_code == 0
    out = Path("/sys/slicegpt-export-test")
    result = runner.invoke(app, ["export", str(checkpoint), "--out", str(out), "--format", "gguf"])
    assert_refused(result, f"cannot write {out}", out)


def interrupt(*args, **kwargs):
    raise KeyboardInterrupt


def test_ctrl_c_while_slicing_says_what_and_leaves_nothing(tiny_folder, calib_file, tmp_path, monkeypatch):
    from slicegpt_export.converter import convert

    monkeypatch.setattr(convert, "slice_fused", interrupt)  # Ctrl-C in the middle of the work
    out = tmp_path / "out"
    result = runner.invoke(app, slice_args(tiny_folder, out, calib_file))
    assert result.exit_code == 130, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert lines == [f"error: interrupted while slicing {tiny_folder}: nothing was written to {out}"], result.output
    assert not out.exists() and not list(tmp_path.glob(".out.tmp-*"))
    out.mkdir()
    (out / "earlier.txt").write_text("kept")
    result = runner.invoke(app, slice_args(tiny_folder, out, calib_file, "--overwrite"))
    assert result.exit_code == 130 and f"the existing {out} is unchanged" in result.output
    assert [p.name for p in out.iterdir()] == ["earlier.txt"] and not list(tmp_path.glob(".out.tmp-*"))


def test_calibration_size_defaults_by_device():
    from slicegpt_export.converter.calibration import calibration_size

    assert calibration_size(None, None, torch.device("cpu")) == (64, 512)
    assert calibration_size(None, None, torch.device("cuda")) == (128, 2048)  # the paper's
    assert calibration_size(16, None, torch.device("cpu")) == (16, 512)
    assert calibration_size(3, 100, torch.device("cuda")) == (3, 100)


def test_slice_without_sizes_uses_the_cpu_defaults_and_says_so(tiny_folder, calib_file, tmp_path):
    out = tmp_path / "sliced"
    args = ["slice", "--model", str(tiny_folder), "--out", str(out), "--calib", str(calib_file), "--device", "cpu"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "64 windows of 512 tokens, the default on cpu" in result.output
    calibration = json.loads((out / "config.json").read_text())["slicegpt"]["calibration"]
    assert (calibration["samples"], calibration["seqlen"]) == (64, 256)  # 512 capped by the tiny model's 256 positions


def test_sampled_calibration_is_batched_and_shows_progress(tiny_folder, capsys):
    from slicegpt_export.converter.convert import fused_model
    from slicegpt_export.converter.mixture import GENERATION_BATCH, DenseWriter
    from slicegpt_export.sources.models import load_source

    source = load_source(str(tiny_folder))
    model = fused_model(source)[0]
    batches: list[int] = []
    hook = model.register_forward_pre_hook(lambda module, args: batches.append(args[0].shape[0]))
    windows = DenseWriter(model, source.tokenizer, progress=True).from_bos(7, 10, 42)
    hook.remove()
    assert windows.shape == (7, 10) and GENERATION_BATCH >= 7
    assert set(batches) == {7}  # the 7 windows generated together, one forward per position
    err = capsys.readouterr().err
    assert "self: sampling" in err and "63/63" in err  # 7 windows x 9 sampled tokens, counted token by token
    again = DenseWriter(model, source.tokenizer, progress=False).from_bos(7, 10, 42)
    assert torch.equal(windows, again)  # seeded: reproducible (and cached)


def help_text(*command: str) -> str:
    result = runner.invoke(app, [*command, "--help"])
    assert result.exit_code == 0, result.output
    return result.output


def test_help_says_what_each_option_does():
    top = help_text()
    assert "[OPTIONS] [COMMAND [ARGS]...]\n" in top.splitlines(keepends=True)[0]  # the one-shot form takes no command
    for flag in ("--dtype", "--slice-head", "--overwrite", "--no-rotate", "--version"):
        assert flag in top, flag
    assert "export it as onnx, gguf or all (both)" in top
    assert "--device" in help_text("validate")
    for command in ((), ("slice",), ("perplexity",), ("validate",), ("export",)):
        text = help_text(*command)
        assert "<bool>" not in text, command
        entries = re.split(r"\n  (?=-)", text)  # one entry per option
        assert not [e for e in entries if "(default:" in e and "[default:" in e], command  # two defaults for one option
    assert "calibration (same text, windows and seed)" in " ".join(help_text("validate").split())


def test_version():
    import importlib.metadata

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"slicegpt-export {importlib.metadata.version('slicegpt-export')}"
