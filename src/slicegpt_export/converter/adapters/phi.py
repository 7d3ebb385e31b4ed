"""Phi (Phi-1/1.5/2): parallel blocks (one LayerNorm feeds attention and MLP), partial rotary, GELU MLP, biased head."""

from __future__ import annotations

from slicegpt_export.checkpoint import SlicedConfig
from slicegpt_export.converter.adapters.base import ATTN_NORM, FINAL_NORM, FamilyAdapter, register
from slicegpt_export.errors import SliceGPTError

ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}


@register
class PhiAdapter(FamilyAdapter):
    model_type = "phi"
    norm_kind = "layer"

    def check_supported(self) -> None:
        if self.hf.get("qk_layernorm"):
            raise SliceGPTError("phi with qk_layernorm=true is not supported")
        act = self.hf.get("hidden_act", "gelu_new")
        if act not in ACTIVATIONS:
            raise SliceGPTError(f"phi with hidden_act {act!r} is not supported (supported: {', '.join(ACTIVATIONS)})")

    def dense_config(self) -> SlicedConfig:
        D = int(self.require("hidden_size"))
        heads = int(self.require("num_attention_heads"))
        head_dim = D // heads
        return SlicedConfig(
            model_type=self.model_type,
            hidden_size=D,
            vocab_size=int(self.require("vocab_size")),
            num_heads=heads,
            num_kv_heads=int(self.hf.get("num_key_value_heads") or heads),
            head_dim=head_dim,
            intermediate_size=int(self.require("intermediate_size")),
            norm_eps=float(self.hf.get("layer_norm_eps", 1e-5)),
            max_position_embeddings=int(self.hf.get("max_position_embeddings", 2048)),
            block_kind="parallel",
            activation=ACTIVATIONS[self.hf.get("hidden_act", "gelu_new")],
            gated_mlp=False,
            bias={"qkv": True, "attn_out": True, "mlp": True, "head": True},
            position_embedding="rope",
            rope=self.rope_spec(head_dim, float(self.hf.get("partial_rotary_factor", 0.5))),
            position_offset=0,
            sliding_window=None,
            embedding_width=D,
            layers=self.uniform_layers(int(self.require("num_hidden_layers")), D),
            head_in=D,
        )

    def layer_tensor_names(self) -> dict[str, str]:
        p = "model.layers.{i}."
        pairs = {
            ATTN_NORM: "input_layernorm",
            "layers.{i}.q_proj": "self_attn.q_proj",
            "layers.{i}.k_proj": "self_attn.k_proj",
            "layers.{i}.v_proj": "self_attn.v_proj",
            "layers.{i}.o_proj": "self_attn.dense",
            "layers.{i}.up_proj": "mlp.fc1",
            "layers.{i}.down_proj": "mlp.fc2",
        }
        return {f"{c}.{kind}": f"{p}{s}.{kind}" for c, s in pairs.items() for kind in ("weight", "bias")}

    def global_tensor_names(self) -> dict[str, str]:
        names = {
            "embed_tokens.weight": "model.embed_tokens.weight",
            f"{FINAL_NORM}.weight": "model.final_layernorm.weight",
            f"{FINAL_NORM}.bias": "model.final_layernorm.bias",
            "lm_head.bias": "lm_head.bias",
        }
        if not self.tied_embeddings:
            names["lm_head.weight"] = "lm_head.weight"
        return names
