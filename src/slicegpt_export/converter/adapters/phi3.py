"""Phi-3 / Phi-3.5 / Phi-4-mini (``phi3``): the Llama layout with fused ``qkv_proj`` and ``gate_up_proj``, partial
rotary where configured, LongRoPE scaling and an optional sliding window.

The fused matrices are split on reading (rows of qkv_proj: queries, keys, values; rows of
gate_up_proj: gate, then up), so slicing and every exporter see the Llama layout.  LongRoPE
is recorded as transformers computes it: per-frequency short and long factors, the original
context beyond which the long ones apply, and the factor cos and sin are multiplied by.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from slicegpt_export.checkpoint import RopeSpec
from slicegpt_export.converter.adapters.base import register
from slicegpt_export.converter.adapters.llama import LlamaAdapter
from slicegpt_export.errors import SliceGPTError


@register
class Phi3Adapter(LlamaAdapter):
    model_type = "phi3"

    def check_supported(self) -> None:
        super().check_supported()
        params = self.rope_parameters()
        kind = params.get("rope_type", params.get("type", "default"))
        if kind not in ("default", "longrope", "su"):
            raise SliceGPTError(f"phi3 with rope scaling {kind!r} is not supported (default, longrope)")

    def rope_parameters(self) -> dict[str, Any]:
        return dict(self.hf.get("rope_scaling") or self.hf.get("rope_parameters") or {})

    def sliding_window(self) -> int | None:
        window = self.hf.get("sliding_window")
        return int(window) if window else None

    def rope_spec(self, head_dim: int, partial_factor: float = 1.0) -> RopeSpec:
        params = self.rope_parameters()
        partial = float(params.get("partial_rotary_factor", self.hf.get("partial_rotary_factor", 1.0)))
        spec = super().rope_spec(head_dim, partial)
        if params.get("rope_type", params.get("type")) in ("longrope", "su"):
            spec.scaling = self.longrope(params, spec.dim)
        return spec

    def longrope(self, params: dict[str, Any], dim: int) -> dict[str, Any]:
        """LongRoPE as transformers' _compute_longrope_parameters reads it (attention factor made explicit)."""
        original = int(params.get("original_max_position_embeddings") or self.require("original_max_position_embeddings"))
        factor = params.get("factor") or self.require("max_position_embeddings") / original
        attention = params.get("attention_factor")
        if attention is None:
            attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
        short, long = [float(v) for v in params["short_factor"]], [float(v) for v in params["long_factor"]]
        if len(short) != dim // 2 or len(long) != dim // 2:
            raise SliceGPTError(f"phi3 longrope factors must have rotary_dim / 2 = {dim // 2} entries")
        return {"rope_type": "longrope", "short_factor": short, "long_factor": long,
                "original_max_position_embeddings": original, "attention_factor": float(attention)}  # fmt: skip

    def prepare_source_tensors(self, tensors: dict[str, torch.Tensor], num_layers: int) -> None:
        """qkv_proj -> q/k/v_proj and gate_up_proj -> gate/up_proj, in place, under Llama's source names."""
        cfg = self.dense_config()
        q_rows, kv_rows = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        for i in range(num_layers):
            p = f"model.layers.{i}."
            qkv = tensors.pop(p + "self_attn.qkv_proj.weight", None)
            if qkv is not None:
                q, k, v = qkv.split([q_rows, kv_rows, kv_rows])
                tensors.update({p + "self_attn.q_proj.weight": q, p + "self_attn.k_proj.weight": k, p + "self_attn.v_proj.weight": v})
            gate_up = tensors.pop(p + "mlp.gate_up_proj.weight", None)
            if gate_up is not None:
                gate, up = gate_up.chunk(2)
                tensors.update({p + "mlp.gate_proj.weight": gate, p + "mlp.up_proj.weight": up})
