"""Zero-padding of residual widths, so that block-quantized exports quantize every matrix, and the
incoherent basis, in which their 8-bit rounding costs less.

Block quantizers (GGUF q8_0/q4_0, ONNX MatMulNBits) work on rows whose length is a multiple of
their block (32).  A sliced width such as 432 is not, and a matrix reading a 432-wide signal
would fall back to 16 bits.  Padding a residual width d to d' = ceil(d / 32) * 32 with zero
coordinates is exact:

* the padded coordinates of the residual stay zero: the embedding writes zeros there, and every
  writer into the residual (o_proj, down_proj, shortcuts, their biases) has zero rows there;
* readers (q/k/v, gate/up, shortcuts, the head) get zero columns there, so they read nothing;
* SliceGPT's norm divides by the original width D, not by d', so zeros change no norm.

Both are one map per residual signal: every tensor dimension that indexes a residual signal of
width d is multiplied by U (d' x d, orthonormal columns), writers as U W and readers as W U^T, so
W U^T U W' = W W' and the network is unchanged.  Padding is U = [I; 0].  The incoherent basis
U = R [I; 0], R = C diag(s) (the orthonormal DCT-II of size d' with random signs s, the same for
every signal of width d'), is as exact in real arithmetic, and it matters after PCA: Q_l puts the
residual's largest-variance directions (its outlier features) in the first coordinates, so a
32-wide block of a quantized activation or weight that holds one of them rounds its other 31
entries to almost nothing.  llama.cpp quantizes the activations of its q8_0 matmuls too, and the
shortcuts read the raw residual, outliers and all: in the PCA basis their q8_0 rounding costs
SmolLM2 several percent of perplexity.  R spreads every coordinate over all d' (each |R_ij| <=
sqrt(2/d')), as QuaRot's Hadamard rotations do, so that no block is dominated by one feature.

The transformed checkpoint is an ordinary sliced checkpoint whose widths are the padded ones.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from collections.abc import Callable, Iterator, Mapping

import torch
import torch.nn.functional as F

from slicegpt_export.checkpoint import LayerWidths, SlicedConfig

logger = logging.getLogger(__name__)

#: the random signs of the incoherent basis (fixed: a file's bits do not depend on the run)
INCOHERENCE_SEED = 0

#: name -> {tensor dim (0 or -1): width d of the residual signal it indexes}
Plan = dict[str, dict[int, int]]


def padded(width: int, multiple: int) -> int:
    return -(-width // multiple) * multiple


def pad_dims(t: torch.Tensor, rows: int | None = None, cols: int | None = None) -> torch.Tensor:
    """`t` with zero rows (dim 0) and/or zero columns (dim -1) appended up to the given sizes."""
    if t.dim() == 1:
        return F.pad(t, (0, (rows or t.shape[0]) - t.shape[0]))
    return F.pad(t, (0, (cols or t.shape[1]) - t.shape[1], 0, (rows or t.shape[0]) - t.shape[0]))


@functools.lru_cache(maxsize=8)
def incoherent_rotation(n: int) -> torch.Tensor:
    """R = C diag(s) (n, n) float64: C the orthonormal DCT-II, C_kj = sqrt(2/n) cos(pi (j + 1/2) k / n) (row 0:
    sqrt(1/n)), s random signs from INCOHERENCE_SEED.  Closed form: the same bits on any machine and thread count."""
    k = torch.arange(n, dtype=torch.float64)[:, None]
    j = torch.arange(n, dtype=torch.float64)[None, :]
    C = torch.cos(math.pi * (j + 0.5) * k / n) * math.sqrt(2.0 / n)  # (n, n)
    C[0] = math.sqrt(1.0 / n)
    g = torch.Generator().manual_seed(INCOHERENCE_SEED)
    signs = torch.randint(0, 2, (n,), generator=g).double() * 2 - 1  # (n,)
    return C * signs[None, :]


def apply_basis(t: torch.Tensor, dims: dict[int, int], multiple: int, incoherent: bool) -> torch.Tensor:
    """`t` with each residual dim (dim -> its width d) multiplied by U (d' x d): dim 0 as U t, dim -1 as t U^T."""
    if not incoherent:
        return pad_dims(t, rows=padded(dims[0], multiple) if 0 in dims else None,
                        cols=padded(dims[-1], multiple) if -1 in dims else None)  # fmt: skip
    out = t.float()  # float32: the file rounds it to 8 bits, and a 7B embedding in float64 would take 1 GB more
    for dim, d in dims.items():
        U = incoherent_rotation(padded(d, multiple))[:, :d].float()  # (d', d)
        out = U @ out if dim == 0 or out.dim() == 1 else out @ U.T
    return out


class ResidualTensors(Mapping[str, torch.Tensor]):
    """`tensors` seen through the residual maps of `plan` (padding, optionally incoherent); each tensor is
    transformed when read, so a lazily read checkpoint stays lazy."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], plan: Plan, multiple: int, *, incoherent: bool) -> None:
        self.tensors, self.plan, self.multiple, self.incoherent = tensors, plan, multiple, incoherent

    def __getitem__(self, name: str) -> torch.Tensor:
        t = self.tensors[name]
        return apply_basis(t, self.plan[name], self.multiple, self.incoherent) if name in self.plan else t

    def shape(self, name: str) -> tuple[int, ...]:
        """The transformed shape, from the underlying mapping's `shape` (a lazy checkpoint's headers) without reading."""
        shape = list(self.tensors.shape(name))  # type: ignore[attr-defined]
        for dim, d in self.plan.get(name, {}).items():
            shape[dim if len(shape) > 1 else 0] = padded(d, self.multiple)
        return tuple(shape)

    def __contains__(self, name: object) -> bool:
        return name in self.tensors

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)


def residual_plan(cfg: SlicedConfig, tensors: Mapping[str, torch.Tensor]) -> Plan:
    """Every tensor dimension that indexes a residual signal (or the tied matrix's columns), with that signal's width."""
    plan: Plan = {}

    def mark(name: str, rows: int | None = None, cols: int | None = None) -> None:
        if name in tensors:
            dims = plan.setdefault(name, {})
            dims.update({dim: d for dim, d in ((0, rows), (-1, cols)) if d is not None})

    tied_width = cfg.tied_width or cfg.hidden_size  # the tied matrix E (vocab, e): its own e-wide space
    if cfg.tied_embeddings:
        mark("embed_tokens.weight", cols=tied_width)
        mark("embed_proj", rows=tied_width, cols=cfg.embedding_width)
        mark("lm_head.proj", rows=cfg.head_in, cols=tied_width)
    else:
        mark("embed_tokens.weight", cols=cfg.embedding_width)
        mark("lm_head.weight", cols=cfg.head_in)
    mark("embed_positions.weight", cols=cfg.embedding_width)
    for i, w in enumerate(cfg.layers):
        for proj in ("q_proj", "k_proj", "v_proj"):
            mark(f"layers.{i}.{proj}.weight", cols=w.attn_in)
        mark_stage_output(mark, i, "o_proj", "attn_post_proj", w.attn_out, post_norms=cfg.post_norms)
        mark(f"layers.{i}.attn_shortcut", rows=w.attn_in, cols=w.attn_out)
        for proj in ("gate_proj", "up_proj"):
            mark(f"layers.{i}.{proj}.weight", cols=w.mlp_in)
        mark_stage_output(mark, i, "down_proj", "mlp_post_proj", w.mlp_out, post_norms=cfg.post_norms)
        mark(f"layers.{i}.mlp_shortcut", rows=w.mlp_in, cols=w.mlp_out)
    return plan


def mark_stage_output(mark: Callable[..., None], i: int, linear: str, post_proj: str, width: int, *, post_norms: bool) -> None:
    """The matrix that writes a stage's output: the output linear's rows, or (post-norms) the post_proj's columns."""
    if post_norms:  # the linear keeps its D rows (see modeling.ResidualStage)
        mark(f"layers.{i}.{post_proj}", cols=width)
    else:
        mark(f"layers.{i}.{linear}.weight", rows=width)
        mark(f"layers.{i}.{linear}.bias", rows=width)


def pad_residual_widths(
    cfg: SlicedConfig, tensors: Mapping[str, torch.Tensor], multiple: int, *, incoherent: bool = False
) -> tuple[SlicedConfig, Mapping[str, torch.Tensor]]:
    """The checkpoint with every residual width padded to a multiple of `multiple` (exact, see above), in the
    incoherent basis when asked; tensors are transformed as they are read."""
    p = lambda w: padded(w, multiple)  # noqa: E731
    residual = ("attn_in", "attn_out", "mlp_in", "mlp_out")
    widths = [cfg.embedding_width, cfg.head_in, cfg.tied_width or 0] + [getattr(w, f) for w in cfg.layers for f in residual]
    if not incoherent and all(w == p(w) for w in widths):
        return cfg, tensors
    plan = residual_plan(cfg, tensors)
    layers = [LayerWidths(p(w.attn_in), p(w.attn_out), p(w.mlp_in), p(w.mlp_out), w.intermediate) for w in cfg.layers]
    logger.info("residual widths padded to multiples of %d (exact: zero coordinates)%s", multiple,
                ", in the incoherent basis" if incoherent else "")  # fmt: skip
    # the tied matrix's columns: a sliced width padded; all D columns (None) padded only where D is not aligned
    tied_width = p(cfg.tied_width or cfg.hidden_size) if cfg.tied_width or p(cfg.hidden_size) != cfg.hidden_size else None
    cfg = dataclasses.replace(cfg, embedding_width=p(cfg.embedding_width), layers=layers, head_in=p(cfg.head_in),
                              tied_width=tied_width if cfg.tied_embeddings else None)  # fmt: skip
    return cfg, ResidualTensors(tensors, plan, multiple, incoherent=incoherent)
