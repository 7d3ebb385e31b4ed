"""Llama (Llama-2/3 style: RMSNorm, rotary positions, SwiGLU MLP, grouped-query attention)."""

from __future__ import annotations

from slicegpt_export.checkpoint import SlicedConfig
from slicegpt_export.converter.adapters.base import ATTN_NORM, FINAL_NORM, MLP_NORM, FamilyAdapter, register
from slicegpt_export.errors import SliceGPTError


@register
class LlamaAdapter(FamilyAdapter):
    model_type = "llama"
    #: whether q/k/v carry biases (Qwen2 does)
    qkv_bias = False

    def check_supported(self) -> None:
        act = self.hf.get("hidden_act", "silu")
        if act != "silu":
            raise SliceGPTError(f"{self.model_type} with hidden_act {act!r} is not supported (only silu)")
        if self.hf.get("attention_bias") or self.hf.get("mlp_bias"):
            raise SliceGPTError(f"{self.model_type} with attention_bias/mlp_bias is not supported")

    def sliding_window(self) -> int | None:
        return None

    def dense_config(self) -> SlicedConfig:
        D = int(self.require("hidden_size"))
        heads = int(self.require("num_attention_heads"))
        head_dim = int(self.hf.get("head_dim") or D // heads)
        return SlicedConfig(
            model_type=self.model_type,
            hidden_size=D,
            vocab_size=int(self.require("vocab_size")),
            num_heads=heads,
            num_kv_heads=int(self.hf.get("num_key_value_heads") or heads),
            head_dim=head_dim,
            intermediate_size=int(self.require("intermediate_size")),
            norm_eps=float(self.hf.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(self.hf.get("max_position_embeddings", 2048)),
            block_kind="sequential",
            activation="silu",
            gated_mlp=True,
            bias={"qkv": self.qkv_bias, "attn_out": False, "mlp": False, "head": False},
            position_embedding="rope",
            rope=self.rope_spec(head_dim),
            position_offset=0,
            sliding_window=self.sliding_window(),
            embedding_width=D,
            layers=self.uniform_layers(int(self.require("num_hidden_layers")), D),
            head_in=D,
        )

    def layer_tensor_names(self) -> dict[str, str]:
        p = "model.layers.{i}."
        names = {
            f"{ATTN_NORM}.weight": p + "input_layernorm.weight",
            "layers.{i}.q_proj.weight": p + "self_attn.q_proj.weight",
            "layers.{i}.k_proj.weight": p + "self_attn.k_proj.weight",
            "layers.{i}.v_proj.weight": p + "self_attn.v_proj.weight",
            "layers.{i}.o_proj.weight": p + "self_attn.o_proj.weight",
            f"{MLP_NORM}.weight": p + "post_attention_layernorm.weight",
            "layers.{i}.gate_proj.weight": p + "mlp.gate_proj.weight",
            "layers.{i}.up_proj.weight": p + "mlp.up_proj.weight",
            "layers.{i}.down_proj.weight": p + "mlp.down_proj.weight",
        }
        if self.qkv_bias:
            for proj in ("q", "k", "v"):
                names[f"layers.{{i}}.{proj}_proj.bias"] = p + f"self_attn.{proj}_proj.bias"
        return names

    def global_tensor_names(self) -> dict[str, str]:
        names = {"embed_tokens.weight": "model.embed_tokens.weight", f"{FINAL_NORM}.weight": "model.norm.weight"}
        if not self.tied_embeddings:
            names["lm_head.weight"] = "lm_head.weight"
        return names
