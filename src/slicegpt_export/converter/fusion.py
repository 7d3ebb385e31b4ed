"""Norm fusion (SliceGPT section 3.2): make every norm a weightless RMSNorm so the model is rotation-invariant.

With residual signal x and a norm N(x) = g * x / rms(x) (+ b for LayerNorm) read by a linear
W (out x D):  W N(x) = (W diag(g)) x / rms(x) + W b.  So g is folded into W's columns and b into
W's bias.  A LayerNorm also subtracts the mean of x; that is removed by making every signal
written to the residual mean-free (the paper's matrix M = I - 1 1^T / D applied to the
embeddings and to the rows of every output linear), after which LayerNorm == RMSNorm.
RMSNorm families get no mean subtraction: it would change the function.  A tied embedding
matrix E stays as it is (the head reads it too): the embedding's centering and the final
norm's scale go into the small matrices beside it (``embed_proj``, the tied head's ``proj``).
"""

from __future__ import annotations

import torch
from torch import nn

from slicegpt_export.converter.adapters.base import ATTN_NORM, ATTN_POST_NORM, FINAL_NORM, MLP_NORM, MLP_POST_NORM
from slicegpt_export.modeling import DecoderLayer, SlicedModel, TiedHead

STAGE_NORMS = (ATTN_NORM, MLP_NORM)  # norm read by a block's first and second residual stage


def fusable_norm_names(tensors: dict[str, torch.Tensor]) -> list[str]:
    """The residual-stream norms fusion folds away (pre-, post- and final norms); per-head q/k norms stay."""
    stems = {name.split(".")[-1] for name in (ATTN_NORM, MLP_NORM, ATTN_POST_NORM, MLP_POST_NORM)} | {FINAL_NORM}
    return [n for n in tensors if n.split(".")[-2] in stems]


def fold_norm(linears: list[nn.Linear], weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """W <- W diag(g) in place; b_W <- b_W + W b (the bias computed in float64)."""
    for lin in linears:
        W = lin.weight.data  # (out, D)
        if bias is not None:
            shift = W.double() @ bias.double()  # (out,)
            new_bias = shift if lin.bias is None else lin.bias.data.double() + shift
            lin.bias = nn.Parameter(new_bias.to(W.dtype), requires_grad=False)
        W.mul_(weight.to(W.dtype)[None, :])  # one rounding, as exact as a float64 product cast back


def center_rows(weight: torch.Tensor) -> torch.Tensor:
    """Subtract the mean over the last (width) axis: rows of an embedding become mean-free."""
    w = weight.double()
    return (w - w.mean(dim=-1, keepdim=True)).to(weight.dtype)


def center_output_linear(lin: nn.Linear) -> None:
    """Make the D-dim output of a residual writer mean-free: W <- M W, b <- M b."""
    W = lin.weight.data.double()  # (D, in)
    lin.weight.data = (W - W.mean(dim=0, keepdim=True)).to(lin.weight.dtype)
    if lin.bias is not None:
        b = lin.bias.data.double()
        lin.bias.data = (b - b.mean()).to(lin.bias.dtype)


def fold_norm_into_tied_head(head: TiedHead, embedding: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """The final norm g x + b read by logits = (x @ proj) E^T: proj <- diag(g) proj, b_head <- b_head + (b @ proj) E^T."""
    proj = head.proj.data  # (D, D) before rotation
    if bias is not None:
        shift = embedding.double() @ (bias.double() @ proj.double())  # (vocab,)
        new_bias = shift if head.bias is None else head.bias.data.double() + shift
        head.bias = nn.Parameter(new_bias.to(proj.dtype), requires_grad=False)
    proj.mul_(weight.to(proj.dtype)[:, None])


def centering_matrix(width: int, dtype: torch.dtype) -> torch.Tensor:
    """M = I - 1 1^T / D: x @ M subtracts the mean of x's coordinates.  (D, D)"""
    return (torch.eye(width, dtype=torch.float64) - 1.0 / width).to(dtype)


def post_norm_projections(norms: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """Each post-norm g * y / rms(y) (Gemma 2/3) as its stage's (D, D) post_proj = diag(g), popped from `norms`.

    The branch output y keeps its D coordinates and the norm becomes weightless (see
    modeling.ResidualStage); slicing then multiplies post_proj by the stage's output basis.
    """
    out = {}
    for i in range(num_layers):
        for norm, proj in ((ATTN_POST_NORM, "attn_post_proj"), (MLP_POST_NORM, "mlp_post_proj")):
            weight = norms.pop(f"{norm.format(i=i)}.weight", None)
            if weight is not None:
                out[f"layers.{i}.{proj}"] = torch.diag(weight)  # (D, D)
    return out


def scale_embeddings(model: SlicedModel, scale: float) -> None:
    """Token embeddings times `scale` (Gemma: sqrt(D)): into embed_proj when E is tied to the head, else into E."""
    if scale == 1.0:
        return
    dtype = model.embed_tokens.weight.dtype
    if model.tied:
        start = model.embed_proj.double() if model.embed_proj is not None else torch.eye(model.config.hidden_size, dtype=torch.float64)
        model.embed_proj = (start * scale).to(dtype)  # (D, D)
    else:
        model.embed_tokens.weight.data = (model.embed_tokens.weight.data.double() * scale).to(dtype)


def fuse_norms(model: SlicedModel, norms: dict[str, torch.Tensor], *, norm_kind: str) -> None:
    """Fold the source's norm parameters (canonical names, see adapters.base) into `model` in place.

    A tied embedding E is read by the head too, so it is never modified: its centering goes
    into ``embed_proj`` (= M) and the final norm into the tied head's ``proj``.
    """
    fuse_global_norms(model, norms, norm_kind=norm_kind)
    for i, layer in enumerate(model.layers):
        fuse_layer_norms(layer, i, norms, norm_kind=norm_kind)


def check_norm_kind(norm_kind: str) -> None:
    if norm_kind not in ("rms", "layer"):
        raise ValueError(f"unknown norm kind {norm_kind!r}")


def fuse_global_norms(model: SlicedModel, norms: dict[str, torch.Tensor], *, norm_kind: str) -> None:
    """The embedding's centering (LayerNorm families) and the final norm into the head: everything outside the blocks."""
    check_norm_kind(norm_kind)
    if norm_kind == "layer":
        if model.tied:
            model.embed_proj = centering_matrix(model.config.hidden_size, model.embed_tokens.weight.dtype)
        else:
            model.embed_tokens.weight.data = center_rows(model.embed_tokens.weight.data)
        if model.embed_positions is not None:
            model.embed_positions.weight.data = center_rows(model.embed_positions.weight.data)
    final_weight, final_bias = norms[f"{FINAL_NORM}.weight"], norms.get(f"{FINAL_NORM}.bias")
    if model.tied:
        fold_norm_into_tied_head(model.lm_head, model.embed_tokens.weight.data, final_weight, final_bias)
    else:
        fold_norm([model.lm_head], final_weight, final_bias)


def fuse_layer_norms(layer: DecoderLayer, idx: int, norms: dict[str, torch.Tensor], *, norm_kind: str) -> None:
    """Block `idx`'s pre-norms into the linears that read them; LayerNorm families also center what the block writes."""
    check_norm_kind(norm_kind)
    if norm_kind == "layer":
        for stage in layer.stages:
            for lin in stage.output_linears():
                center_output_linear(lin)
    for stage, norm_name in zip(layer.stages, STAGE_NORMS):
        name = norm_name.format(i=idx)
        fold_norm(stage.input_linears(), norms[f"{name}.weight"], norms.get(f"{name}.bias"))
