"""Qwen2: the Llama layout with biases on q/k/v and an optional sliding window on the upper layers."""

from __future__ import annotations

from slicegpt_export.converter.adapters.base import register
from slicegpt_export.converter.adapters.llama import LlamaAdapter
from slicegpt_export.errors import SliceGPTError


@register
class Qwen2Adapter(LlamaAdapter):
    model_type = "qwen2"
    qkv_bias = True

    def check_supported(self) -> None:
        super().check_supported()
        if self.hf.get("use_sliding_window"):
            raise SliceGPTError("qwen2 with use_sliding_window=true is not supported (per-layer windows)")
