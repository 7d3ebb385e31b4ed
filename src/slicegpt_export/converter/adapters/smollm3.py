"""SmolLM3: the Llama layout in which some layers (every fourth by default) attend without rotary positions (NoPE)."""

from __future__ import annotations

from slicegpt_export.checkpoint import SlicedConfig
from slicegpt_export.converter.adapters.base import register
from slicegpt_export.converter.adapters.llama import LlamaAdapter
from slicegpt_export.errors import SliceGPTError


@register
class SmolLM3Adapter(LlamaAdapter):
    model_type = "smollm3"

    def check_supported(self) -> None:
        super().check_supported()
        if self.hf.get("use_sliding_window"):
            raise SliceGPTError("smollm3 with use_sliding_window=true is not supported")

    def dense_config(self) -> SlicedConfig:
        cfg = super().dense_config()
        flags = self.hf.get("no_rope_layers")  # 1: the layer rotates, 0: NoPE, as transformers names it
        if flags is None:
            interval = int(self.hf.get("no_rope_layer_interval", 4))
            flags = [int((i + 1) % interval != 0) for i in range(cfg.num_layers)]
        if len(flags) != cfg.num_layers:
            raise SliceGPTError(f"smollm3: no_rope_layers has {len(flags)} entries for {cfg.num_layers} layers")
        cfg.rope_layers = [bool(f) for f in flags]
        return cfg
