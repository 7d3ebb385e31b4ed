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

The rotation schemes decide which stage outputs get a basis of their own:

* ``stage`` (the paper): every stage output, so a sequential block carries two shortcuts;
* ``block``: one basis per block.  The attention stage writes back into the basis it read
  (Q_out = Q_in, a shortcut equal to the identity, not stored), so a sequential block carries
  one shortcut.  That basis serves two signals, the block input X and the mid-block residual
  X + attn(X), so its PCA runs on both: C = X^T X + Z^T Z with Z computed by the block's
  (not yet rotated) attention on the unsliced X;
* ``global``: one basis Q for every signal, from the PCA of the dense model's residual signals
  together, each normalised by its trace: C = sum_s C_s / tr(C_s).  Every shortcut is the
  identity and none is stored (only a head kept wider than the stream needs one, [I 0]);
* ``none``: no PCA; every signal keeps its full width in the original basis (Q = I, applied
  exactly), so only pruned MLP neurons (``intermediates``) make the model smaller.  No shortcut.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Protocol

import torch
from torch import nn

from slicegpt_export.checkpoint import LayerWidths
from slicegpt_export.converter.ffn import DEFAULT_SELECTION, prune_mlp
from slicegpt_export.converter.pca import ONE_PROCESS, Reduction, exact_gram_sum, masked_rows, principal_components
from slicegpt_export.modeling import MLP, AttentionContext, DecoderLayer, ResidualStage, SlicedModel, rms_norm

logger = logging.getLogger(__name__)

ROTATIONS = ("stage", "block", "global", "none")

class LayerFeed(Protocol):
    """Where rotate_and_slice takes each block from and hands it back to (see ResidentLayers, converter/streaming.py)."""

    def layer(self, idx: int) -> DecoderLayer:
        """Block `idx` of the fused model, in host memory (read and fused on first use)."""
        ...

    def release(self, idx: int) -> None:
        """Block `idx` is sliced: keep it, or write it out and drop it."""
        ...


class ResidentLayers:
    """The model's own blocks, all held in host memory: nothing to read and nothing to write."""

    def __init__(self, model: SlicedModel) -> None:
        self.model = model

    def layer(self, idx: int) -> DecoderLayer:
        return self.model.layers[idx]

    def release(self, idx: int) -> None:
        pass


def sliced_width(hidden_size: int, sparsity: float, round_to: int) -> int:
    """d = int((1 - s) * D) rounded down to a multiple of `round_to` (never below `round_to`)."""
    d = int((1 - sparsity) * hidden_size)
    d -= d % round_to
    return max(d, min(round_to, hidden_size))


def rotated_stages(model: SlicedModel, rotation: str) -> list[tuple[int, int]]:
    """(layer, stage) of every stage whose output gets its own basis, in order; the last one feeds the head."""
    if rotation not in ROTATIONS:
        raise ValueError(f"unknown rotation {rotation!r} (choose from {', '.join(ROTATIONS)})")
    if rotation == "none":  # the embedding's (identity) basis throughout, the head included
        return []
    if rotation == "global":  # one basis throughout; only the head's input may differ in width
        return [(len(model.layers) - 1, len(model.layers[-1].stages) - 1)]
    out = []
    for i, layer in enumerate(model.layers):
        stages = range(len(layer.stages)) if rotation == "stage" else [len(layer.stages) - 1]
        out += [(i, j) for j in stages]
    return out


def signal_names(model: SlicedModel, rotation: str) -> list[str]:
    """Names of the residual signals that get a basis: 'embedding', then 'layers.N.<shortcut name>' per rotated stage."""
    return ["embedding"] + [f"layers.{i}.{model.layers[i].stages[j].shortcut_name}" for i, j in rotated_stages(model, rotation)]


def uniform_widths(model: SlicedModel, rotation: str, width: int, head_width: int) -> list[int]:
    """The paper's widths: every signal `width`, the one feeding the head `head_width`."""
    n = len(signal_names(model, rotation))
    return [width] * (n - 1) + [head_width]


@dataclasses.dataclass
class SlicingResult:
    embedding_width: int
    layers: list[LayerWidths]
    head_in: int
    eigenvalues: dict[str, list[float]]  # signal name -> eigenvalues (descending) of its damped covariance
    head_inputs: list[torch.Tensor]  # the signal the head reads, per calibration batch: (B, T, head_in) on the device


@dataclasses.dataclass
class CalibrationBatch:
    ids: torch.Tensor  # (B, T) on the device
    mask: torch.Tensor | None  # (B, T) 1 = real token, None when all are real
    ctx: AttentionContext | None = None


#: rows of a matrix rotated at a time: the float64 copy of a vocab x D embedding is never made whole
ROW_CHUNK = 4096


def rotated_rows(weight: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """W Q computed in float64 a block of ROW_CHUNK rows at a time, cast back to W's dtype.  (rows, D) -> (rows, d)"""
    out = torch.empty(weight.shape[0], basis.shape[1], dtype=weight.dtype, device=weight.device)
    basis = basis.to(weight.device)
    for start in range(0, weight.shape[0], ROW_CHUNK):
        out[start : start + ROW_CHUNK] = (weight[start : start + ROW_CHUNK].double() @ basis).to(weight.dtype)
    return out


def rotate_inputs(linears: list[nn.Linear], basis: torch.Tensor) -> None:
    """W <- W Q (out x D -> out x d), computed in float64."""
    for lin in linears:
        lin.weight.data = rotated_rows(lin.weight.data, basis)


def rotate_outputs(linears: list[nn.Linear], basis: torch.Tensor) -> None:
    """W <- Q^T W and b <- Q^T b (D x in -> d x in), computed in float64."""
    for lin in linears:
        lin.weight.data = (basis.T @ lin.weight.data.double()).to(lin.weight.dtype)
        if lin.bias is not None:
            lin.bias.data = (basis.T @ lin.bias.data.double()).to(lin.bias.dtype)


def rotate_stage_outputs(stage: ResidualStage, basis: torch.Tensor) -> None:
    """The stage writes into basis Q (D x d): its output linears' rows (W <- Q^T W), or a post-norm stage's
    post_proj <- post_proj Q (its branch keeps D outputs; see modeling.ResidualStage)."""
    if stage.post_proj is not None:
        stage.post_proj = (stage.post_proj.double() @ basis).to(stage.post_proj.dtype)  # (D, d)
    else:
        rotate_outputs(stage.output_linears(), basis)


def rotate_embeddings(model: SlicedModel, basis: torch.Tensor) -> None:
    """Embedding outputs into the first basis Q_0 (D x d_0): E <- E Q_0, or embed_proj <- embed_proj Q_0 when tied."""
    dtype = model.embed_tokens.weight.dtype
    if model.tied:
        start = model.embed_proj.double() if model.embed_proj is not None else torch.eye(basis.shape[0], dtype=torch.float64)
        model.embed_proj = (start @ basis).to(dtype)  # (D, d_0)
    else:
        model.embed_tokens.weight.data = rotated_rows(model.embed_tokens.weight.data, basis)
    if model.embed_positions is not None:
        model.embed_positions.weight.data = rotated_rows(model.embed_positions.weight.data, basis)


def rotate_head_input(model: SlicedModel, basis: torch.Tensor) -> None:
    """The head reads the last basis Q_L (D x d_L): W <- W Q_L, or a tied head's proj <- Q_L^T proj."""
    if model.tied:
        proj = model.lm_head.proj
        proj.data = (basis.T @ proj.data.double()).to(proj.dtype)  # (d_L, D)
    else:
        rotate_inputs([model.lm_head], basis)


def covariance(signal_batches: list[list[torch.Tensor]], batches: list[CalibrationBatch], reduce: Reduction = ONE_PROCESS) -> torch.Tensor:
    """sum over signals, batches (and processes) of X^T X (padding rows excluded); (D, D) float64, the same bits
    however the batches are split between processes (pca.exact_gram_sum)."""
    return exact_gram_sum(lambda: (masked_rows(y, b.mask) for signals in signal_batches for y, b in zip(signals, batches)), reduce)


@torch.no_grad()
def tied_matrix_basis(
    model: SlicedModel, head_inputs: list[torch.Tensor], batches: list[CalibrationBatch], width: int, reduce: Reduction = ONE_PROCESS
) -> torch.Tensor:
    """U (D, e): where a tied embedding matrix E may be sliced to E U with least harm at both of its ends.

    E is read twice: rows E[t] by the embedding, and E z by the head, z = norm(x) @ proj (D).
    U holds the top e eigenvectors of C_E / tr(C_E) + C_z / tr(C_z), C_E the covariance of the
    rows the calibration tokens read, C_z that of the head's z.
    """
    E, proj = model.embed_tokens.weight, model.lm_head.proj
    device = head_inputs[0].device
    rows = [E[b.ids.cpu()].to(device) for b in batches]  # (B, T, D)
    zs = [rms_norm(x, model.config.hidden_size, model.config.norm_eps) @ proj.to(device) for x in head_inputs]  # (B, T, D)
    c_rows, c_z = covariance([rows], batches, reduce), covariance([zs], batches, reduce)
    _, Q = principal_components(c_rows / c_rows.diagonal().sum() + c_z / c_z.diagonal().sum())
    return Q[:, :width].cpu()  # (D, e) float64


def slice_tied_matrix(model: SlicedModel, U: torch.Tensor) -> None:
    """E <- E U (vocab, e), embed_proj <- U^T embed_proj, proj <- proj U: both ends read the same e columns."""
    dtype = model.embed_tokens.weight.dtype
    E = model.embed_tokens.weight
    E.data = rotated_rows(E.data, U)
    start = model.embed_proj.double() if model.embed_proj is not None else torch.eye(U.shape[0], dtype=torch.float64)
    model.embed_proj = (U.T @ start).to(dtype)  # (e, d_emb)
    proj = model.lm_head.proj
    proj.data = (proj.data.double() @ U).to(dtype)  # (head_in, e)


def mlp_gram(stage: ResidualStage, mlp: MLP, xs: list[torch.Tensor], batches: list[CalibrationBatch], reduce: Reduction) -> torch.Tensor:
    """Gram matrix A^T A (F, F) of the MLP's neuron activations on the stage inputs `xs` (as the sliced model sees them)."""
    return exact_gram_sum(lambda: (masked_rows(mlp.hidden(rms_norm(x, stage.full_width, stage.eps)), b.mask) for x, b in zip(xs, batches)), reduce)


def mid_block_preview(stage: ResidualStage, ys: list[torch.Tensor], batches: list[CalibrationBatch]) -> list[torch.Tensor]:
    """Z = Y + attn(Y): the mid-block residual of a block whose attention stage is still unrotated.  Each (B, T, D)."""
    return [stage(y, b.ctx) for y, b in zip(ys, batches)]


@torch.no_grad()
def dense_spectra(model: SlicedModel, batches: list[CalibrationBatch], *, rotation: str, device: torch.device) -> list[torch.Tensor]:
    """Eigenvalues (descending) of every signal of :func:`signal_names` in the fused, unsliced model.

    One forward over the calibration batches, layer by layer on `device`, with the same
    covariances the slicing pass takes (block rotation: input plus mid-block signal); budgets
    are planned from these spectra before anything is sliced.
    """
    rotated = set(rotated_stages(model, rotation))
    xs = embed_on_device(model, batches, device)
    spectra = []

    def spectrum(ys: list[torch.Tensor], next_layer: int) -> torch.Tensor:
        signals = [ys]
        if rotation == "block" and next_layer < len(model.layers) and len(model.layers[next_layer].stages) > 1:
            stage = model.layers[next_layer].stages[0].to(device)
            signals.append(mid_block_preview(stage, ys, batches))
            stage.to("cpu")
        return principal_components(covariance(signals, batches))[0].cpu()

    spectra.append(spectrum(xs, 0))
    for i, layer in enumerate(model.layers):
        layer.to(device)
        for j, stage in enumerate(layer.stages):
            xs = [stage(x, b.ctx) for x, b in zip(xs, batches)]  # (B, T, D)
            if (i, j) in rotated:
                spectra.append(spectrum(xs, i + 1))
        layer.to("cpu")
    return spectra


@torch.no_grad()
def global_basis(model: SlicedModel, batches: list[CalibrationBatch], *, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues and Q of C = sum_s C_s / tr(C_s) over every residual signal s of the fused, unsliced model.

    One forward over the calibration batches, layer by layer on `device`: the embedding output and
    every stage output each weigh the same, whatever their scale.  Returns ((D,), (D, D)) float64.
    """
    xs = embed_on_device(model, batches, device)
    total = torch.zeros(xs[0].shape[-1], xs[0].shape[-1], dtype=torch.float64, device=device)

    def add(signal: list[torch.Tensor]) -> None:
        cov = covariance([signal], batches)
        total.add_(cov / cov.diagonal().sum())

    add(xs)
    for layer in model.layers:
        layer.to(device)
        for stage in layer.stages:
            xs = [stage(x, b.ctx) for x, b in zip(xs, batches)]  # (B, T, D)
            add(xs)
        layer.to("cpu")
    return principal_components(total)


def embed_on_device(model: SlicedModel, batches: list[CalibrationBatch], device: torch.device) -> list[torch.Tensor]:
    """The embedding output of every batch, computed on `device` (each batch's attention context set on the way)."""
    dtype = model.embed_tokens.weight.dtype
    embeddings = [m for m in (model.embed_tokens, model.embed_positions) if m is not None]
    for m in embeddings:
        m.to(device)
    proj = model.embed_proj
    if proj is not None:
        model.embed_proj = proj.to(device)
    model.inv_freq = model.inv_freq.to(device)
    xs = []
    for b in batches:
        b.ctx, positions = model.attention_context(b.mask, b.ids.shape[1], None, device, dtype)
        xs.append(model.embed(b.ids, positions))  # (B, T, d_emb)
    for m in embeddings:
        m.to("cpu")
    if proj is not None:
        model.embed_proj = proj
    model.inv_freq = model.inv_freq.cpu()
    return xs


@torch.no_grad()
def rotate_and_slice(
    model: SlicedModel,
    batches: list[CalibrationBatch],
    *,
    widths: list[int],
    device: torch.device,
    rotation: str = "stage",
    intermediates: list[int] | None = None,
    ffn_selection: str = DEFAULT_SELECTION,
    on_layer: Callable[[int], None] | None = None,
    feed: LayerFeed | None = None,
    reduce: Reduction = ONE_PROCESS,
) -> SlicingResult:
    """Rotate and slice a fused model in place; `widths` has one width per signal of :func:`signal_names`.

    `intermediates` (one per block) prunes each MLP to that many neurons, chosen as `ffn_selection` says
    (converter/ffn.py), on the inputs the sliced model gives it.  Weights move to `device` one layer at a time; the
    calibration activations stay there.  Blocks come from `feed` (default: the model's own) and
    go back to it once sliced; with block rotation the next block is taken early (its attention
    previews the mid-block signal).  `reduce` sums every covariance and Gram matrix over the
    processes of a data-parallel run before it is decomposed (exactly: pca.exact_gram_sum), so each process
    slices alike, and alike with any number of processes.
    """
    feed = feed if feed is not None else ResidentLayers(model)
    rotated = set(rotated_stages(model, rotation))
    if len(widths) != len(rotated) + 1:
        raise ValueError(f"{len(widths)} widths for {len(rotated) + 1} signals")
    if rotation == "global" and reduce is not ONE_PROCESS:
        raise ValueError("global rotation is not data-parallel")
    dtype = model.embed_tokens.weight.dtype
    eigenvalues: dict[str, list[float]] = {}
    next_width = iter(widths)
    shared = None
    if rotation == "global":
        eig, shared = global_basis(model, batches, device=device)  # (D,), (D, D)
        eigenvalues["global"] = eig.tolist()
        if widths[-1] == widths[0]:
            rotated = set()  # the head reads the stream's own basis: no shortcut at all
    elif rotation == "none":
        D = model.config.hidden_size
        if widths != [D]:
            raise ValueError(f"rotation none keeps the full width {D}, not {widths}")
        shared = torch.eye(D, dtype=torch.float64, device=device)  # every product with it below is exact
    xs = embed_on_device(model, batches, device)  # (B, T, D) each

    def basis_for(name: str, ys: list[torch.Tensor], next_layer: int) -> torch.Tensor:
        """The first columns of the PCA of the signal `ys` (plus the next block's mid signal with block rotation)."""
        if shared is not None:
            return shared[:, : next(next_width)]
        signals = [ys]
        preview = rotation == "block" and next_layer < len(model.layers) and len(model.layers[next_layer].stages) > 1
        if preview:
            stage = feed.layer(next_layer).stages[0].to(device)
            signals.append(mid_block_preview(stage, ys, batches))
            stage.to("cpu")
        eig, Q = principal_components(covariance(signals, batches, reduce))
        eigenvalues[name] = eig.tolist()
        return Q[:, : next(next_width)]  # (D, d) float64

    basis = basis_for("embedding", xs, 0)
    rotate_embeddings(model, basis.cpu())
    xs = [x @ basis.to(dtype) for x in xs]  # (B, T, d_0)

    layer_widths: list[LayerWidths] = []
    for i in range(len(model.layers)):
        layer = feed.layer(i).to(device)
        stage_widths: list[tuple[int, int]] = []
        for j, stage in enumerate(layer.stages):
            d_in = basis.shape[1]
            rotate_inputs(stage.input_linears(), basis)
            mlp = stage.branches["mlp"] if "mlp" in stage.branches else None
            if mlp is not None and intermediates is not None and intermediates[i] < mlp.up_proj.out_features:
                prune_mlp(mlp, mlp_gram(stage, mlp, xs, batches, reduce), intermediates[i], selection=ffn_selection)
            if (i, j) in rotated:
                stage.shortcut = basis.T.to(dtype)  # (d_in, D): back to the original basis
                ys = [stage(x, b.ctx) for x, b in zip(xs, batches)]  # (B, T, D)
                out_basis = basis_for(f"layers.{i}.{stage.shortcut_name}", ys, i + 1)  # (D, d_out)
                stage.shortcut = (basis.T @ out_basis).to(dtype)  # (d_in, d_out)
                rotate_stage_outputs(stage, out_basis)
                xs = [y @ out_basis.to(dtype) for y in ys]  # (B, T, d_out)
                basis = out_basis
            else:  # the stage writes back into the basis it read: identity shortcut, not stored
                stage.shortcut = None
                rotate_stage_outputs(stage, basis)
                xs = [stage(x, b.ctx) for x, b in zip(xs, batches)]  # (B, T, d_in)
            stage.d_in, stage.d_out = d_in, basis.shape[1]
            stage_widths.append((stage.d_in, stage.d_out))
        layer.to("cpu")
        (a_in, a_out), (m_in, m_out) = stage_widths[0], stage_widths[-1]
        kept = intermediates[i] if intermediates is not None else None
        layer_widths.append(LayerWidths(attn_in=a_in, attn_out=a_out, mlp_in=m_in, mlp_out=m_out, intermediate=kept))
        feed.release(i)
        if on_layer is not None:
            on_layer(i)
    rotate_head_input(model, basis.cpu())
    return SlicingResult(widths[0], layer_widths, basis.shape[1], eigenvalues, xs)
