"""Zero-padding of residual widths, so that block-quantized exports quantize every matrix.

Block quantizers (GGUF q8_0/q4_0, ONNX MatMulNBits) work on rows whose length is a multiple of
their block (32).  A sliced width such as 432 is not, and a matrix reading a 432-wide signal
would fall back to 16 bits.  Padding a residual width d to d' = ceil(d / 32) * 32 with zero
coordinates is exact:

* the padded coordinates of the residual stay zero: the embedding writes zeros there, and every
  writer into the residual (o_proj, down_proj, shortcuts, their biases) has zero rows there;
* readers (q/k/v, gate/up, shortcuts, the head) get zero columns there, so they read nothing;
* SliceGPT's norm divides by the original width D, not by d', so zeros change no norm.

The padded checkpoint is an ordinary sliced checkpoint whose widths are the padded ones.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterator, Mapping

import torch
import torch.nn.functional as F

from slicegpt_export.checkpoint import LayerWidths, SlicedConfig

logger = logging.getLogger(__name__)


def padded(width: int, multiple: int) -> int:
    return -(-width // multiple) * multiple


def pad_dims(t: torch.Tensor, rows: int | None = None, cols: int | None = None) -> torch.Tensor:
    """`t` with zero rows (dim 0) and/or zero columns (dim -1) appended up to the given sizes."""
    if t.dim() == 1:
        return F.pad(t, (0, (rows or t.shape[0]) - t.shape[0]))
    return F.pad(t, (0, (cols or t.shape[1]) - t.shape[1], 0, (rows or t.shape[0]) - t.shape[0]))


def pad_stage_output(pad: Callable[..., None], i: int, linear: str, post_proj: str, width: int, *, post_norms: bool) -> None:
    """The matrix that writes a stage's output: the output linear's rows, or (post-norms) the post_proj's columns."""
    if post_norms:  # the linear keeps its D rows (see modeling.ResidualStage)
        pad(f"layers.{i}.{post_proj}", cols=width)
    else:
        pad(f"layers.{i}.{linear}.weight", rows=width)
        pad(f"layers.{i}.{linear}.bias", rows=width)


class PaddedTensors(Mapping[str, torch.Tensor]):
    """`tensors` seen through a plan of zero-padding (name -> (rows, cols)); each tensor is padded when read,
    so a lazily read checkpoint stays lazy."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], plan: dict[str, tuple[int | None, int | None]]) -> None:
        self.tensors, self.plan = tensors, plan

    def __getitem__(self, name: str) -> torch.Tensor:
        t = self.tensors[name]
        return pad_dims(t, *self.plan[name]) if name in self.plan else t

    def shape(self, name: str) -> tuple[int, ...]:
        """The padded shape, from the underlying mapping's `shape` (a lazy checkpoint's headers) without reading."""
        shape = list(self.tensors.shape(name))  # type: ignore[attr-defined]
        rows, cols = self.plan.get(name, (None, None))
        if rows is not None:
            shape[0] = rows
        if cols is not None and len(shape) > 1:
            shape[-1] = cols
        return tuple(shape)

    def __contains__(self, name: object) -> bool:
        return name in self.tensors

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)


def pad_residual_widths(
    cfg: SlicedConfig, tensors: Mapping[str, torch.Tensor], multiple: int
) -> tuple[SlicedConfig, Mapping[str, torch.Tensor]]:
    """The checkpoint with every residual width padded to a multiple of `multiple` (exact, see above); tensors are
    padded as they are read."""
    p = lambda w: padded(w, multiple)  # noqa: E731
    residual = ("attn_in", "attn_out", "mlp_in", "mlp_out")
    widths = [cfg.embedding_width, cfg.head_in, cfg.tied_width or 0] + [getattr(w, f) for w in cfg.layers for f in residual]
    if all(w == p(w) for w in widths):
        return cfg, tensors
    plan: dict[str, tuple[int | None, int | None]] = {}

    def pad(name: str, rows: int | None = None, cols: int | None = None) -> None:
        if name in tensors:
            old_rows, old_cols = plan.get(name, (None, None))
            plan[name] = (rows or old_rows, cols or old_cols)

    d_emb, d_head = p(cfg.embedding_width), p(cfg.head_in)
    tied_width = p(cfg.tied_width) if cfg.tied_width else None  # a sliced tied matrix E (vocab, e): zero columns
    if tied_width:
        pad("embed_tokens.weight", cols=tied_width)
        pad("embed_proj", rows=tied_width)
        pad("lm_head.proj", cols=tied_width)
    pad("embed_proj" if cfg.tied_embeddings else "embed_tokens.weight", cols=d_emb)
    pad("embed_positions.weight", cols=d_emb)
    pad("lm_head.proj" if cfg.tied_embeddings else "lm_head.weight", **({"rows": d_head} if cfg.tied_embeddings else {"cols": d_head}))
    layers = []
    for i, w in enumerate(cfg.layers):
        a_in, a_out, m_in, m_out = p(w.attn_in), p(w.attn_out), p(w.mlp_in), p(w.mlp_out)
        for proj in ("q_proj", "k_proj", "v_proj"):
            pad(f"layers.{i}.{proj}.weight", cols=a_in)
        pad_stage_output(pad, i, "o_proj", "attn_post_proj", a_out, post_norms=cfg.post_norms)
        pad(f"layers.{i}.attn_shortcut", rows=a_in, cols=a_out)
        for proj in ("gate_proj", "up_proj"):
            pad(f"layers.{i}.{proj}.weight", cols=m_in)
        pad_stage_output(pad, i, "down_proj", "mlp_post_proj", m_out, post_norms=cfg.post_norms)
        pad(f"layers.{i}.mlp_shortcut", rows=m_in, cols=m_out)
        layers.append(LayerWidths(a_in, a_out, m_in, m_out, w.intermediate))
    logger.info("residual widths padded to multiples of %d (exact: zero coordinates)", multiple)
    return dataclasses.replace(cfg, embedding_width=d_emb, layers=layers, head_in=d_head, tied_width=tied_width), PaddedTensors(tensors, plan)
