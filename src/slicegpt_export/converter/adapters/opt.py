"""OPT: pre-LayerNorm decoder, learned positions with an offset of 2, ReLU MLP (fc1/fc2), biases everywhere."""

from __future__ import annotations

from slicegpt_export.checkpoint import SlicedConfig
from slicegpt_export.converter.adapters.base import ATTN_NORM, FINAL_NORM, MLP_NORM, FamilyAdapter, register
from slicegpt_export.errors import SliceGPTError

#: OPTLearnedPositionalEmbedding reads row position + 2
OPT_POSITION_OFFSET = 2


@register
class OPTAdapter(FamilyAdapter):
    model_type = "opt"
    norm_kind = "layer"

    def check_supported(self) -> None:
        D = self.require("hidden_size")
        if self.hf.get("word_embed_proj_dim", D) != D:
            raise SliceGPTError("opt with word_embed_proj_dim != hidden_size (e.g. OPT-350m) is not supported")
        if not self.hf.get("do_layer_norm_before", True):
            raise SliceGPTError("post-norm opt (do_layer_norm_before=false, e.g. OPT-350m) is not supported")
        if not self.hf.get("enable_bias", True) or not self.hf.get("layer_norm_elementwise_affine", True):
            raise SliceGPTError("opt without biases or without affine layer norms is not supported")
        act = self.hf.get("activation_function", "relu")
        if act != "relu":
            raise SliceGPTError(f"opt with activation_function {act!r} is not supported (only relu)")

    def dense_config(self) -> SlicedConfig:
        D = int(self.require("hidden_size"))
        heads = int(self.require("num_attention_heads"))
        return SlicedConfig(
            model_type=self.model_type,
            hidden_size=D,
            vocab_size=int(self.require("vocab_size")),
            num_heads=heads,
            num_kv_heads=heads,
            head_dim=D // heads,
            intermediate_size=int(self.require("ffn_dim")),
            norm_eps=1e-5,  # nn.LayerNorm's default, which OPT uses
            max_position_embeddings=int(self.require("max_position_embeddings")),
            block_kind="sequential",
            activation="relu",
            gated_mlp=False,
            bias={"qkv": True, "attn_out": True, "mlp": True, "head": False},
            position_embedding="learned",
            rope=None,
            position_offset=OPT_POSITION_OFFSET,
            sliding_window=None,
            embedding_width=D,
            layers=self.uniform_layers(int(self.require("num_hidden_layers")), D),
            head_in=D,
        )

    def layer_tensor_names(self) -> dict[str, str]:
        p = "model.decoder.layers.{i}."
        pairs = {
            ATTN_NORM: "self_attn_layer_norm",
            "layers.{i}.q_proj": "self_attn.q_proj",
            "layers.{i}.k_proj": "self_attn.k_proj",
            "layers.{i}.v_proj": "self_attn.v_proj",
            "layers.{i}.o_proj": "self_attn.out_proj",
            MLP_NORM: "final_layer_norm",
            "layers.{i}.up_proj": "fc1",
            "layers.{i}.down_proj": "fc2",
        }
        return {f"{c}.{kind}": f"{p}{s}.{kind}" for c, s in pairs.items() for kind in ("weight", "bias")}

    def global_tensor_names(self) -> dict[str, str]:
        names = {
            "embed_tokens.weight": "model.decoder.embed_tokens.weight",
            "embed_positions.weight": "model.decoder.embed_positions.weight",
            f"{FINAL_NORM}.weight": "model.decoder.final_layer_norm.weight",
            f"{FINAL_NORM}.bias": "model.decoder.final_layer_norm.bias",
        }
        if not self.tied_embeddings:
            names["lm_head.weight"] = "lm_head.weight"
        return names

    @property
    def tied_embeddings(self) -> bool:
        return bool(self.hf.get("tie_word_embeddings", True))  # OPT ties unless told otherwise
