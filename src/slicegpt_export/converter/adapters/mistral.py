"""Mistral: the Llama layout with an optional sliding attention window."""

from __future__ import annotations

from slicegpt_export.converter.adapters.base import register
from slicegpt_export.converter.adapters.llama import LlamaAdapter


@register
class MistralAdapter(LlamaAdapter):
    model_type = "mistral"

    def sliding_window(self) -> int | None:
        window = self.hf.get("sliding_window")
        return int(window) if window else None
