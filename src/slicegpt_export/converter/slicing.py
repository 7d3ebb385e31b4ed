"""Rotation and slicing (SliceGPT section 3.4), interleaved with calibration layer by layer.

Notation: the residual entering residual stage j lives in basis Q_in (D x d_in, the first
d_in principal directions of that signal).  For each stage:

1. rotate the stage's input linears: W <- W Q_in (they now read the sliced signal);
2. run the stage with shortcut Q_in^T and unrotated output linears, which gives its output
   signal Y (tokens x D) in the original basis, exactly as the sliced model computes it;
3. PCA of Y gives Q_out; keep d_out columns;
4. shortcut <- Q_in^T Q_out[:, :d_out] (d_in x d_out); output linears: W <- Q_out^T W;
5. the next stage's input is Y Q_out[:, :d_out].

A sequential block has two stages (attention, MLP), a parallel block one, so one loop serves
both.  The head reads the last basis: W_head <- W_head Q_last.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

import torch
from torch import nn

from slicegpt_export.checkpoint import LayerWidths
from slicegpt_export.converter.pca import CovarianceAccumulator, principal_components
from slicegpt_export.modeling import AttentionContext, SlicedModel

logger = logging.getLogger(__name__)


def sliced_width(hidden_size: int, sparsity: float, round_to: int) -> int:
    """d = int((1 - s) * D) rounded down to a multiple of `round_to` (never below `round_to`)."""
    d = int((1 - sparsity) * hidden_size)
    d -= d % round_to
    return max(d, min(round_to, hidden_size))


@dataclasses.dataclass
class SlicingResult:
    embedding_width: int
    layers: list[LayerWidths]
    head_in: int
    eigenvalues: dict[str, list[float]]  # signal name -> eigenvalues (descending) of its damped covariance


@dataclasses.dataclass
class CalibrationBatch:
    ids: torch.Tensor  # (B, T) on the device
    mask: torch.Tensor | None  # (B, T) 1 = real token, None when all are real
    ctx: AttentionContext | None = None


def rotate_inputs(linears: list[nn.Linear], basis: torch.Tensor) -> None:
    """W <- W Q (out x D -> out x d), computed in float64."""
    for lin in linears:
        lin.weight.data = (lin.weight.data.double() @ basis).to(lin.weight.dtype)


def rotate_outputs(linears: list[nn.Linear], basis: torch.Tensor) -> None:
    """W <- Q^T W and b <- Q^T b (D x in -> d x in), computed in float64."""
    for lin in linears:
        lin.weight.data = (basis.T @ lin.weight.data.double()).to(lin.weight.dtype)
        if lin.bias is not None:
            lin.bias.data = (basis.T @ lin.bias.data.double()).to(lin.bias.dtype)


def pca_of(signals: list[torch.Tensor], batches: list[CalibrationBatch]) -> tuple[torch.Tensor, torch.Tensor]:
    acc = CovarianceAccumulator(signals[0].shape[-1], signals[0].device)
    for y, batch in zip(signals, batches):
        acc.add(y, batch.mask)
    return principal_components(acc.cov)


@torch.no_grad()
def rotate_and_slice(
    model: SlicedModel,
    batches: list[CalibrationBatch],
    *,
    width: int,
    head_width: int,
    device: torch.device,
    on_layer: Callable[[int], None] | None = None,
) -> SlicingResult:
    """Rotate and slice a fused model in place; every stage output gets `width`, the last one `head_width`.

    Weights move to `device` one layer at a time; the calibration activations stay there.
    """
    dtype = model.embed_tokens.weight.dtype
    eigenvalues: dict[str, list[float]] = {}
    embeddings = [m for m in (model.embed_tokens, model.embed_positions) if m is not None]
    for m in embeddings:
        m.to(device)
    model.inv_freq = model.inv_freq.to(device)
    xs = []
    for b in batches:
        b.ctx, positions = model.attention_context(b.mask, b.ids.shape[1], None, device, dtype)
        xs.append(model.embed(b.ids, positions))  # (B, T, D)
    eig, Q = pca_of(xs, batches)
    eigenvalues["embedding"] = eig.tolist()
    basis = Q[:, :width]  # (D, d_0) float64
    for m in embeddings:
        m.weight.data = (m.weight.data.double() @ basis).to(dtype)
        m.to("cpu")
    xs = [x @ basis.to(dtype) for x in xs]  # (B, T, d_0)

    widths: list[LayerWidths] = []
    last = len(model.layers) - 1
    for i, layer in enumerate(model.layers):
        layer.to(device)
        stage_widths: list[tuple[int, int]] = []
        for j, stage in enumerate(layer.stages):
            d_in = basis.shape[1]
            d_out = head_width if (i == last and j == len(layer.stages) - 1) else width
            rotate_inputs(stage.input_linears(), basis)
            stage.shortcut = basis.T.to(dtype)  # (d_in, D): back to the original basis
            ys = [stage(x, b.ctx) for x, b in zip(xs, batches)]  # (B, T, D)
            eig, Q = pca_of(ys, batches)
            eigenvalues[f"layers.{i}.{stage.shortcut_name}"] = eig.tolist()
            out_basis = Q[:, :d_out]  # (D, d_out)
            stage.shortcut = (basis.T @ out_basis).to(dtype)  # (d_in, d_out)
            stage.d_in, stage.d_out = d_in, d_out
            rotate_outputs(stage.output_linears(), out_basis)
            xs = [y @ out_basis.to(dtype) for y in ys]  # (B, T, d_out)
            basis = out_basis
            stage_widths.append((d_in, d_out))
        layer.to("cpu")
        (a_in, a_out), (m_in, m_out) = stage_widths[0], stage_widths[-1]
        widths.append(LayerWidths(attn_in=a_in, attn_out=a_out, mlp_in=m_in, mlp_out=m_out))
        if on_layer is not None:
            on_layer(i)
    rotate_inputs([model.lm_head], basis.to(model.lm_head.weight.device))
    model.inv_freq = model.inv_freq.cpu()
    embedding_width = model.embed_tokens.weight.shape[1]
    return SlicingResult(embedding_width, widths, basis.shape[1], eigenvalues)
