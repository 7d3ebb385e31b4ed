"""Calibration mixtures, self-generated text, recovery fine-tuning and fidelity, on tiny models.

The recovery tests use a tiny Llama trained on WikiText-2 bytes (a real next-token signal),
sliced hard (0.5) so that there is something to recover.
"""

from __future__ import annotations

import json
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from tiny import BYTE_CHAT_TEMPLATE, SEQLEN, byte_ids, byte_tokenizer, save_tiny_model
from typer.testing import CliRunner

from slicegpt_export.checkpoint import SPECTRA_NAME, load_sliced, read_config, read_tensors
from slicegpt_export.cli import app
from slicegpt_export.converter.convert import fused_model, slice_checkpoint
from slicegpt_export.converter.mixture import DenseWriter, calibration_windows, parse_spec, window_counts
from slicegpt_export.converter.recovery import RecoverySettings, recover, recover_checkpoint
from slicegpt_export.errors import SliceGPTError
from slicegpt_export.modeling import generate
from slicegpt_export.sources.generation import GenerationSettings, generate_cached, generate_uncached
from slicegpt_export.sources.models import load_source
from slicegpt_export.sources.prompts import all_prompts, calibration_prompts, chat_ids, heldout_prompts
from slicegpt_export.sources.text import sample_windows, tokenize_text

runner = CliRunner()


def test_calibration_specs_and_weights():
    assert parse_spec("valid.txt:0.5") == parse_spec("valid.txt:.5") and parse_spec("valid.txt:0.5").weight == 0.5
    assert parse_spec("wikitext:wikitext-2-raw-v1").weight is None  # a dataset config, not a weight
    assert parse_spec("data:2:1").source == "data:2"
    assert str(parse_spec("self-chat:2")) == "self-chat:2"
    for bad in ("x:0", "x:-1", "x:nan", "x:inf"):
        with pytest.raises(SliceGPTError, match="calibration weight must be a positive number"):
            parse_spec(bad)
    assert window_counts(64, [0.5, 0.5]) == [32, 32]
    assert window_counts(10, [1, 1, 1]) == [4, 3, 3]
    assert window_counts(7, [1, 3]) == [2, 5]


def test_the_prompts_cover_every_kind_and_hold_some_out():
    prompts = all_prompts()
    assert len(prompts) >= 400 and len(set(prompts)) == len(prompts)
    kinds = {p.category for p in prompts}
    assert {"instruction", "question", "explanation", "code", "dialogue"} <= kinds
    held, calib = heldout_prompts(), calibration_prompts()
    assert len(held) + len(calib) == len(prompts) and not set(held) & set(calib)
    assert {p.category for p in held} == kinds  # every kind is measured
    assert all(len(p.turns) % 2 == 1 for p in prompts)  # conversations end with the user's turn
    assert not [p for p in calib if "France" in " ".join(p.turns)]  # the report's France prompt is not trained on


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory, wikitext) -> Path:
    """A tiny Llama trained on WikiText-2 bytes, with a chat template (byte tokenizer, end of text = 255)."""
    return save_tiny_model("llama", tmp_path_factory.mktemp("chat") / "llama", train_on=wikitext / "valid.txt", chat=True)


@pytest.fixture(scope="module")
def writer(chat_model) -> DenseWriter:
    source = load_source(str(chat_model))
    return DenseWriter(fused_model(source)[0], source.tokenizer, progress=False)


def test_a_single_source_draws_the_protocol_windows(writer, wikitext):
    ids, record = calibration_windows(str(wikitext / "valid.txt"), writer.tokenizer, samples=8, seqlen=SEQLEN, seed=3, writer=writer)
    expected = sample_windows(tokenize_text((wikitext / "valid.txt").read_text(), writer.tokenizer), samples=8, seqlen=SEQLEN, seed=3)
    assert torch.equal(ids, expected) and record == {"source": str(wikitext / "valid.txt")}


def test_a_mixture_shares_the_windows_by_weight(writer, tmp_path):
    (tmp_path / "a.txt").write_text("a" * 500)
    (tmp_path / "b.txt").write_text("b" * 500)
    specs = [f"{tmp_path / 'a.txt'}:1", f"{tmp_path / 'b.txt'}:3"]
    ids, record = calibration_windows(specs, writer.tokenizer, samples=8, seqlen=16, seed=0, writer=writer)
    a, b = (writer.tokenizer(c)["input_ids"][0] for c in "ab")
    assert ids.shape == (8, 16)
    assert (ids[:2] == a).all() and (ids[2:] == b).all()
    assert record["source"] == specs and [s["windows"] for s in record["sources"]] == [2, 6]
    again, _ = calibration_windows(record["source"], writer.tokenizer, samples=8, seqlen=16, seed=0, writer=writer)
    assert torch.equal(ids, again)
    with pytest.raises(SliceGPTError, match="gets no window of 2"):
        calibration_windows([f"{tmp_path / 'a.txt'}:1", f"{tmp_path / 'b.txt'}:100"], writer.tokenizer, samples=2, seqlen=16, seed=0,
                            writer=writer)  # fmt: skip


def test_batched_left_padded_generation_equals_one_prompt_at_a_time(writer):
    prompts = [chat_ids(writer.tokenizer, p) for p in calibration_prompts()[:5]]
    assert len({len(p) for p in prompts}) > 1  # different lengths: the batch is padded
    alone = [generate(writer.model, torch.tensor([p]), max_new_tokens=12)[0, len(p) :].tolist() for p in prompts]
    stop = alone[0][3]  # the first answer stops after at most 4 tokens
    settings = GenerationSettings(max_new_tokens=12, temperature=0.0, seed=0, batch_size=5, stop_token_id=stop, pad_token_id=0)
    batched = generate_uncached(writer.model, prompts, settings, desc="", progress=False)
    assert batched == [a[: a.index(stop) + 1] if stop in a else a for a in alone]
    assert len(batched[0]) <= 4


def test_generation_is_cached_and_not_paid_twice(writer, tmp_path):
    prompts = [[1, 2, 3], [4, 5]]
    settings = GenerationSettings(max_new_tokens=6, temperature=1.0, seed=7)
    first = generate_cached(writer.model, prompts, settings, cache_dir=tmp_path, progress=False)
    assert len(list((tmp_path / "generated").glob("*.safetensors"))) == 1
    with mock.patch("slicegpt_export.sources.generation.generate_uncached", side_effect=AssertionError("generated again")):
        assert generate_cached(writer.model, prompts, settings, cache_dir=tmp_path, progress=False) == first
    other = generate_cached(writer.model, prompts, GenerationSettings(max_new_tokens=6, temperature=1.0, seed=8), cache_dir=tmp_path,
                            progress=False)  # fmt: skip
    assert other != first and len(list((tmp_path / "generated").glob("*.safetensors"))) == 2


def test_self_chat_windows_are_conversations_in_the_chat_template(writer):
    ids, record = calibration_windows("self-chat", writer.tokenizer, samples=4, seqlen=SEQLEN, seed=0, writer=writer)
    assert ids.shape == (4, SEQLEN)
    text = writer.tokenizer.decode(ids.flatten().tolist())
    assert text.startswith("<user>") and "<assistant>" in text
    (source,) = record["sources"]
    assert record["source"] == ["self-chat"] and source["tokens"] >= 4 * SEQLEN and source["conversations"] >= 1
    again, _ = calibration_windows("self-chat", writer.tokenizer, samples=4, seqlen=SEQLEN, seed=0, writer=writer)
    assert torch.equal(ids, again)
    self_ids, _ = calibration_windows("self", writer.tokenizer, samples=3, seqlen=SEQLEN, seed=0, writer=writer)
    assert self_ids.shape == (3, SEQLEN) and (self_ids[:, 0] == writer.tokenizer.bos_token_id).all()


def mean_kl(teacher: torch.nn.Module, student: torch.nn.Module, ids: torch.Tensor) -> float:
    with torch.no_grad():
        p = F.log_softmax(teacher(ids).logits.float(), -1).flatten(0, 1)
        q = F.log_softmax(student(ids).logits.float(), -1).flatten(0, 1)
    return F.kl_div(q, p, log_target=True, reduction="batchmean").item()


@pytest.fixture(scope="module")
def sliced_chat(chat_model, tmp_path_factory, wikitext) -> Path:
    out = tmp_path_factory.mktemp("sliced") / "half"
    slice_checkpoint(model=str(chat_model), out=out, sparsity=0.5, calib=str(wikitext / "valid.txt"), calib_samples=32,
                     calib_seqlen=SEQLEN, device="cpu", progress=False)  # fmt: skip
    return out


@pytest.fixture(scope="module")
def held_out(wikitext) -> torch.Tensor:
    """Byte windows of test.txt (not the calibration text)."""
    return byte_ids(wikitext / "test.txt")[: 16 * SEQLEN].view(16, SEQLEN)


@pytest.mark.parametrize("topk", [16, 0], ids=["top-k", "full"])
def test_distillation_brings_the_sliced_model_closer_to_dense_on_held_out_text(chat_model, sliced_chat, held_out, topk, wikitext):
    teacher = fused_model(load_source(str(chat_model)))[0]
    student = load_sliced(sliced_chat)
    before = mean_kl(teacher, student, held_out)
    windows = sample_windows(byte_ids(wikitext / "valid.txt"), samples=32, seqlen=SEQLEN, seed=0)
    result = recover(student, teacher, windows, settings=RecoverySettings(steps=40, lr=3e-3, teacher_topk=topk), progress=False)
    after = mean_kl(teacher, student, held_out)
    assert after < 0.3 * before, (before, after)  # measured: 0.915 -> 0.137 (top-16 of 256), 0.133 (full)
    assert result.last_loss < result.first_loss
    assert not [n for n, _ in student.named_parameters() if "lora" in n]  # merged away
    assert set(student.named_weights()) == set(read_tensors(sliced_chat))


def test_recovery_is_deterministic_and_writes_an_ordinary_checkpoint(sliced_chat, tmp_path):
    from slicegpt_export.pipeline import export_validated

    first = recover_checkpoint(checkpoint=sliced_chat, out=tmp_path / "a", steps=6, device="cpu", progress=False)
    recover_checkpoint(checkpoint=sliced_chat, out=tmp_path / "b", steps=6, device="cpu", progress=False)
    a, b, original = read_tensors(tmp_path / "a"), read_tensors(tmp_path / "b"), read_tensors(sliced_chat)
    assert a.keys() == original.keys() and all(a[k].shape == original[k].shape for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], original[k]) for k in a)
    cfg, _ = read_config(tmp_path / "a")
    assert cfg.recovery["steps"] == 6 and cfg.recovery["loss"] == "kl" and cfg.recovery["data"] == "calibration"
    assert cfg.recovery["last_loss"] == pytest.approx(first.last_loss, abs=1e-5)
    assert (tmp_path / "a" / "tokenizer.json").is_file() and (tmp_path / "a" / SPECTRA_NAME).is_file()
    export_validated(format="onnx", checkpoint=tmp_path / "a", out=tmp_path / "onnx")  # raises when ONNX differs from the reference
    export_validated(format="gguf", checkpoint=tmp_path / "a", out=tmp_path / "gguf", gguf_type="f32")


def test_slice_with_mixture_and_recovery_then_recover_again_on_the_command_line(chat_model, tmp_path, wikitext):
    out = tmp_path / "sliced"
    args = ["slice", "--model", str(chat_model), "--out", str(out), "--calib", f"{wikitext / 'valid.txt'}:3", "--calib", "self-chat:1",
            "--calib-samples", "8", "--calib-seqlen", str(SEQLEN), "--device", "cpu", "--recover", "4"]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "recovery: 4 steps (kl)" in result.output
    config = json.loads((out / "config.json").read_text())["slicegpt"]
    assert config["calibration"]["source"] == [f"{wikitext / 'valid.txt'}:3", "self-chat:1"]
    assert [s["windows"] for s in config["calibration"]["sources"]] == [6, 2]
    assert config["recovery"]["steps"] == 4
    assert not list(tmp_path.glob(".*")), "a temporary folder was left behind"
    result = runner.invoke(app, ["recover", str(out), "--out", str(tmp_path / "again"), "--steps", "3", "--loss", "ce", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert read_config(tmp_path / "again")[0].recovery["loss"] == "ce"


def test_recovery_refuses_bad_settings_in_one_line(sliced_chat, tmp_path):
    for args, message in [
        (["--steps", "0"], "recovery needs at least one step"),
        (["--loss", "mse"], "unknown recovery loss 'mse'"),
    ]:
        result = runner.invoke(app, ["recover", str(sliced_chat), "--out", str(tmp_path / "x"), "--device", "cpu", *args])
        assert result.exit_code == 2 and message in result.output, result.output
        assert not (tmp_path / "x").exists()
    result = runner.invoke(app, ["slice", "--out", str(tmp_path / "y"), "--calib", "valid.txt:0"])
    assert result.exit_code == 2 and "calibration weight must be a positive number" in result.output


def test_validate_reports_each_text_fidelity_and_answers_side_by_side(sliced_chat, tmp_path, wikitext):
    import shutil

    directory = shutil.copytree(sliced_chat, tmp_path / "run" / "checkpoint")
    result = runner.invoke(app, ["validate", str(directory.parent), "--text", str(wikitext / "test.txt"), "--text", str(wikitext / "valid.txt"),
                                 "--seqlen", str(SEQLEN), "--windows", "4"])  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads((directory.parent / "report.json").read_text())
    reference = next(a for a in report["artifacts"] if a["name"] == "reference")
    assert set(reference["perplexities"]) == {"test.txt", "valid.txt"}
    assert reference["perplexity"] == reference["perplexities"]["test.txt"]
    fidelity = report["quality"]["fidelity"]
    assert fidelity["prompts"] == len(heldout_prompts()) and fidelity["tokens"] > 0
    assert 0 < fidelity["top1_agreement"] <= 1 and fidelity["kl_divergence"] > 0
    markdown = (directory.parent / "report.md").read_text()
    assert "perplexity (test.txt)" in markdown and "perplexity (valid.txt)" in markdown
    assert "| The capital of France is |" in markdown and "top-1 agreement" in markdown


def test_chat_template_of_the_byte_tokenizer_is_what_the_prompts_use():
    tokenizer = byte_tokenizer()
    tokenizer.chat_template = BYTE_CHAT_TEMPLATE
    ids = chat_ids(tokenizer, heldout_prompts()[0])
    assert tokenizer.decode(ids).startswith("<user>") and tokenizer.decode(ids).endswith("<assistant>")
