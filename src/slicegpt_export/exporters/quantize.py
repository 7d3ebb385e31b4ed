"""Block quantization for GGUF files (q8_0, q4_0) with a least-squares scale per block.

A q8_0 or q4_0 block stores 32 weights x as one f16 scale d and 32 integers L in [qmin, qmax]
([-128, 127] or [-8, 7]); llama.cpp reads them as d * L.  ggml's reference rounding (gguf-py's
quantizers, bit for bit) fixes d from the block's largest magnitude (max|x| / 127; q4_0: the signed
extreme / -8), rounds x / d in f32, then stores d in f16, so the integers were rounded for a
slightly different scale than the one read back.  It errs by about d / sqrt(12) per weight.

Here each block tries several inverse scales t around the reference's, rounds L = clip(round(x t)),
takes the scale that fits those integers best (d = <x, L> / <L, L>, least squares), stores it in
f16, rounds L again for that stored d, and keeps the candidate with the least squared error
||x - d L||^2, the reference's own rounding among them, so that no block errs more than it does.
Slightly smaller steps that clip the extreme a little pay for themselves on the other 31 weights,
and the integers fit the stored scale.  The file format is unchanged: any GGUF reader reads these
blocks as it reads llama.cpp's own.  SmolLM2's sliced matrices round with 14% (q8_0) and 10% (q4_0)
less squared error than in the reference rounding; its sliced q8_0 files in llama.cpp sit 6-8% closer
to their reference in KL on average over three draws of the aligned basis (the unsliced model's: no
change), while perplexity moves by a few tenths of a percent either way with the draw
(bench/results/gguf_rounding.md).
"""

from __future__ import annotations

import dataclasses

import gguf
import numpy as np

Q = gguf.GGMLQuantizationType

#: how a file's block weights are rounded: "least-squares" (this module) or "nearest" (ggml's reference)
ROUNDINGS = ("least-squares", "nearest")

#: blocks per chunk: bounds the temporary arrays (each chunk's are a few times 2^16 x 32 values)
CHUNK_BLOCKS = 1 << 16


@dataclasses.dataclass(frozen=True)
class BlockFormat:
    """A symmetric block type: integers in [qmin, qmax] times one f16 scale per `block` weights."""

    qmin: int
    qmax: int
    block: int
    #: offsets s of the candidate inverse scales t = (qmax + s) / m and (qmin - s) / m, m the block's signed extreme
    offsets: tuple[float, ...]


#: q8_0's best blocks sit within two steps past the reference's scale (smaller steps, the extreme clipped); q4_0's within one
FORMATS = {
    Q.Q8_0: BlockFormat(qmin=-128, qmax=127, block=32, offsets=tuple(np.linspace(0.0, 2.0, 9))),
    Q.Q4_0: BlockFormat(qmin=-8, qmax=7, block=32, offsets=tuple(np.linspace(-1.0, 1.0, 9))),
}


def quantize(data: np.ndarray, qtype: Q, rounding: str = "least-squares") -> np.ndarray:
    """`data` (..., n) f32 as GGUF stores `qtype` (block types: uint8 (..., n / block * bytes per block))."""
    if rounding == "nearest" or qtype not in FORMATS:
        return gguf.quants.quantize(data, qtype)
    fmt = FORMATS[qtype]
    blocks = data.astype(np.float32, copy=False).reshape(-1, fmt.block)  # (n_blocks, block)
    out = np.concatenate([quantize_blocks(blocks[i : i + CHUNK_BLOCKS], qtype) for i in range(0, len(blocks), CHUNK_BLOCKS)])
    return out.reshape(*data.shape[:-1], -1)


def quantize_blocks(blocks: np.ndarray, qtype: Q) -> np.ndarray:
    """(n_blocks, block) f32 -> (n_blocks, bytes per block) uint8 in `qtype`'s layout, least-squares scales."""
    d, levels = least_squares_blocks(blocks, FORMATS[qtype], reference(blocks, qtype))
    return pack(d, levels, qtype)


def reference(blocks: np.ndarray, qtype: Q) -> tuple[np.ndarray, np.ndarray]:
    """ggml's own rounding of `blocks` as (d (n, 1) f16, L (n, block) int)."""
    stored = gguf.quants.quantize(blocks, qtype)  # (n, bytes per block)
    d = stored[:, :2].copy().view(np.float16)  # (n, 1)
    values = gguf.quants.dequantize(stored, qtype)  # (n, block): d * L
    with np.errstate(divide="ignore", invalid="ignore"):
        levels = np.where(d == 0, 0, np.rint(values / d.astype(np.float32)))
    return d, levels.astype(np.int16)


def least_squares_blocks(
    blocks: np.ndarray, fmt: BlockFormat, start: tuple[np.ndarray, np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """The (d (n, 1) f16, L (n, block) int16) of least squared error over the candidates and `start`."""
    x = blocks.astype(np.float32)  # (n, block)
    best_d, best_l = start
    best_err = squared_error(x, best_d, best_l)  # (n,)
    extreme = np.take_along_axis(x, np.abs(x).argmax(axis=1, keepdims=True), axis=1)  # (n, 1): signed
    nonzero = extreme != 0
    safe = np.where(nonzero, extreme, 1.0)
    for s in fmt.offsets:
        for target in (fmt.qmax + s, fmt.qmin - s):  # the extreme to just past qmax or past qmin (d's sign follows)
            t = np.where(nonzero, target / safe, 0.0)  # (n, 1): candidate inverse scale
            levels = np.clip(np.rint(x * t), fmt.qmin, fmt.qmax)  # (n, block)
            d = fitted_scale(x, levels)
            levels = rounded_levels(x, d, fmt)
            err = squared_error(x, d, levels)
            better = err < best_err
            best_err = np.where(better, err, best_err)
            best_d = np.where(better[:, None], d, best_d)
            best_l = np.where(better[:, None], levels, best_l)
    return best_d, best_l


def fitted_scale(x: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """argmin_d ||x - d L||^2 = <x, L> / <L, L> per block, in f16 (n, 1) (0 for an all-zero L)."""
    norm = (levels * levels).sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        d = np.where(norm == 0, 0.0, (x * levels).sum(axis=1, keepdims=True) / norm)
    return d.astype(np.float16)


def rounded_levels(x: np.ndarray, d: np.ndarray, fmt: BlockFormat) -> np.ndarray:
    """clip(round(x / d)) for the stored f16 scale d (n, 1); int16 (n, block)."""
    scale = d.astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        levels = np.where(scale == 0, 0, np.rint(x / scale))
    return np.clip(levels, fmt.qmin, fmt.qmax).astype(np.int16)


def squared_error(x: np.ndarray, d: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """||x - d L||^2 per block, (n,)."""
    return ((x - d.astype(np.float32) * levels) ** 2).sum(axis=1)


def pack(d: np.ndarray, levels: np.ndarray, qtype: Q) -> np.ndarray:
    """ggml's block layout: d as f16 bytes, then q8_0's int8 L, or q4_0's L + 8 two to a byte (i, i + 16)."""
    scale = d.astype(np.float16).view(np.uint8)  # (n, 2)
    if qtype == Q.Q8_0:
        return np.concatenate([scale, levels.astype(np.int8).view(np.uint8)], axis=1)
    q = (levels + 8).astype(np.uint8)  # (n, 32) in [0, 15]
    half = q.shape[1] // 2
    return np.concatenate([scale, q[:, :half] | (q[:, half:] << np.uint8(4))], axis=1)
