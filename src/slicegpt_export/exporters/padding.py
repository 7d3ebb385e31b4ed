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

The aligned basis goes one step further for the shortcuts.  Each U may be any orthonormal map, one
per residual signal, so the signal after a shortcut S_l = Q_l^T Q_{l+1} may take the U_{l+1} that
brings U_l S_l U_{l+1}^T closest to the identity J = [I 0; 0 0] (orthogonal Procrustes: the polar
factor of J^T U_l S_l).  The first signal (and a tied matrix's own space) takes the incoherent
basis.  The shortcut is then J plus a small correction, and a writer may store the correction
alone (x S' = x J + x Δ, see ResidualTensors.shortcut_delta): its 8-bit rounding errs in proportion to
the correction, not to the residual it carries (exporters/gguf.py, `slicegpt.shortcut_delta`).

The transformed checkpoint is an ordinary sliced checkpoint whose widths are the padded ones.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import math
from collections.abc import Callable, Iterator, Mapping

import torch
import torch.nn.functional as F

from slicegpt_export.checkpoint import LayerWidths, SlicedConfig, is_shortcut

logger = logging.getLogger(__name__)

#: the random signs of the incoherent basis (fixed: a file's bits do not depend on the run)
INCOHERENCE_SEED = 0

#: a residual signal: (its name, its width d); the name says which signals share a basis
Signal = tuple[str, int]

#: name -> {tensor dim (0 or -1): the residual signal it indexes}
Plan = dict[str, dict[int, Signal]]

#: how each residual signal is stored (see the module docstring)
BASES = ("pca", "incoherent", "aligned")


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


def apply_basis(t: torch.Tensor, dims: dict[int, Signal], multiple: int, maps: Mapping[str, torch.Tensor] | None) -> torch.Tensor:
    """`t` with each residual dim multiplied by its signal's U (d' x d): dim 0 as U t, dim -1 as t U^T; zero-padding
    (U = [I; 0]) when `maps` is None."""
    if maps is None:
        return pad_dims(t, rows=padded(dims[0][1], multiple) if 0 in dims else None,
                        cols=padded(dims[-1][1], multiple) if -1 in dims else None)  # fmt: skip
    out = t.float()  # float32: the file rounds it to 8 bits, and a 7B embedding in float64 would take 1 GB more
    for dim, (signal, _) in dims.items():
        U = maps[signal].float()  # (d', d)
        out = U @ out if dim == 0 or out.dim() == 1 else out @ U.T
    return out


def incoherent_map(d: int, multiple: int) -> torch.Tensor:
    """U = R [I; 0] (d', d) float64: the incoherent basis of a d-wide signal."""
    return incoherent_rotation(padded(d, multiple))[:, :d]


def aligned_map(U_in: torch.Tensor, S: torch.Tensor, d_out_padded: int) -> torch.Tensor:
    """The U_out (d_out', d_out) with orthonormal columns that brings U_in S U_out^T closest to J = [I 0; 0 0] in
    Frobenius norm: maximise <U_in S U_out^T, J> = <U_out, J^T U_in S>, so U_out is the polar factor P V^T of
    M = J^T U_in S = P Sigma V^T (orthogonal Procrustes).  U_in (d_in', d_in) and S (d_in, d_out) float64."""
    A = U_in @ S  # (d_in', d_out)
    M = pad_dims(A[:d_out_padded], rows=d_out_padded)  # (d_out', d_out): J^T A
    P, _, Vh = torch.linalg.svd(M, full_matrices=False)  # (d_out', d_out), (d_out, d_out)
    return P @ Vh


def signal_maps(plan: Plan, tensors: Mapping[str, torch.Tensor], multiple: int, basis: str) -> dict[str, torch.Tensor] | None:
    """U (d', d) float64 of every residual signal in `basis`; None for "pca" (zero-padding).  "aligned" follows the
    residual stream: each shortcut's output signal is aligned to its input's (aligned_map); a signal reached without
    a shortcut keeps its predecessor's U; signals no shortcut reaches start incoherent."""
    if basis not in BASES:
        raise ValueError(f"unknown basis {basis!r}")
    if basis == "pca":
        return None
    signals = dict(sorted({s for dims in plan.values() for s in dims.values()}, key=lambda s: signal_order(s[0])))
    maps = {name: incoherent_map(d, multiple) for name, d in signals.items()}
    if basis == "incoherent":
        return maps
    shortcuts = {dims[-1][0]: (name, dims[0][0]) for name, dims in plan.items() if is_shortcut(name)}  # out -> (tensor, in)
    stream = [name for name in signals if name != "tied"]
    for prev, name in itertools.pairwise(stream):  # consecutive signals are a stage's input and output
        if name in shortcuts:
            shortcut, source = shortcuts[name]
            maps[name] = aligned_map(maps[source], tensors[shortcut].double(), padded(signals[name], multiple))
        else:  # an omitted shortcut is the identity: the same basis
            maps[name] = maps[prev]
    return maps


def signal_order(name: str) -> tuple[int, int]:
    """Stream order of signal names: "tied" first, then "r0", "r1", ..."""
    return (0, 0) if name == "tied" else (1, int(name[1:]))


class ResidualTensors(Mapping[str, torch.Tensor]):
    """`tensors` seen through the residual maps of `plan` (signal_maps; None: zero-padding); each tensor is
    transformed when read, so a lazily read checkpoint stays lazy."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], plan: Plan, multiple: int, maps: Mapping[str, torch.Tensor] | None) -> None:
        self.tensors, self.plan, self.multiple, self.maps = tensors, plan, multiple, maps

    def __getitem__(self, name: str) -> torch.Tensor:
        t = self.tensors[name]
        return apply_basis(t, self.plan[name], self.multiple, self.maps) if name in self.plan else t

    def shape(self, name: str) -> tuple[int, ...]:
        """The transformed shape, from the underlying mapping's `shape` (a lazy checkpoint's headers) without reading."""
        shape = list(self.tensors.shape(name))  # type: ignore[attr-defined]
        for dim, (_, d) in self.plan.get(name, {}).items():
            shape[dim if len(shape) > 1 else 0] = padded(d, self.multiple)
        return tuple(shape)

    def signal_map(self, signal: Signal) -> torch.Tensor:
        """U (d', d) float64 of a residual signal ([I; 0] when zero-padding)."""
        name, d = signal
        return self.maps[name] if self.maps is not None else torch.eye(padded(d, self.multiple), d, dtype=torch.float64)

    def shortcut_delta(self, name: str) -> torch.Tensor:
        """The correction a writer stores for shortcut `name` when J = [I 0; 0 0] is applied exactly (x S' = x J + x Δ),
        (d_in', d_out') float32.  x lies in the span of U_in, so the rows of Δ outside it are free: they are zero, and
        Δ = U_in (S U_out^T - U_in^T J) = S' - P_in J with P_in = U_in U_in^T.  Its size is what the aligned basis
        minimises (aligned_map); J's rows outside the span cost nothing."""
        dims = self.plan[name]
        U_in, U_out = self.signal_map(dims[0]), self.signal_map(dims[-1])  # (d_in', d_in), (d_out', d_out)
        S = self.tensors[name].double()  # (d_in, d_out)
        J = torch.eye(U_in.shape[0], U_out.shape[0], dtype=torch.float64)  # (d_in', d_out')
        return (U_in @ (S @ U_out.T - U_in.T @ J)).float()

    def __contains__(self, name: object) -> bool:
        return name in self.tensors

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)


def residual_plan(cfg: SlicedConfig, tensors: Mapping[str, torch.Tensor]) -> Plan:
    """Every tensor dimension that indexes a residual signal (or the tied matrix's columns), with that signal.

    Signals are named in stream order: "r0" leaves the embedding, each stage (a sequential block has two, a parallel
    block one) reads "r{p}" and writes "r{p+1}", the head reads the last; "tied" is the tied matrix's own space."""
    plan: Plan = {}

    def mark(name: str, rows: Signal | None = None, cols: Signal | None = None) -> None:
        if name in tensors:
            dims = plan.setdefault(name, {})
            dims.update({dim: s for dim, s in ((0, rows), (-1, cols)) if s is not None})

    tied = ("tied", cfg.tied_width or cfg.hidden_size)  # the tied matrix E (vocab, e): its own e-wide space
    stream = ("r0", cfg.embedding_width)
    if cfg.tied_embeddings:
        mark("embed_tokens.weight", cols=tied)
        mark("embed_proj", rows=tied, cols=stream)
    else:
        mark("embed_tokens.weight", cols=stream)
    mark("embed_positions.weight", cols=stream)
    p = 0
    for i, w in enumerate(cfg.layers):
        attn_in, attn_out = (f"r{p}", w.attn_in), (f"r{p + 1}", w.attn_out)
        mlp_in, mlp_out = (attn_in, attn_out) if cfg.block_kind == "parallel" else (attn_out, (f"r{p + 2}", w.mlp_out))
        for proj in ("q_proj", "k_proj", "v_proj"):
            mark(f"layers.{i}.{proj}.weight", cols=attn_in)
        mark_stage_output(mark, i, "o_proj", "attn_post_proj", attn_out, post_norms=cfg.post_norms)
        mark(f"layers.{i}.attn_shortcut", rows=attn_in, cols=attn_out)
        for proj in ("gate_proj", "up_proj"):
            mark(f"layers.{i}.{proj}.weight", cols=mlp_in)
        mark_stage_output(mark, i, "down_proj", "mlp_post_proj", mlp_out, post_norms=cfg.post_norms)
        mark(f"layers.{i}.mlp_shortcut", rows=mlp_in, cols=mlp_out)
        p = int(mlp_out[0][1:])
    head_in = (f"r{p}", cfg.head_in)
    if cfg.tied_embeddings:
        mark("lm_head.proj", rows=head_in, cols=tied)
    else:
        mark("lm_head.weight", cols=head_in)
    return plan


def mark_stage_output(mark: Callable[..., None], i: int, linear: str, post_proj: str, signal: Signal, *, post_norms: bool) -> None:
    """The matrix that writes a stage's output: the output linear's rows, or (post-norms) the post_proj's columns."""
    if post_norms:  # the linear keeps its D rows (see modeling.ResidualStage)
        mark(f"layers.{i}.{post_proj}", cols=signal)
    else:
        mark(f"layers.{i}.{linear}.weight", rows=signal)
        mark(f"layers.{i}.{linear}.bias", rows=signal)


def pad_residual_widths(
    cfg: SlicedConfig, tensors: Mapping[str, torch.Tensor], multiple: int, *, basis: str = "pca"
) -> tuple[SlicedConfig, Mapping[str, torch.Tensor]]:
    """The checkpoint with every residual width padded to a multiple of `multiple` (exact, see above), each residual
    signal in `basis` (BASES); tensors are transformed as they are read."""
    p = lambda w: padded(w, multiple)  # noqa: E731
    residual = ("attn_in", "attn_out", "mlp_in", "mlp_out")
    widths = [cfg.embedding_width, cfg.head_in, cfg.tied_width or 0] + [getattr(w, f) for w in cfg.layers for f in residual]
    if basis == "pca" and all(w == p(w) for w in widths):
        return cfg, tensors
    plan = residual_plan(cfg, tensors)
    maps = signal_maps(plan, tensors, multiple, basis)
    layers = [LayerWidths(p(w.attn_in), p(w.attn_out), p(w.mlp_in), p(w.mlp_out), w.intermediate) for w in cfg.layers]
    logger.info("residual widths padded to multiples of %d, residual signals in the %s basis (exact)", multiple, basis)
    # the tied matrix's columns: a sliced width padded; all D columns (None) padded only where D is not aligned
    tied_width = p(cfg.tied_width or cfg.hidden_size) if cfg.tied_width or p(cfg.hidden_size) != cfg.hidden_size else None
    cfg = dataclasses.replace(cfg, embedding_width=p(cfg.embedding_width), layers=layers, head_in=p(cfg.head_in),
                              tied_width=tied_width if cfg.tied_embeddings else None)  # fmt: skip
    return cfg, ResidualTensors(tensors, plan, multiple, maps)
