"""Gemma 2 (``gemma2``) and Gemma 3 text models (``gemma3_text``).

Both: token embeddings scaled by sqrt(D) (folded into the embedding side: ``embed_proj`` when
tied, as Gemma always is), RMSNorm with (1 + w) scales (made explicit on reading, then fused
like any scale), GeGLU MLP (gelu_tanh), head_dim independent of D, the softmax scale
query_pre_attn_scalar^-1/2, sliding-window layers beside global ones, and **post-norms**: a
weighted RMSNorm on each branch output before it joins the residual.  A post-norm does not
commute with slicing the residual the way a pre-norm does (its rms needs all D coordinates of
the branch output), so each becomes a (D, d_out) ``post_proj`` after a weightless norm over D
(derivation in modeling.ResidualStage and docs/gguf-slicegpt.md).

Gemma 2 adds attention-logit and final-logit soft-capping; Gemma 3 adds per-head q/k norms
(with (1 + w) scales) and a rope of its own (base ``rope_local_base_freq``) on the sliding layers.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from slicegpt_export.checkpoint import RopeSpec, SlicedConfig
from slicegpt_export.converter.adapters.base import (
    ATTN_NORM,
    ATTN_POST_NORM,
    FINAL_NORM,
    MLP_NORM,
    MLP_POST_NORM,
    FamilyAdapter,
    register,
)
from slicegpt_export.errors import SliceGPTError

ACTIVATIONS = {"gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh", "gelu": "gelu"}
SLIDING = "sliding_attention"


@register
class Gemma2Adapter(FamilyAdapter):
    model_type = "gemma2"
    qk_norm = False

    def activation_name(self) -> str:
        """The source's MLP activation (Gemma names it hidden_activation)."""
        return self.hf.get("hidden_activation") or self.hf.get("hidden_act") or "gelu_pytorch_tanh"

    def check_supported(self) -> None:
        act = self.activation_name()
        if act not in ACTIVATIONS:
            raise SliceGPTError(f"{self.model_type} with hidden_activation {act!r} is not supported ({', '.join(ACTIVATIONS)})")
        if self.hf.get("attention_bias"):
            raise SliceGPTError(f"{self.model_type} with attention_bias is not supported")
        if self.hf.get("use_bidirectional_attention"):
            raise SliceGPTError(f"{self.model_type} with use_bidirectional_attention is not supported (a decoder is)")

    def layer_types(self) -> list[str]:
        n = int(self.require("num_hidden_layers"))
        types = self.hf.get("layer_types") or ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)]
        if len(types) != n:
            raise SliceGPTError(f"{self.model_type}: layer_types has {len(types)} entries for {n} layers")
        return list(types)

    def ropes(self, head_dim: int) -> tuple[RopeSpec, RopeSpec | None]:
        """(rope of the global layers, rope of the sliding layers when it differs)."""
        return self.rope_spec(head_dim), None

    def dense_config(self) -> SlicedConfig:
        D = int(self.require("hidden_size"))
        heads = int(self.require("num_attention_heads"))
        head_dim = int(self.hf.get("head_dim") or D // heads)
        window = self.hf.get("sliding_window")
        types = self.layer_types()
        rope, local_rope = self.ropes(head_dim)
        return SlicedConfig(
            model_type=self.model_type,
            hidden_size=D,
            vocab_size=int(self.require("vocab_size")),
            num_heads=heads,
            num_kv_heads=int(self.hf.get("num_key_value_heads") or heads),
            head_dim=head_dim,
            intermediate_size=int(self.require("intermediate_size")),
            norm_eps=float(self.hf.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(self.hf.get("max_position_embeddings", 8192)),
            block_kind="sequential",
            activation=ACTIVATIONS[self.activation_name()],
            gated_mlp=True,
            bias={"qkv": False, "attn_out": False, "mlp": False, "head": False},
            position_embedding="rope",
            rope=rope,
            position_offset=0,
            sliding_window=int(window) if window and SLIDING in types else None,
            embedding_width=D,
            layers=self.uniform_layers(len(types), D),
            head_in=D,
            qk_norm=self.qk_norm,
            post_norms=True,
            attention_scale=float(self.hf.get("query_pre_attn_scalar", head_dim)) ** -0.5,
            attn_logit_softcap=self.optional_float("attn_logit_softcapping"),
            final_logit_softcap=self.optional_float("final_logit_softcapping"),
            sliding_layers=[t == SLIDING for t in types] if window and SLIDING in types else None,
            local_rope=local_rope,
            bos_windows=True,  # several times the perplexity without it
        )

    def optional_float(self, key: str) -> float | None:
        value = self.hf.get(key)
        return float(value) if value else None

    @property
    def tied_embeddings(self) -> bool:
        return bool(self.hf.get("tie_word_embeddings", True))  # Gemma's default

    def embedding_scale(self) -> float:
        return math.sqrt(int(self.require("hidden_size")))

    def prepare_source_tensors(self, tensors: dict[str, torch.Tensor], num_layers: int) -> None:
        """Gemma's RMSNorm scales by (1 + w): store the effective scale 1 + w, so fusion folds it like any other."""
        for name in [n for n in tensors if n.endswith("norm.weight")]:
            tensors[name] = (tensors[name].double() + 1.0).to(tensors[name].dtype)

    def layer_tensor_names(self) -> dict[str, str]:
        p = "model.layers.{i}."
        names = {
            f"{ATTN_NORM}.weight": p + "input_layernorm.weight",
            f"{ATTN_POST_NORM}.weight": p + "post_attention_layernorm.weight",
            f"{MLP_NORM}.weight": p + "pre_feedforward_layernorm.weight",
            f"{MLP_POST_NORM}.weight": p + "post_feedforward_layernorm.weight",
            **{f"layers.{{i}}.{proj}.weight": p + f"self_attn.{proj}.weight" for proj in ("q_proj", "k_proj", "v_proj", "o_proj")},
            **{f"layers.{{i}}.{proj}.weight": p + f"mlp.{proj}.weight" for proj in ("gate_proj", "up_proj", "down_proj")},
        }
        if self.qk_norm:
            names.update({f"layers.{{i}}.{n}.weight": p + f"self_attn.{n}.weight" for n in ("q_norm", "k_norm")})
        return names

    def global_tensor_names(self) -> dict[str, str]:
        names = {"embed_tokens.weight": "model.embed_tokens.weight", f"{FINAL_NORM}.weight": "model.norm.weight"}
        if not self.tied_embeddings:
            names["lm_head.weight"] = "lm_head.weight"
        return names


@register
class Gemma3TextAdapter(Gemma2Adapter):
    model_type = "gemma3_text"
    qk_norm = True

    def layer_types(self) -> list[str]:
        n = int(self.require("num_hidden_layers"))
        if self.hf.get("layer_types"):
            return super().layer_types()
        pattern = int(self.hf.get("sliding_window_pattern", 6))
        return [SLIDING if (i + 1) % pattern else "full_attention" for i in range(n)]

    def ropes(self, head_dim: int) -> tuple[RopeSpec, RopeSpec | None]:
        """Global layers: rope_parameters['full_attention'] (theta 1e6, linear scaling on the larger models); sliding
        layers: rope_parameters['sliding_attention'] (theta rope_local_base_freq, 1e4), unscaled."""
        params: dict[str, Any] = self.hf.get("rope_parameters") or {}
        full = dict(params.get("full_attention") or {})
        local = dict(params.get("sliding_attention") or {})
        full.setdefault("rope_theta", self.hf.get("rope_theta", 1_000_000.0))
        if self.hf.get("rope_scaling"):
            full.update(self.hf["rope_scaling"])
        local.setdefault("rope_theta", self.hf.get("rope_local_base_freq", 10_000.0))
        if local.get("rope_type", "default") != "default":
            raise SliceGPTError(f"gemma3_text with rope scaling on its sliding layers ({local['rope_type']}) is not supported")
        kind = full.get("rope_type", full.get("type", "default"))
        scaling = None if kind == "default" else {k: v for k, v in full.items() if k != "rope_theta"}
        return RopeSpec(float(full["rope_theta"]), head_dim, scaling), RopeSpec(float(local["rope_theta"]), head_dim)
