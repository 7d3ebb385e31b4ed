"""`--gguf-arch stock`: an unrotated checkpoint of uniform MLP width written in its family's own llama.cpp architecture (`llama`, `qwen2`).

llama.cpp runs these files unpatched; the tests that run them need the build (see test_llama_cpp.py).
"""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch
from tiny import VOCAB, write_sliced_checkpoint
from typer.testing import CliRunner

from slicegpt_export.checkpoint import lazy_tensors, load_sliced, read_config, save_checkpoint
from slicegpt_export.cli import app
from slicegpt_export.errors import SliceGPTError
from slicegpt_export.exporters.gguf_stock import export_stock_gguf
from slicegpt_export.pipeline import export_validated
from slicegpt_export.validation.gguf_runner import StockGGUFModel

LOGIT_BOUND = 1e-3  # f32 file against the PyTorch reference, as for the slicegpt architecture (measured ~2e-6)
Q8_LOGIT_BOUND = 0.25  # q8_0 weights, and in llama.cpp 8-bit activations too, on the random tiny model (measured 0.07-0.09)


def ids(seed: int = 3) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(seed))


def tensor_types(path) -> dict[str, gguf.GGMLQuantizationType]:
    return {t.name: t.tensor_type for t in gguf.GGUFReader(path).tensors}


@pytest.mark.parametrize(("family", "arch"), [("llama-tied", "llama"), ("llama", "llama"), ("qwen2", "qwen2")])
def test_stock_file_is_the_reference_in_llama_cpp(llama_cpp, family, arch, tmp_path):
    from slicegpt_export.validation.llama_cpp_runner import LlamaCppModel

    checkpoint = write_sliced_checkpoint(family, "budget-none", tmp_path / "checkpoint")
    path = export_validated(format="gguf", checkpoint=checkpoint, out=tmp_path / "f32", gguf_type="f32", gguf_arch="stock")
    reader = gguf.GGUFReader(path)
    assert bytes(reader.fields["general.architecture"].parts[-1]).decode() == arch
    names = set(tensor_types(path))
    assert not any("proj" in n for n in names)  # no shortcut and no projection: llama.cpp's own graph
    assert ("output.weight" in names) == (family == "llama")  # a tied head reuses token_embd, stored once
    assert ("blk.0.attn_q.bias" in names) == (family == "qwen2")  # Qwen2's q/k/v biases
    want = load_sliced(checkpoint)(ids()).logits
    assert (LlamaCppModel(path, n_ctx=64).logits(ids()) - want).abs().max().item() <= LOGIT_BOUND
    assert (StockGGUFModel(path).logits(ids()) - want).abs().max().item() <= LOGIT_BOUND  # transformers reads it back too


def narrowed_checkpoint(source, out, width: int):
    """`source` with every MLP cut to its first `width` neurons: a width no q8_0 block divides."""
    cfg, full = read_config(source)
    tensors = dict(lazy_tensors(source))
    for i, layer in enumerate(cfg.layers):
        layer.intermediate = width
        for proj, axis in (("gate_proj", 0), ("up_proj", 0), ("down_proj", 1)):
            name = f"layers.{i}.{proj}.weight"
            tensors[name] = tensors[name].narrow(axis, 0, width).contiguous()
    save_checkpoint(out, tensors=tensors, config=cfg, base_config={k: v for k, v in full.items() if k != "slicegpt"})
    for f in source.glob("tokenizer*"):
        (out / f.name).write_bytes(f.read_bytes())
    return out


def test_stock_q8_0_pads_the_mlp_with_zero_neurons(llama_cpp, tmp_path):
    from slicegpt_export.validation.llama_cpp_runner import LlamaCppModel

    checkpoint = narrowed_checkpoint(write_sliced_checkpoint("llama-tied", "budget-none", tmp_path / "source"), tmp_path / "checkpoint", 20)
    path = export_stock_gguf(checkpoint=checkpoint, out=tmp_path / "q8", gguf_type="q8_0")
    reader = gguf.GGUFReader(path)
    matrices = {t.name: t for t in reader.tensors if len(t.shape) == 2}
    assert {t.tensor_type for t in matrices.values()} == {gguf.GGMLQuantizationType.Q8_0}  # no f16 fallback
    assert int(reader.fields["llama.feed_forward_length"].parts[-1][0]) == 32
    up = gguf.dequantize(matrices["blk.0.ffn_up.weight"].data, gguf.GGMLQuantizationType.Q8_0)  # (n_ff, D)
    down = gguf.dequantize(matrices["blk.0.ffn_down.weight"].data, gguf.GGMLQuantizationType.Q8_0)  # (D, n_ff)
    assert np.all(up[20:] == 0) and np.all(down[:, 20:] == 0) and np.any(up[:20] != 0)
    want = load_sliced(checkpoint)(ids()).logits
    assert (LlamaCppModel(path, n_ctx=64).logits(ids()) - want).abs().max().item() <= Q8_LOGIT_BOUND


@pytest.mark.parametrize(
    ("family", "slicing", "reason"),
    [("llama", 0.25, "the weights are rotated"), ("mistral", "budget-none", "sliding window"), ("opt", 0.25, "this is opt"),
     ("llama-rope-llama3", "budget-none", "scaling llama3")],
)  # fmt: skip
def test_stock_refuses_what_its_architecture_cannot_hold(family, slicing, reason, tmp_path):
    checkpoint = write_sliced_checkpoint(family, slicing, tmp_path / "checkpoint")
    with pytest.raises(SliceGPTError, match=reason):
        export_stock_gguf(checkpoint=checkpoint, out=tmp_path / "out", gguf_type="f32")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("arch", "message"), [("stock", "cannot be written in llama.cpp's own architecture"), ("llamas", "unknown GGUF architecture")])
def test_cli_refuses_in_one_line(arch, message, tmp_path):
    checkpoint = write_sliced_checkpoint("llama", 0.25, tmp_path / "checkpoint")
    result = CliRunner().invoke(app, ["export", str(checkpoint), "--out", str(tmp_path / "out"), "--format", "gguf", "--gguf-arch", arch])
    assert result.exit_code != 0
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], result.output
    assert not (tmp_path / "out").exists()
    assert read_config(checkpoint)[0].rotated


def test_one_shot_job_validates_a_stock_file(llama_cpp, tmp_path):
    from tiny import save_tiny_model

    model = save_tiny_model("llama", tmp_path / "tiny")
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 60)
    args = ["--format", "gguf", "--gguf-arch", "stock", "--gguf-type", "f32", "--target-params", "0.85", "--rotation", "none",
            "--model", str(model), "--out", str(tmp_path / "out"), "--calib", str(text), "--calib-samples", "4", "--calib-seqlen", "64",
            "--eval-text", str(text), "--device", "cpu"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    report = {a["name"]: a for a in json.loads((tmp_path / "out" / "report.json").read_text())["artifacts"]}
    reference = report["reference"]["perplexity"]
    for name in ("gguf f32", "llama.cpp f32"):  # transformers reading the file back, and llama.cpp itself
        assert report[name]["perplexity"] == pytest.approx(reference, rel=1e-4), name


@pytest.mark.parametrize(
    ("slicing", "options", "arch"),
    [("budget-none", {}, "llama"), (0.25, {}, "slicegpt"), ("budget-none", {"gguf_shortcut_type": "f16"}, "slicegpt")],
)
def test_auto_writes_the_family_architecture_where_it_holds_the_checkpoint(slicing, options, arch, tmp_path):
    from slicegpt_export.exporters import export_artifact

    checkpoint = write_sliced_checkpoint("llama-tied", slicing, tmp_path / "checkpoint")
    path = export_artifact(format="gguf", checkpoint=checkpoint, out=tmp_path / "out", gguf_type="f32", **options)
    assert bytes(gguf.GGUFReader(path).fields["general.architecture"].parts[-1]).decode() == arch
