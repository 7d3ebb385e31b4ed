"""The sliced model definition: the PyTorch forward pass of any sliced checkpoint (the reference).

It implements the forward pass written down in the checkpoint's config (per-layer widths,
shortcut matrices on the residual, RMSNorm over the original width D) for every supported
family, from the recorded traits alone.  The converter runs calibration through the same
modules, so what is measured while slicing is exactly what the saved model computes; the
exporters and validation use it as the reference every artifact is checked against.

Shapes: B batch, T new tokens, S = past + T keys, D original width, d_l sliced widths,
H query heads, K key/value heads, hd head dim.

This module depends on torch alone: it is copied next to the weights of a sliced checkpoint
so that transformers can load the checkpoint with ``trust_remote_code=True``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from collections.abc import Callable

    from slicegpt_export.checkpoint import LayerWidths, RopeSpec, SlicedConfig


class ModelDefinitionError(ValueError):
    """The config and tensors do not describe a model this module can run."""

ACTIVATIONS = {
    "silu": F.silu,
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


def rms_norm(x: torch.Tensor, full_width: int, eps: float) -> torch.Tensor:
    """SliceGPT's weightless RMSNorm: x / sqrt(||x||^2 / D + eps), D the original width.

    On a sliced (d < D) signal the sum runs over the kept coordinates only, while the
    divisor stays D, which is what the rotated unsliced model computes when the dropped
    coordinates are zero.
    """
    variance = x.pow(2).sum(-1, keepdim=True) / full_width  # (..., 1)
    return x * torch.rsqrt(variance + eps)


def unscaled_inverse_frequencies(spec: RopeSpec) -> torch.Tensor:
    """theta^(-2i/dim) for i < dim/2, ignoring any scaling.  (dim/2,) float64."""
    return 1.0 / (spec.theta ** (torch.arange(0, spec.dim, 2, dtype=torch.float64) / spec.dim))


def rope_scaling_kind(spec: RopeSpec) -> str:
    """The scaling kind, default, linear, llama3 or longrope: the Hugging Face rope_scaling rope_type (or the older `type`)."""
    scaling = spec.scaling or {}
    return scaling.get("rope_type", scaling.get("type", "default"))


def longrope_original_context(spec: RopeSpec | None) -> int | None:
    """LongRoPE (Phi-3.5, Phi-4-mini): the pretraining context beyond which the long factors apply; None for other kinds."""
    if spec is None or rope_scaling_kind(spec) != "longrope":
        return None
    return int(spec.scaling["original_max_position_embeddings"])


def rope_attention_factor(spec: RopeSpec | None) -> float:
    """The factor LongRoPE multiplies cos and sin by (recorded by the adapter as Hugging Face computes it); 1 otherwise."""
    if longrope_original_context(spec) is None:
        return 1.0
    return float(spec.scaling["attention_factor"])


def rope_inverse_frequencies(spec: RopeSpec, *, long: bool = False) -> torch.Tensor:
    """inv_freq_i = theta^(-2i/dim), with Hugging Face's linear, llama3 or longrope scaling applied.  Returns (dim/2,) float64.

    LongRoPE divides by per-frequency factors: the short ones within the original context, the
    long ones (`long=True`) beyond it.
    """
    inv_freq = unscaled_inverse_frequencies(spec)
    scaling = spec.scaling or {}
    kind = rope_scaling_kind(spec)
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / float(scaling["factor"])
    if kind == "longrope":
        return inv_freq / torch.tensor(scaling["long_factor" if long else "short_factor"], dtype=torch.float64)
    if kind == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_context = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        low_wavelen, high_wavelen = old_context / low, old_context / high
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_context / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, smoothed, scaled)
    raise ModelDefinitionError(f"unsupported rope scaling type {kind!r} (supported: default, linear, llama3, longrope)")


def rope_frequency_divisors(spec: RopeSpec) -> torch.Tensor:
    """llama.cpp's `rope_freqs` form of a scaling: theta^(-2i/dim) / divisors = the scaled inv_freq.  (dim/2,) float32."""
    return (unscaled_inverse_frequencies(spec) / rope_inverse_frequencies(spec)).float()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first cos.shape[-1] channels of each head (x: (B, H, T, hd); cos, sin: (B, 1, T, r))."""
    r = cos.shape[-1]
    rotated, passed = x[..., :r], x[..., r:]
    rotated = rotated * cos + rotate_half(rotated) * sin
    return torch.cat((rotated, passed), dim=-1) if passed.shape[-1] else rotated


@dataclasses.dataclass
class KVCache:
    """Keys and values per layer, each (B, K, S, hd); grows by concatenation."""

    keys: list[torch.Tensor | None]
    values: list[torch.Tensor | None]

    @classmethod
    def empty(cls, num_layers: int) -> KVCache:
        return cls([None] * num_layers, [None] * num_layers)

    @property
    def length(self) -> int:
        k = self.keys[0]
        return 0 if k is None else k.shape[2]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.keys[layer] is not None:
            k = torch.cat((self.keys[layer], k), dim=2)
            v = torch.cat((self.values[layer], v), dim=2)
        self.keys[layer], self.values[layer] = k, v
        return k, v


@dataclasses.dataclass
class AttentionContext:
    """What every layer's attention needs for one forward call.

    Models whose layers differ (Gemma: sliding-window layers beside global ones, Gemma 3 with a
    rope of their own) carry a second set for the sliding layers; None = the same as the first.
    """

    cos: torch.Tensor | None  # (B, 1, T, r)
    sin: torch.Tensor | None
    mask: torch.Tensor | None  # (B, 1, T, S) bool, True = may attend; None = plain causal
    cache: KVCache | None
    local_mask: torch.Tensor | None = None  # sliding layers of a mixed model
    local_cos: torch.Tensor | None = None
    local_sin: torch.Tensor | None = None

    def for_layer(self, sliding: bool) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """(cos, sin, mask) of a global or a sliding-window layer."""
        if not sliding:
            return self.cos, self.sin, self.mask
        mask = self.local_mask if self.local_mask is not None else self.mask
        if self.local_cos is not None:
            return self.local_cos, self.local_sin, mask
        return self.cos, self.sin, mask


def layer_is_sliding(cfg: SlicedConfig, idx: int) -> bool:
    """Whether layer `idx` attends within the sliding window: every layer when the config names no pattern."""
    if cfg.sliding_window is None:
        return False
    pattern = getattr(cfg, "sliding_layers", None)
    return True if pattern is None else bool(pattern[idx])


def softcapped_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float, cap: float | None
) -> torch.Tensor:
    """softmax(cap * tanh(q k^T scale / cap)) v (Gemma 2's attention-logit soft-capping), in float32 softmax.

    q (B, H, T, hd); k, v (B, K, S, hd), K dividing H; mask (B, 1, T, S) bool or None (causal).  Returns (B, H, T, hd).
    """
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)  # (B, H, S, hd)
    scores = (q @ k.transpose(-1, -2)) * scale  # (B, H, T, S)
    if cap is not None:
        scores = cap * torch.tanh(scores / cap)
    if mask is None:
        T, S = scores.shape[-2:]
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1, dtype=torch.promote_types(q.dtype, torch.float32)).to(q.dtype) @ v


def linear(in_features: int, out_features: int, bias: bool) -> nn.Linear:
    return nn.Linear(in_features, out_features, bias=bias, device="meta")


class HeadNorm(nn.Module):
    """Qwen3's per-head RMSNorm of queries or keys: w * x / sqrt(mean(x^2) + eps) over head_dim.

    It acts after the projections, on head_dim, so slicing the residual never touches it.
    """

    def __init__(self, head_dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(head_dim, device="meta"), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, heads, T, hd), normalized in float32 (or float64) as transformers does for half precision."""
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: SlicedConfig, layer_idx: int, d_in: int, d_out: int) -> None:
        super().__init__()
        qkv_bias = cfg.bias["qkv"]
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = linear(d_in, cfg.num_heads * cfg.head_dim, qkv_bias)
        self.k_proj = linear(d_in, cfg.num_kv_heads * cfg.head_dim, qkv_bias)
        self.v_proj = linear(d_in, cfg.num_kv_heads * cfg.head_dim, qkv_bias)
        self.o_proj = linear(cfg.num_heads * cfg.head_dim, d_out, cfg.bias["attn_out"])
        self.sliding = layer_is_sliding(cfg, layer_idx)
        rope_layers = getattr(cfg, "rope_layers", None)
        self.use_rope = rope_layers is None or bool(rope_layers[layer_idx])  # SmolLM3: some layers without rope
        self.scale = getattr(cfg, "attention_scale", None) or 1.0 / math.sqrt(cfg.head_dim)
        self.softcap = getattr(cfg, "attn_logit_softcap", None)
        qk_norm = getattr(cfg, "qk_norm", False)
        self.q_norm = HeadNorm(cfg.head_dim, cfg.norm_eps) if qk_norm else None
        self.k_norm = HeadNorm(cfg.head_dim, cfg.norm_eps) if qk_norm else None

    def forward(self, x: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, K, T, hd)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin, mask = ctx.for_layer(self.sliding)
        if cos is not None and self.use_rope:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if ctx.cache is not None:
            k, v = ctx.cache.update(self.layer_idx, k, v)  # (B, K, S, hd)
        if self.softcap is not None:
            y = softcapped_attention(q, k, v, mask, self.scale, self.softcap)
        else:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=mask is None and T > 1, enable_gqa=self.num_kv_heads != self.num_heads,
                scale=self.scale,
            )  # (B, H, T, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: SlicedConfig, d_in: int, d_out: int, intermediate: int | None = None) -> None:
        super().__init__()
        n = intermediate or cfg.intermediate_size
        self.act = ACTIVATIONS[cfg.activation]
        self.gate_proj = linear(d_in, n, cfg.bias["mlp"]) if cfg.gated_mlp else None
        self.up_proj = linear(d_in, n, cfg.bias["mlp"])
        self.down_proj = linear(n, d_out, cfg.bias["mlp"])

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """The neurons' activations a = act(W_gate x) * (W_up x + b) (gated) or act(W_up x + b); (..., intermediate)."""
        if self.gate_proj is not None:
            return self.act(self.gate_proj(x)) * self.up_proj(x)
        return self.act(self.up_proj(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.hidden(x))


class ResidualStage(nn.Module):
    """One residual update: y = x @ shortcut + sum(branch(norm(x))) with a (d_in, d_out) shortcut.

    A sequential block has two stages (attention, then MLP), a parallel block one stage
    holding both branches.  Before slicing the shortcut is None (identity).

    Post-norm stages (Gemma 2/3: a weighted RMSNorm g * y / rms(y) on the branch output y before
    it joins the residual) cannot fold g into the branch's output rows the way a pre-norm folds
    into the rows that read it: rms(y) needs every one of the D coordinates of y in some
    orthonormal basis.  So the branch keeps its D outputs, the norm stays weightless over D,
    and a (D, d_out) ``post_proj`` = diag(g) Q_out[:, :d_out] carries the scale and the rotation
    into the sliced residual:  y_res = (y / rms_D(y)) @ diag(g) Q_out, exactly what the rotated
    model computes, since the rotation comes after the norm.  Cost: D x d_out more parameters per
    post-norm, and the output rows of o_proj / down_proj are not sliced.
    """

    def __init__(self, cfg: SlicedConfig, branches: dict[str, nn.Module], shortcut_name: str, d_in: int, d_out: int):
        super().__init__()
        self.full_width, self.eps = cfg.hidden_size, cfg.norm_eps
        self.branches = nn.ModuleDict(branches)
        self.shortcut_name = shortcut_name
        self.register_buffer("shortcut", None, persistent=False)  # (d_in, d_out) or None for identity
        self.post_norm = bool(getattr(cfg, "post_norms", False))
        self.post_proj_name = shortcut_name.replace("shortcut", "post_proj")
        self.register_buffer("post_proj", None, persistent=False)  # (D, d_out): post-norm stages only
        self.d_in, self.d_out = d_in, d_out

    def input_linears(self) -> list[nn.Linear]:
        """Linears that read the normed residual (their columns live in the residual basis)."""
        out: list[nn.Linear] = []
        for branch in self.branches.values():
            if isinstance(branch, Attention):
                out += [branch.q_proj, branch.k_proj, branch.v_proj]
            else:
                out += [m for m in (branch.gate_proj, branch.up_proj) if m is not None]
        return out

    def output_linears(self) -> list[nn.Linear]:
        """Linears that write into the residual (their rows live in the residual basis)."""
        return [b.o_proj if isinstance(b, Attention) else b.down_proj for b in self.branches.values()]

    def branch_sum(self, x: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        h = rms_norm(x, self.full_width, self.eps)
        out = None
        for branch in self.branches.values():
            y = branch(h, ctx) if isinstance(branch, Attention) else branch(h)
            out = y if out is None else out + y
        if self.post_norm:
            out = rms_norm(out, self.full_width, self.eps) @ self.post_proj  # (B, T, D) -> (B, T, d_out)
        return out

    def forward(self, x: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        residual = x if self.shortcut is None else x @ self.shortcut  # (B, T, d_out)
        return residual + self.branch_sum(x, ctx)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: SlicedConfig, idx: int, widths: LayerWidths) -> None:
        super().__init__()
        post = bool(getattr(cfg, "post_norms", False))  # branches then write D wide, before their post-norm
        attn = Attention(cfg, idx, widths.attn_in, cfg.hidden_size if post else widths.attn_out)
        intermediate = getattr(widths, "intermediate", None)  # older sections have none
        if cfg.block_kind == "sequential":
            mlp = MLP(cfg, widths.mlp_in, cfg.hidden_size if post else widths.mlp_out, intermediate)
            self.stages = nn.ModuleList(
                [
                    ResidualStage(cfg, {"attn": attn}, "attn_shortcut", widths.attn_in, widths.attn_out),
                    ResidualStage(cfg, {"mlp": mlp}, "mlp_shortcut", widths.mlp_in, widths.mlp_out),
                ]
            )
        elif cfg.block_kind == "parallel":
            mlp = MLP(cfg, widths.attn_in, widths.attn_out, intermediate)
            self.stages = nn.ModuleList([ResidualStage(cfg, {"attn": attn, "mlp": mlp}, "attn_shortcut", widths.attn_in, widths.attn_out)])
        else:
            raise ModelDefinitionError(f"unknown block kind {cfg.block_kind!r}")

    def forward(self, x: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        for stage in self.stages:
            x = stage(x, ctx)
        return x


@dataclasses.dataclass
class ReferenceOutput:
    logits: torch.Tensor  # (B, T, vocab)
    past_key_values: KVCache | None


def tied_width(cfg: SlicedConfig) -> int:
    """Columns of a tied embedding matrix: D, or fewer when the matrix itself was sliced (E U, U orthonormal D x e)."""
    return getattr(cfg, "tied_width", None) or cfg.hidden_size


class TiedHead(nn.Module):
    """The head of a model that stores its token embedding E (vocab, e) once: logits = (x @ proj) E^T + b.

    ``proj`` (head_in, e) carries what the untied head W = E diag(g) Q_L would hold besides E:
    the final norm's scale g and the rotation Q_L (sliced to head_in rows), proj = Q_L^T diag(g)
    (times U when E was sliced to E U).
    """

    def __init__(self, head_in: int, width: int, vocab_size: int, bias: bool) -> None:
        super().__init__()
        self.proj = nn.Parameter(torch.empty(head_in, width, device="meta"), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(vocab_size, device="meta"), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        """x (B, T, head_in), embedding (vocab, D) -> logits (B, T, vocab)."""
        return F.linear(x @ self.proj, embedding, self.bias)


class SlicedModel(nn.Module):
    """A sliced (or fused, unsliced) decoder built from a :class:`SlicedConfig`.

    Untied: ``embed_tokens`` (vocab, d_emb) and ``lm_head`` (vocab, head_in).  Tied
    (``cfg.tied_embeddings``): ``embed_tokens`` (vocab, e) is stored once and read by both ends
    (e = D, or ``cfg.tied_width`` when the matrix was sliced), the residual enters through
    ``embed_proj`` (e, d_emb; absent = identity) and leaves through the :class:`TiedHead`.
    """

    def __init__(self, cfg: SlicedConfig) -> None:
        super().__init__()
        self.config = cfg
        tied = bool(getattr(cfg, "tied_embeddings", False))
        self.embed_tokens = nn.Embedding(cfg.vocab_size, tied_width(cfg) if tied else cfg.embedding_width, device="meta")
        self.embed_positions = (
            nn.Embedding(cfg.max_position_embeddings + cfg.position_offset, cfg.embedding_width, device="meta")
            if cfg.position_embedding == "learned"
            else None
        )
        self.register_buffer("embed_proj", None, persistent=False)  # (D, d_emb) when tied; None = identity
        self.layers = nn.ModuleList([DecoderLayer(cfg, i, w) for i, w in enumerate(cfg.layers)])
        self.lm_head: nn.Module = (
            TiedHead(cfg.head_in, tied_width(cfg), cfg.vocab_size, cfg.bias["head"])
            if tied
            else linear(cfg.head_in, cfg.vocab_size, cfg.bias["head"])
        )
        inv_freq = rope_inverse_frequencies(cfg.rope) if cfg.rope is not None else torch.empty(0)
        self.register_buffer("inv_freq", inv_freq, persistent=False)  # (r/2,) float64
        self.longrope_context = longrope_original_context(cfg.rope)
        long_freq = rope_inverse_frequencies(cfg.rope, long=True) if self.longrope_context is not None else None
        self.register_buffer("inv_freq_long", long_freq, persistent=False)  # (r/2,) float64, LongRoPE only
        local = getattr(cfg, "local_rope", None)
        local_freq = rope_inverse_frequencies(local) if local is not None else None
        self.register_buffer("local_inv_freq", local_freq, persistent=False)  # (r/2,) float64: Gemma 3's sliding layers

    @property
    def tied(self) -> bool:
        return isinstance(self.lm_head, TiedHead)

    # ----- weights -----------------------------------------------------------------
    def residual_matrices(self) -> dict[str, tuple[nn.Module, str, tuple[int, int]]]:
        """Optional matrices on the residual path: checkpoint name -> (owner, attribute, shape); absent = identity."""
        out: dict[str, tuple[nn.Module, str, tuple[int, int]]] = {}
        if self.tied:
            out["embed_proj"] = (self, "embed_proj", (tied_width(self.config), self.config.embedding_width))
        for i, layer in enumerate(self.layers):
            for stage in layer.stages:
                out[f"layers.{i}.{stage.shortcut_name}"] = (stage, "shortcut", (stage.d_in, stage.d_out))
                if stage.post_norm:
                    out[f"layers.{i}.{stage.post_proj_name}"] = (stage, "post_proj", (self.config.hidden_size, stage.d_out))
        return out

    def named_weights(self) -> dict[str, torch.Tensor]:
        """The tensors of this model under their checkpoint names (see checkpoint.py)."""
        out: dict[str, torch.Tensor] = {}
        for name, p in self.named_parameters():
            out[checkpoint_name(name)] = p.data
        for name, (owner, attr, _) in self.residual_matrices().items():
            if getattr(owner, attr) is not None:
                out[name] = getattr(owner, attr)
        return out

    def layer_weights(self, idx: int) -> dict[str, torch.Tensor]:
        """The tensors of block `idx` under their checkpoint names."""
        prefix = f"layers.{idx}."
        return {n: t for n, t in self.named_weights().items() if n.startswith(prefix)}

    def load_layer(self, idx: int, tensors: dict[str, torch.Tensor]) -> None:
        """Block `idx` rebuilt holding `tensors` (its checkpoint names; assigned, not copied), e.g. one streamed layer."""
        layer = DecoderLayer(self.config, idx, self.config.layers[idx])
        prefix = f"layers.{idx}."
        names = {checkpoint_name(prefix + n): n for n, _ in layer.named_parameters()}
        missing = [n for n in names if n not in tensors]
        if missing:
            raise ModelDefinitionError(f"layer {idx} lacks tensors {missing[:3]}")
        for name, module_name in names.items():
            owner, attr = module_name.rsplit(".", 1)
            setattr(layer.get_submodule(owner), attr, nn.Parameter(tensors[name], requires_grad=False))
        for stage in layer.stages:
            stage.shortcut = tensors.get(prefix + stage.shortcut_name)
            stage.post_proj = tensors.get(prefix + stage.post_proj_name)
        self.layers[idx] = layer.eval()

    def load_weights(self, tensors: dict[str, torch.Tensor]) -> None:
        """Assign checkpoint tensors (no copy), refusing missing, unexpected or mis-shaped ones."""
        expected = {checkpoint_name(n): p for n, p in self.named_parameters()}
        optional = self.residual_matrices()
        problems = [f"missing tensor {n}" for n in expected if n not in tensors]
        problems += [f"unexpected tensor {n}" for n in tensors if n not in expected and n not in optional]
        problems += [
            f"tensor {n} has shape {tuple(tensors[n].shape)}, expected {tuple(p.shape)}"
            for n, p in expected.items()
            if n in tensors and tensors[n].shape != p.shape
        ]
        for n, (_, _, shape) in optional.items():
            if n in tensors and tuple(tensors[n].shape) != shape:
                problems.append(f"tensor {n} has shape {tuple(tensors[n].shape)}, expected {shape}")
            if n not in tensors and (shape[0] != shape[1] or "post_proj" in n):  # a post_proj holds the norm's scale
                problems.append(f"missing tensor {n}")
        if problems:
            raise ModelDefinitionError(f"checkpoint does not match its config: {'; '.join(problems[:5])}")
        for module_name in [n for n, _ in self.named_parameters()]:
            owner, attr = module_name.rsplit(".", 1)
            module = self.get_submodule(owner)
            setattr(module, attr, nn.Parameter(tensors[checkpoint_name(module_name)], requires_grad=False))
        for n, (owner, attr, _) in optional.items():
            setattr(owner, attr, tensors.get(n))
        self.inv_freq = self.inv_freq.to(self.embed_tokens.weight.device)
        for name in ("inv_freq_long", "local_inv_freq"):
            if getattr(self, name) is not None:
                setattr(self, name, getattr(self, name).to(self.embed_tokens.weight.device))

    # ----- forward -----------------------------------------------------------------
    def attention_context(
        self, attention_mask: torch.Tensor | None, T: int, cache: KVCache | None, device: torch.device, dtype: torch.dtype
    ) -> tuple[AttentionContext, torch.Tensor]:
        """Positions (B, T) and the attention context for T new tokens after the cache's past."""
        past = cache.length if cache is not None else 0
        S = past + T
        mixed = getattr(self.config, "sliding_layers", None) is not None and self.config.sliding_window is not None
        window = None if mixed else self.config.sliding_window  # of `mask`; a mixed model's sliding layers get local_mask
        if attention_mask is None:
            positions = torch.arange(past, S, device=device)[None]  # (1, T)
            keep = torch.ones(1, S, dtype=torch.bool, device=device)  # (1, S)
            mask = causal_mask(keep, T, window) if past > 0 or window is not None else None
        else:
            keep = attention_mask.to(device=device, dtype=torch.bool)  # (B, S)
            if keep.shape[1] != S:
                raise ModelDefinitionError(f"attention_mask covers {keep.shape[1]} positions, expected past {past} + new {T}")
            positions = (keep.long().cumsum(-1) - 1).clamp(min=0)[:, past:]  # (B, T)
            mask = causal_mask(keep, T, window)
        ctx = AttentionContext(None, None, mask, cache)
        if mixed:
            ctx.local_mask = causal_mask(keep, T, self.config.sliding_window)
        if self.inv_freq.numel():
            ctx.cos, ctx.sin = rope_tables(positions, self.rope_frequencies(positions), rope_attention_factor(self.config.rope), dtype)
        if self.local_inv_freq is not None:
            ctx.local_cos, ctx.local_sin = rope_tables(positions, self.local_inv_freq, 1.0, dtype)
        return ctx, positions

    def rope_frequencies(self, positions: torch.Tensor) -> torch.Tensor:
        """inv_freq for this call: LongRoPE's long factors once a position reaches the original context (as transformers
        decides, from the largest position of the call), the one set otherwise.  (r/2,) float64."""
        if self.longrope_context is not None and int(positions.max()) + 1 > self.longrope_context:
            return self.inv_freq_long
        return self.inv_freq

    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(input_ids)  # (B, T, d_0), or (B, T, D) when tied
        if self.embed_proj is not None:
            x = x @ self.embed_proj  # (B, T, d_0)
        if self.embed_positions is not None:
            x = x + self.embed_positions(positions + self.config.position_offset)
        return x

    def head(self, x: torch.Tensor) -> torch.Tensor:
        h = rms_norm(x, self.config.hidden_size, self.config.norm_eps)  # (B, T, head_in)
        logits = self.lm_head(h, self.embed_tokens.weight) if self.tied else self.lm_head(h)  # (B, T, vocab)
        cap = getattr(self.config, "final_logit_softcap", None)
        return logits if cap is None else cap * torch.tanh(logits / cap)  # Gemma 2's final soft-capping

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        past_key_values: KVCache | None = None,
        use_cache: bool = False,
    ) -> ReferenceOutput:
        """Logits for `input_ids` (B, T); `attention_mask` (B, past + T) marks real tokens (left padding allowed)."""
        cache = past_key_values if past_key_values is not None else (KVCache.empty(len(self.layers)) if use_cache else None)
        dtype = self.embed_tokens.weight.dtype
        ctx, positions = self.attention_context(attention_mask, input_ids.shape[1], cache, input_ids.device, dtype)
        x = self.embed(input_ids, positions)
        for layer in self.layers:
            x = layer(x, ctx)
        return ReferenceOutput(self.head(x), cache)


def rope_tables(positions: torch.Tensor, inv_freq: torch.Tensor, scale: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (B, 1, T, r) of positions (B, T) at frequencies inv_freq (r/2,), times `scale` (LongRoPE's factor)."""
    freqs = positions[..., None].double() * inv_freq.to(positions.device)  # (B, T, r/2)
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, T, r)
    return (emb.cos() * scale).to(dtype), (emb.sin() * scale).to(dtype)


def causal_mask(keep: torch.Tensor, T: int, window: int | None) -> torch.Tensor:
    """(B, 1, T, S) bool: query t (absolute S - T + t) sees key s <= it that is real and within the window.

    A query whose row would be empty (a padding position) may see itself, so that no row is
    all -inf; its output is never used.
    """
    S = keep.shape[1]
    q_pos = torch.arange(S - T, S, device=keep.device)[:, None]  # (T, 1)
    k_pos = torch.arange(S, device=keep.device)[None, :]  # (1, S)
    allowed = k_pos <= q_pos
    if window is not None:
        allowed = allowed & (q_pos - k_pos < window)
    mask = allowed[None] & keep[:, None, :]  # (B, T, S)
    mask = mask | ((k_pos == q_pos)[None] & ~mask.any(-1, keepdim=True))
    return mask[:, None]


def checkpoint_name(module_name: str) -> str:
    """Map a parameter's module path to its checkpoint name (layers.N.stages.i.branches.attn.q_proj -> layers.N.q_proj)."""
    parts = module_name.split(".")
    if parts[0] == "layers":
        return ".".join(parts[:2] + parts[6:])
    return module_name


def build_model(cfg: SlicedConfig, tensors: dict[str, torch.Tensor]) -> SlicedModel:
    """A reference model holding `tensors` (assigned, not copied)."""
    model = SlicedModel(cfg)
    model.load_weights(tensors)
    return model.eval()


@torch.no_grad()
def generate(
    model: SlicedModel,
    input_ids: torch.Tensor,
    *,
    max_new_tokens: int,
    attention_mask: torch.Tensor | None = None,
    temperature: float = 0.0,
    generator: torch.Generator | None = None,
    on_step: Callable[[], None] | None = None,
    stop_token_id: int | None = None,
) -> torch.Tensor:
    """Greedy (temperature 0) or sampled continuation through the KV cache; returns (B, T + max_new_tokens).

    `on_step` is called after each new token position (B tokens), e.g. to advance a progress bar.

    With `stop_token_id`, a row that has produced it keeps producing it, and generation ends
    early (fewer than max_new_tokens new columns) once every row has.
    """
    mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
    out = model(input_ids, attention_mask=mask, use_cache=True)
    tokens = [input_ids]
    stopped = torch.zeros(input_ids.shape[0], 1, dtype=torch.bool, device=input_ids.device)  # (B, 1)
    for step in range(max_new_tokens):
        logits = out.logits[:, -1].float()  # (B, vocab)
        if temperature > 0:
            probs = torch.softmax(logits / temperature, dim=-1)
            nxt = torch.multinomial(probs, 1, generator=generator)  # (B, 1)
        else:
            nxt = logits.argmax(-1, keepdim=True)
        if stop_token_id is not None:
            nxt = nxt.masked_fill(stopped, stop_token_id)
            stopped = stopped | (nxt == stop_token_id)
        tokens.append(nxt)
        if on_step is not None:
            on_step()
        if step + 1 == max_new_tokens or bool(stopped.all()):
            break
        mask = torch.cat((mask, torch.ones_like(nxt)), dim=1)
        out = model(nxt, attention_mask=mask, past_key_values=out.past_key_values)
    return torch.cat(tokens, dim=1)
