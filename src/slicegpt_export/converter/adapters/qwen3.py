"""Qwen3 (dense): the Llama layout with a per-head RMSNorm on queries and keys (q_norm / k_norm) and no q/k/v biases.

q_norm and k_norm act on head_dim after the projections, so slicing the residual leaves them as
they are: they are carried into the checkpoint unchanged (``qk_norm``).
"""

from __future__ import annotations

from slicegpt_export.checkpoint import SlicedConfig
from slicegpt_export.converter.adapters.base import register
from slicegpt_export.converter.adapters.llama import LlamaAdapter
from slicegpt_export.errors import SliceGPTError


@register
class Qwen3Adapter(LlamaAdapter):
    model_type = "qwen3"

    def check_supported(self) -> None:
        super().check_supported()
        if self.hf.get("use_sliding_window"):
            raise SliceGPTError("qwen3 with use_sliding_window=true is not supported (per-layer windows)")

    def dense_config(self) -> SlicedConfig:
        cfg = super().dense_config()
        cfg.qk_norm = True
        return cfg

    def layer_tensor_names(self) -> dict[str, str]:
        p = "model.layers.{i}.self_attn."
        return {**super().layer_tensor_names(), "layers.{i}.q_norm.weight": p + "q_norm.weight", "layers.{i}.k_norm.weight": p + "k_norm.weight"}
