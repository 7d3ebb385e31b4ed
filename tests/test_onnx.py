"""ONNX export of every family at sparsity 0 and 0.25, checked in ONNX Runtime and onnxruntime-genai."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from tiny import BUDGET_CASES, SEQLEN, TINY_CONFIGS, VOCAB, byte_ids, write_sliced_checkpoint

from slicegpt_export.checkpoint import load_sliced, read_tensors
from slicegpt_export.exporters.onnx import export_onnx
from slicegpt_export.modeling import generate
from slicegpt_export.onnx_spec import MODEL_FILE
from slicegpt_export.sources.text import evaluation_windows
from slicegpt_export.validation.onnx_runner import OnnxDecoder, compare_with_reference, validate_onnx
from slicegpt_export.validation.perplexity import perplexity

TOLERANCE = 1e-4  # fp32 max |logit difference| on CPU
CASES = [(family, sparsity) for family in TINY_CONFIGS for sparsity in (0.0, 0.25)] + BUDGET_CASES


@pytest.fixture(scope="module", params=CASES, ids=[f"{f}-{s}" for f, s in CASES])
def exported(request, tmp_path_factory):
    family, sparsity = request.param
    root = tmp_path_factory.mktemp(f"{family}-{sparsity}")
    checkpoint = write_sliced_checkpoint(family, sparsity, root / "checkpoint")
    export_onnx(checkpoint=checkpoint, out=root / "onnx")
    return checkpoint, root / "onnx"


def test_prefill_and_cached_decode_match_the_reference(exported):
    checkpoint, onnx_dir = exported
    results = compare_with_reference(OnnxDecoder(onnx_dir), load_sliced(checkpoint), decode_steps=4)
    assert [r.step for r in results] == ["prefill", "decode 1", "decode 2", "decode 3", "decode 4"]
    for r in results:
        assert r.max_abs_diff <= TOLERANCE, r


def test_greedy_generation_matches_the_reference(exported):
    checkpoint, onnx_dir = exported
    decoder = OnnxDecoder(onnx_dir)
    prompt = np.array([[5, 6, 7, 8, 9, 10]])
    tokens, mask, past = prompt, np.ones_like(prompt), decoder.empty_past(1)
    out = [prompt]
    for _ in range(16):
        logits, past = decoder.run(tokens, mask, past)
        tokens = logits[:, -1:].argmax(-1)
        out.append(tokens)
        mask = np.concatenate([mask, np.ones_like(tokens)], axis=1)
    expected = generate(load_sliced(checkpoint), torch.from_numpy(prompt), max_new_tokens=16)
    assert np.concatenate(out, axis=1).tolist() == expected.tolist()


def test_onnxruntime_genai_generates_the_reference_tokens(exported):
    og = pytest.importorskip("onnxruntime_genai")
    checkpoint, onnx_dir = exported
    model = og.Model(str(onnx_dir))
    prompt = og.Tokenizer(model).encode("Hello")
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + 16, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt)
    while not generator.is_done():
        generator.generate_next_token()
    got = [int(t) for t in generator.get_sequence(0)]
    expected = generate(load_sliced(checkpoint), torch.tensor([prompt.tolist()]), max_new_tokens=16)[0].tolist()
    assert VOCAB - 1 not in expected  # the end-of-text id never stops either side early
    assert got == expected


def test_graph_records_widths_shortcuts_and_config(exported):
    checkpoint, onnx_dir = exported
    model = onnx.load(str(onnx_dir / MODEL_FILE))
    section = json.loads({p.key: p.value for p in model.metadata_props}["slicegpt"])
    assert section == json.loads((checkpoint / "config.json").read_text())["slicegpt"]
    names = {n.name: n for n in model.graph.node}
    inits = {t.name: t for t in model.graph.initializer}
    stored = read_tensors(checkpoint)
    for i, w in enumerate(section["layers"]):
        for kind, dims in (("attn_shortcut", [w["attn_in"], w["attn_out"]]), ("mlp_shortcut", [w["mlp_in"], w["mlp_out"]])):
            name = f"layers.{i}.{kind}"  # a MatMul exactly where the checkpoint stores a shortcut (absent = identity)
            assert (name in names) == (name in stored)
            if name in stored:
                assert names[name].op_type == "MatMul" and list(inits[name].dims) == dims
        qkv_out = (section["num_heads"] + 2 * section["num_kv_heads"]) * section["head_dim"]
        assert list(inits[f"layers.{i}.qkv_proj.weight"].dims) == [w["attn_in"], qkv_out]  # q, k, v packed: one MatMul
    widths = {vi.type.tensor_type.shape.dim[2].dim_value for vi in model.graph.value_info}
    assert {section["embedding_width"], section["head_in"]} <= widths
    config = json.loads((onnx_dir / "config.json").read_text())
    assert config["head_dim"] == section["head_dim"]
    assert (onnx_dir / "genai_config.json").is_file() and (onnx_dir / "tokenizer.json").is_file()


@pytest.fixture(scope="module")
def trained_checkpoint(tmp_path_factory, wikitext):
    # trained, so that quantization error is measured on a real signal: a random model's top logits are near-ties
    return write_sliced_checkpoint("llama", 0.25, tmp_path_factory.mktemp("trained") / "checkpoint", train_on=wikitext / "valid.txt")


@pytest.mark.parametrize(("quantize", "max_increase"), [("int8", 0.01), ("int4", 0.10)])
def test_weight_only_quantization_keeps_perplexity(trained_checkpoint, tmp_path, wikitext, quantize, max_increase):
    windows = evaluation_windows(byte_ids(wikitext / "test.txt"), seqlen=SEQLEN, windows=32)
    export_onnx(checkpoint=trained_checkpoint, out=tmp_path / "fp32")
    export_onnx(checkpoint=trained_checkpoint, out=tmp_path / quantize, quantize=quantize)
    nodes = {n.name: n.op_type for n in onnx.load(str(tmp_path / quantize / MODEL_FILE)).graph.node}
    assert nodes["layers.0.gate_up_proj/MatMul_Q" + quantize[-1]] == "MatMulNBits"
    assert nodes["layers.0.attn_shortcut"] == "MatMul"  # the residual projections stay fp32
    dense = perplexity(OnnxDecoder(tmp_path / "fp32").logits, windows)
    quantized = perplexity(OnnxDecoder(tmp_path / quantize).logits, windows)
    assert quantized < dense * (1 + max_increase), (dense, quantized)
    validate_onnx(tmp_path / quantize, trained_checkpoint)  # reported, not bounded, for quantized graphs


def test_fp16_graph_runs_within_half_precision_tolerance(tmp_path):
    checkpoint = write_sliced_checkpoint("qwen2", 0.25, tmp_path / "checkpoint")
    export_onnx(checkpoint=checkpoint, out=tmp_path / "fp16", precision="fp16")
    results = validate_onnx(tmp_path / "fp16", checkpoint)  # reported by validation, bounded here for the tiny model
    assert max(r.max_abs_diff for r in results) < 5e-2


def test_longrope_graph_switches_to_long_factors(tmp_path):
    # an If node picks the long caches once the largest position reaches the 256 original ones, as the reference does
    checkpoint = write_sliced_checkpoint("phi3", 0.25, tmp_path / "checkpoint")
    export_onnx(checkpoint=checkpoint, out=tmp_path / "onnx")
    ids = torch.randint(0, VOCAB, (2, 300), generator=torch.Generator().manual_seed(4))
    reference = load_sliced(checkpoint)
    decoder = OnnxDecoder(tmp_path / "onnx")
    for length in (40, 300):
        got = decoder.logits(ids[:, :length])
        assert (got - reference(ids[:, :length]).logits).abs().max().item() <= 1e-4
