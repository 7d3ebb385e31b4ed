"""Layer-streamed conversion, sharded output and data-parallel calibration against the in-memory converter."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny import save_tiny_model

from slicegpt_export.checkpoint import parameter_count, read_config, read_tensors
from slicegpt_export.converter import streaming
from slicegpt_export.converter.convert import slice_checkpoint
from slicegpt_export.tensorio import WEIGHTS_INDEX_NAME, LazyTensors, ShardWriter

#: (family, slicing options): both rotations that stream, pruned MLPs, a sliced tied matrix, fused qkv
#: (Phi-3), post-norms (Gemma 2), q/k norms (Qwen3), LayerNorm (OPT) and a parallel block (Phi)
CASES = [
    ("llama", {"sparsity": 0.25}),
    ("llama-tied", {"sparsity": 0.25, "rotation": "block", "embed_keep": 0.75}),
    ("opt", {"sparsity": 0.25}),
    ("phi", {"sparsity": 0.25}),
    ("phi3", {"target_params": 0.8, "rotation": "block", "allocation": "uniform", "ffn_keep": 0.7}),
    ("gemma2", {"sparsity": 0.25}),
    ("qwen3", {"sparsity": 0.25, "rotation": "block"}),
]


@pytest.fixture(scope="module")
def calib_text(tmp_path_factory) -> Path:
    """Random printable text: every signal of the tiny models has a full-rank covariance (a rank-deficient one
    has a degenerate eigenspace, whose basis any rounding may turn)."""
    gen = torch.Generator().manual_seed(0)
    text = "".join(chr(32 + int(i)) for i in torch.randint(0, 95, (20000,), generator=gen))
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(text)
    return path


def slice_tiny(folder: Path, out: Path, calib: Path, **options) -> Path:
    slice_checkpoint(model=str(folder), out=out, calib=str(calib), calib_samples=6, calib_seqlen=32, calib_batch_size=4, device="cpu",
                     progress=False, **options)  # fmt: skip
    return out


@pytest.mark.parametrize(("family", "options"), CASES, ids=[c[0] for c in CASES])
def test_streamed_checkpoint_equals_in_memory(family, options, tmp_path, calib_text):
    """The same arithmetic in another order of reading: every tensor and the size record are identical."""
    folder = save_tiny_model(family, tmp_path / "src")
    streamed = slice_tiny(folder, tmp_path / "streamed", calib_text, **options)
    held = slice_tiny(folder, tmp_path / "held", calib_text, stream=False, **options)
    a, b = read_tensors(streamed), read_tensors(held)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert read_config(streamed)[0].size == read_config(held)[0].size


class CountingLayers(streaming.StreamedLayers):
    most_live = 0

    def layer(self, idx):
        out = super().layer(idx)
        CountingLayers.most_live = max(CountingLayers.most_live, len(self.live))
        return out


@pytest.mark.parametrize(("rotation", "most"), [("stage", 1), ("block", 2)])
def test_at_most_two_blocks_in_memory(rotation, most, tmp_path, calib_text, monkeypatch):
    """Stage rotation holds one block at a time; block rotation also the next one (its attention previews)."""
    from slicegpt_export.converter import convert

    folder = save_tiny_model("llama", tmp_path / "src")
    CountingLayers.most_live = 0
    with monkeypatch.context() as m:
        m.setattr(convert, "StreamedLayers", CountingLayers)
        out = slice_tiny(folder, tmp_path / "o", calib_text, sparsity=0.25, rotation=rotation)
    assert CountingLayers.most_live == most
    assert read_config(out)[0].num_layers == 2  # every block went through the feed


def to_bfloat16(folder: Path) -> None:
    path = folder / "model.safetensors"
    save_file({n: t.to(torch.bfloat16) for n, t in load_file(str(path)).items()}, str(path), metadata={"format": "pt"})


def test_bfloat16_source_writes_bfloat16_unless_told(tmp_path, calib_text):
    """--dtype defaults to the source's; the computation is float32 either way, so the two agree to bf16 rounding."""
    folder = save_tiny_model("llama", tmp_path / "src")
    to_bfloat16(folder)
    same = slice_tiny(folder, tmp_path / "bf16", calib_text, sparsity=0.25)
    wide = slice_tiny(folder, tmp_path / "f32", calib_text, sparsity=0.25, dtype=torch.float32)
    a, b = read_tensors(same), read_tensors(wide)
    assert {t.dtype for t in a.values()} == {torch.bfloat16}
    assert {t.dtype for t in b.values()} == {torch.float32}
    assert read_config(same)[0].calibration["dtype"] == "float32"
    for name in a:
        assert torch.equal(a[name], b[name].to(torch.bfloat16)), name


def test_sharded_output_follows_the_index_convention(tmp_path, calib_text):
    folder = save_tiny_model("llama", tmp_path / "src")
    one = slice_tiny(folder, tmp_path / "one", calib_text, sparsity=0.25)
    many = slice_tiny(folder, tmp_path / "many", calib_text, sparsity=0.25, max_shard_bytes=60_000)
    index = json.loads((many / WEIGHTS_INDEX_NAME).read_text())
    shards = sorted(p.name for p in many.glob("*.safetensors") if p.name != "eigenvalues.safetensors")
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert set(index["weight_map"].values()) == set(shards)
    assert not list(many.glob(".shard-*")), "temporary shard files left behind"
    a, b = read_tensors(one), read_tensors(many)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in b.values())
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def test_shard_writer_round_trip(tmp_path):
    gen = torch.Generator().manual_seed(1)
    tensors = {"a": torch.randn(3, 5, generator=gen).to(torch.bfloat16), "b": torch.arange(7), "c": torch.randn(()),
               "d": torch.tensor([True, False]), "e": torch.randn(40, 40, generator=gen)}  # fmt: skip
    writer = ShardWriter(tmp_path, max_shard_bytes=100)
    writer.add_all(tensors)
    written = writer.close()
    assert {n: (t.shape, t.dtype) for n, t in written.items()} == {n: (t.shape, t.dtype) for n, t in tensors.items()}
    loaded = read_tensors(tmp_path)
    assert all(torch.equal(loaded[n], tensors[n]) for n in tensors)
    lazy = LazyTensors(sorted(tmp_path.glob("model-*.safetensors")), dtype=torch.float64)
    assert lazy.shape("e") == (40, 40) and lazy.stored_dtype("a") == torch.bfloat16
    assert torch.equal(lazy.pop("a"), tensors["a"].double()) and "a" not in lazy and len(lazy) == 4


def test_a_lazy_mapping_counts_every_tensor_once(tmp_path):
    """Tensors of one shape read one after another may reuse one address; the count must still hold each of them."""
    gen = torch.Generator().manual_seed(2)
    tensors = {f"w{i}": torch.randn(64, 64, generator=gen) for i in range(4)}
    writer = ShardWriter(tmp_path)
    writer.add_all(tensors)
    writer.close()
    lazy = LazyTensors(sorted(tmp_path.glob("model*.safetensors")), dtype=torch.float32)
    assert parameter_count(lazy) == parameter_count(tensors) == 4 * 64 * 64


def run_slice(argv: list[str], *, threads: int = 1) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": str(threads)}
    return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600, check=False)


def test_two_gloo_processes_equal_one(tmp_path, calib_text):
    """torchrun with 2 processes (gloo, CPU, one thread each): the windows split, covariances all-reduced, process 0
    writes the very checkpoint one process with 2 threads writes."""
    folder = save_tiny_model("llama", tmp_path / "src")
    common = ["slice", "--model", str(folder), "--sparsity", "0.25", "--calib", str(calib_text), "--calib-samples", "8",
              "--calib-seqlen", "32", "--calib-batch-size", "2", "--device", "cpu"]  # fmt: skip
    single = run_slice([sys.executable, "-m", "slicegpt_export.cli", *common, "--out", str(tmp_path / "one")], threads=2)
    assert single.returncode == 0, single.stderr
    double = run_slice([sys.executable, "-m", "slicegpt_export.cli", *common, "--out", str(tmp_path / "two"), "--nproc", "2"])
    assert double.returncode == 0, double.stderr
    assert double.stdout.count("sliced checkpoint:") == 1  # process 0 alone reports
    a, b = read_tensors(tmp_path / "one"), read_tensors(tmp_path / "two")
    assert a.keys() == b.keys()
    for name in a:  # sums taken exactly (pca.exact_gram_sum), eigh on one thread (pca.one_cpu_thread): the same bits
        assert torch.equal(a[name], b[name]), name
    assert read_config(tmp_path / "two")[0].calibration["world_size"] == 2
    assert read_config(tmp_path / "one")[0].calibration["world_size"] == 1


@pytest.mark.parametrize("family", ["llama-tied", "gemma2", "phi3"])
def test_streamed_reference_matches_the_whole_model(family, tmp_path, calib_text):
    """validation.streamed runs every window block by block from the shards: logits as the whole model's, within 1e-5."""
    from slicegpt_export.checkpoint import load_sliced
    from slicegpt_export.validation.streamed import StreamedReference

    folder = save_tiny_model(family, tmp_path / "src")
    out = slice_tiny(folder, tmp_path / "o", calib_text, sparsity=0.25, max_shard_bytes=50_000)
    ids = torch.randint(0, 256, (5, 40), generator=torch.Generator().manual_seed(3))
    expected = load_sliced(out)(ids).logits
    got = torch.cat(list(StreamedReference(out, device=torch.device("cpu")).logits(ids, batch_size=2)))
    assert (got - expected).abs().max().item() <= 1e-5


def test_validate_streams_the_reference_one_block_at_a_time(tmp_path, calib_text, monkeypatch):
    """`validate --stream`: the reference's perplexity and the ONNX graph's logit difference as with the whole reference
    (within 1e-6), while no more than one block of the reference is ever off the meta device."""
    from slicegpt_export.exporters.onnx import export_onnx
    from slicegpt_export.validation import streamed
    from slicegpt_export.validation.report import validate_directory

    folder = save_tiny_model("llama", tmp_path / "src")
    out = tmp_path / "job"
    slice_tiny(folder, out / "checkpoint", calib_text, sparsity=0.25, max_shard_bytes=50_000)
    export_onnx(checkpoint=out / "checkpoint", out=out / "onnx")
    resident = {r.name: r for r in validate_directory(out, text=calib_text, seqlen=32, windows=6, batch_size=4)}
    most: list[int] = []
    block = streamed.StreamedReference.block

    def counted(self: streamed.StreamedReference, idx: int):
        layer = block(self, idx)
        most.append(sum(not next(m.parameters()).is_meta for m in self.model.layers))
        return layer

    monkeypatch.setattr(streamed.StreamedReference, "block", counted)
    streamed_results = {r.name: r for r in validate_directory(out, text=calib_text, seqlen=32, windows=6, batch_size=4, stream=True)}
    assert "dense source" in resident and "dense source" not in streamed_results  # the dense source would be loaded whole
    assert streamed_results["reference"].perplexity == pytest.approx(resident["reference"].perplexity, rel=1e-6)
    assert streamed_results["onnx"].max_abs_diff == pytest.approx(resident["onnx"].max_abs_diff, rel=1e-6, abs=1e-7)
    assert most and max(most) == 1
    from typer.testing import CliRunner

    from slicegpt_export.cli import app

    done = CliRunner().invoke(app, ["validate", str(out), "--text", str(calib_text), "--seqlen", "32", "--windows", "6", "--device", "cpu", "--stream"])
    assert done.exit_code == 0, done.output
    table = json.loads((out / "report.json").read_text())
    assert [r["name"] for r in table["artifacts"]] == ["reference", "onnx"]  # no dense source


@pytest.mark.parametrize("gguf_type", ["f16", "q8_0"])
def test_gguf_written_tensor_by_tensor_is_the_same_file_from_shards(gguf_type, tmp_path, calib_text):
    from slicegpt_export.exporters.gguf import export_gguf

    folder = save_tiny_model("llama", tmp_path / "src")
    one = slice_tiny(folder, tmp_path / "one", calib_text, sparsity=0.25)
    many = slice_tiny(folder, tmp_path / "many", calib_text, sparsity=0.25, max_shard_bytes=50_000)
    a = export_gguf(checkpoint=one, out=tmp_path / "g1", gguf_type=gguf_type)
    b = export_gguf(checkpoint=many, out=tmp_path / "g2", gguf_type=gguf_type)
    assert a.read_bytes() == b.read_bytes()


def test_onnx_weights_stream_to_external_data(tmp_path, calib_text):
    """Each weight goes to model.onnx.data as it is made; model.onnx holds the graph and small constants only."""
    import onnx

    from slicegpt_export.exporters.onnx import export_onnx

    folder = save_tiny_model("llama", tmp_path / "src")
    ckpt = slice_tiny(folder, tmp_path / "c", calib_text, sparsity=0.25, max_shard_bytes=50_000)
    out = export_onnx(checkpoint=ckpt, out=tmp_path / "onnx")
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    external = sum(int({e.key: e.value for e in t.external_data}["length"]) for t in graph.initializer
                   if t.data_location == onnx.TensorProto.EXTERNAL)  # fmt: skip
    weights = sum(t.numel() * 4 for t in read_tensors(ckpt).values())  # float32, as the fp32 graph stores them
    assert external >= 0.95 * weights
    assert (out / "model.onnx").stat().st_size < 64 * 1024 < (out / "model.onnx.data").stat().st_size


def test_cli_streams_keeps_the_source_dtype_and_checks_streamed_perplexity(tmp_path, calib_text):
    """`slice` on a bf16 source writes bf16 shards; `perplexity --stream` equals the in-memory figure."""
    from typer.testing import CliRunner

    from slicegpt_export.cli import app

    folder = save_tiny_model("llama", tmp_path / "src")
    to_bfloat16(folder)
    out = tmp_path / "sliced"
    runner = CliRunner()
    done = runner.invoke(app, ["slice", "--model", str(folder), "--out", str(out), "--sparsity", "0.25", "--calib", str(calib_text),
                               "--calib-samples", "4", "--calib-seqlen", "32", "--device", "cpu", "--max-shard-size", "0.00005"])  # fmt: skip
    assert done.exit_code == 0, done.output
    assert (out / WEIGHTS_INDEX_NAME).is_file()
    assert {t.dtype for t in read_tensors(out).values()} == {torch.bfloat16}
    figures = []
    for extra in ([], ["--stream"]):
        done = runner.invoke(app, ["perplexity", str(out), "--text", str(calib_text), "--seqlen", "64", "--windows", "4", "--device", "cpu", *extra])
        assert done.exit_code == 0, done.output
        figures.append(float(done.output.split("perplexity:")[-1].split()[0]))
    assert figures[0] == figures[1]


@pytest.mark.parametrize(("argv", "message"), [
    (["slice", "--out", "o", "--nproc", "0"], "--nproc must be at least 1"),
    (["export", "ckpt", "--out", "o", "--execution-provider", "tpu"], "unknown execution provider 'tpu'"),
])  # fmt: skip
def test_bad_options_end_in_one_line(argv, message, tmp_path, calib_text, monkeypatch):
    from typer.testing import CliRunner

    from slicegpt_export.cli import app

    monkeypatch.chdir(tmp_path)
    if argv[0] == "export":
        save_tiny_model("llama", tmp_path / "src")
        slice_tiny(tmp_path / "src", tmp_path / "ckpt", calib_text, sparsity=0.25)
    done = CliRunner().invoke(app, argv)
    assert done.exit_code == 2
    assert message in done.output and done.output.count("\n") == 1


def test_gguf_source_dequantized_block_by_block_equals_in_memory(tmp_path, wikitext):
    """The embedded SmolLM2 GGUF: each tensor dequantized when its block is sliced gives the in-memory checkpoint."""
    options = {"model": None, "sparsity": 0.25, "calib": str(wikitext / "valid.txt"), "calib_samples": 4, "calib_seqlen": 64,
               "device": "cpu", "progress": False}  # fmt: skip
    slice_checkpoint(out=tmp_path / "streamed", **options)
    slice_checkpoint(out=tmp_path / "held", stream=False, **options)
    a, b = read_tensors(tmp_path / "streamed"), read_tensors(tmp_path / "held")
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
