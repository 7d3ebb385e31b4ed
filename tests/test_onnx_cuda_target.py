"""The CUDA-target ONNX graph (GroupQueryAttention, fused skip norms), checked on the CPU provider, which has a
kernel for each of its ops; scripts/gpu_check.sh runs it on the CUDA provider where a GPU is lent."""

from __future__ import annotations

import json

import onnx
import pytest
from tiny import write_sliced_checkpoint

from slicegpt_export.errors import SliceGPTError
from slicegpt_export.exporters.onnx import export_onnx
from slicegpt_export.validation.onnx_runner import validate_onnx

#: families whose tiny models meet GroupQueryAttention's kernel limits (head size a multiple of 16, rotated channels too)
FAMILIES = ["llama", "llama-tied", "mistral", "opt", "qwen2", "smollm3"]
#: largest |logit difference| from the reference: fp32 as the CPU graph's bound; fp16 rounding of 16-channel heads
BOUNDS = {"fp32": 1e-4, "fp16": 2e-2}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("cuda-target")
    return {family: write_sliced_checkpoint(family, 0.25, root / family) for family in FAMILIES}


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("family", FAMILIES)
def test_cuda_graph_matches_the_reference_on_the_cpu_provider(family, precision, checkpoints, tmp_path):
    out = export_onnx(checkpoint=checkpoints[family], out=tmp_path / "onnx", precision=precision, execution_provider="cuda")
    results = validate_onnx(out, checkpoints[family], tolerance=BOUNDS[precision])  # prefill of 2 prompts, then 4 greedy steps
    assert max(r.max_abs_diff for r in results) <= BOUNDS[precision]
    assert min(r.top1_agreement for r in results) >= 0.5


def test_cuda_graph_uses_the_builders_ops(checkpoints, tmp_path):
    out = export_onnx(checkpoint=checkpoints["llama"], out=tmp_path / "onnx", precision="fp16", execution_provider="cuda")
    ops = {n.op_type for n in onnx.load(str(out / "model.onnx"), load_external_data=False).graph.node}
    assert {"GroupQueryAttention", "SkipSimplifiedLayerNormalization", "SimplifiedLayerNormalization"} <= ops
    assert "Attention" not in ops and "RMSNormalization" not in ops
    config = json.loads((out / "genai_config.json").read_text())
    assert config["model"]["decoder"]["session_options"]["provider_options"] == [{"cuda": {}}]


def test_cuda_graph_refuses_head_sizes_its_kernel_cannot_run(tmp_path):
    checkpoint = write_sliced_checkpoint("qwen3", 0.25, tmp_path / "qwen3")  # head size 24
    with pytest.raises(SliceGPTError, match="multiple of 16"):
        export_onnx(checkpoint=checkpoint, out=tmp_path / "onnx", execution_provider="cuda")
    assert not (tmp_path / "onnx").exists()
