"""Least-squares block rounding of GGUF q8_0/q4_0 (exporters/quantize.py) against ggml's reference rounding."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
from tiny import write_sliced_checkpoint

from slicegpt_export.errors import SliceGPTError
from slicegpt_export.exporters.gguf import export_gguf
from slicegpt_export.exporters.quantize import quantize

Q = gguf.GGMLQuantizationType
#: total squared error against the reference rounding's, on 64K weights: measured 0.851 (q8_0) and 0.887 (q4_0) on
#: Gaussian weights, 0.922 and 0.934 on heavy-tailed ones (Student's t, 3 degrees of freedom)
BOUND = {"normal": 0.90, "heavy": 0.95}


def weights(kind: str) -> np.ndarray:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((256, 256)) if kind == "normal" else rng.standard_t(3, (256, 256))
    return (0.02 * x).astype(np.float32)  # (256, 256): rows of eight 32-blocks


def block_errors(x: np.ndarray, qtype: Q, rounding: str) -> np.ndarray:
    """Squared error of each 32-block of `x` read back as gguf-py reads the file."""
    stored = quantize(x, qtype, rounding)
    assert stored.dtype == np.uint8 and stored.shape == tuple(gguf.quant_shape_to_byte_shape(x.shape, qtype))
    return ((gguf.quants.dequantize(stored, qtype) - x) ** 2).reshape(-1, 32).sum(axis=1)


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0], ids=["q8_0", "q4_0"])
@pytest.mark.parametrize("kind", ["normal", "heavy"])
def test_least_squares_blocks_err_less_than_the_reference(qtype, kind):
    x = weights(kind)
    ours, reference = block_errors(x, qtype, "least-squares"), block_errors(x, qtype, "nearest")
    assert (ours <= reference).all()  # the reference's rounding is one of the candidates
    assert ours.sum() <= BOUND[kind] * reference.sum(), ours.sum() / reference.sum()


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0], ids=["q8_0", "q4_0"])
def test_representable_and_zero_blocks_come_back_exactly(qtype):
    rng = np.random.default_rng(1)
    qmin, qmax = (-128, 127) if qtype == Q.Q8_0 else (-8, 7)
    d = rng.uniform(1e-3, 1e-2, (64, 1)).astype(np.float16).astype(np.float32)  # (64, 1): f16 scales
    levels = rng.integers(qmin, qmax + 1, (64, 32)).astype(np.float32)
    levels[:, 0] = qmin  # the extreme on the wide side, which the reference's own scale does not reach in q8_0
    x = np.concatenate([d * levels, np.zeros((1, 32), np.float32)])  # (65, 32): the last block all zero
    assert block_errors(x, qtype, "least-squares").max() == 0.0


def test_files_hold_the_reference_rounding_or_a_closer_one(tmp_path):
    checkpoint = write_sliced_checkpoint("llama", 0.0, tmp_path / "checkpoint")  # rotated at width 64: no padding

    def tensors(gguf_type: str, **kwargs) -> dict[str, gguf.ReaderTensor]:
        path = export_gguf(
            checkpoint=checkpoint,
            out=tmp_path / f"{gguf_type}-{kwargs.get('rounding')}",
            gguf_type=gguf_type,
            basis="aligned",
            **kwargs,
        )
        return {t.name: t for t in gguf.GGUFReader(path).tensors}

    exact, nearest, ours = tensors("f32"), tensors("q8_0", rounding="nearest"), tensors("q8_0", rounding="least-squares")
    blocks = [name for name, t in ours.items() if t.tensor_type == Q.Q8_0]
    assert len(blocks) >= 10  # every matrix
    for name in blocks:
        x = np.asarray(exact[name].data)  # the float32 weights both files round
        assert np.array_equal(np.asarray(nearest[name].data), gguf.quants.quantize(x, Q.Q8_0)), name  # llama-quantize's bits
        err = {
            k: ((gguf.quants.dequantize(f[name].data, Q.Q8_0) - x) ** 2).sum() for k, f in (("nearest", nearest), ("ours", ours))
        }
        assert err["ours"] <= err["nearest"], (name, err)
    with pytest.raises(SliceGPTError, match="unknown rounding 'stochastic'"):
        export_gguf(checkpoint=checkpoint, out=tmp_path / "bad", gguf_type="q8_0", rounding="stochastic")
