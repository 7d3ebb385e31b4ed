"""Family adapters: everything the converter knows about one Hugging Face model family.

An adapter answers the family-specific questions (which config keys hold the widths, how
the checkpoint names its tensors, which variants are refused) so that fusion, PCA and
slicing stay generic.  Adapters are registered by ``config.model_type``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch

from slicegpt_export.checkpoint import LayerWidths, RopeSpec, SlicedConfig
from slicegpt_export.errors import SliceGPTError

#: canonical pre-fusion names of the norm parameters (consumed by fusion, never saved)
ATTN_NORM = "layers.{i}.attn_norm"
MLP_NORM = "layers.{i}.mlp_norm"
FINAL_NORM = "final_norm"
#: post-norms on a branch output before it joins the residual (Gemma 2/3); they become post_proj matrices
ATTN_POST_NORM = "layers.{i}.attn_post_norm"
MLP_POST_NORM = "layers.{i}.mlp_post_norm"


class FamilyAdapter(ABC):
    """The description of one model family, read from its Hugging Face config dict."""

    #: Hugging Face ``model_type`` this adapter handles
    model_type: ClassVar[str]
    #: "rms" (RMSNorm: only a scale to fuse) or "layer" (LayerNorm: mean subtraction, scale and bias)
    norm_kind: ClassVar[str] = "rms"

    def __init__(self, hf_config: dict[str, Any]) -> None:
        self.hf = hf_config
        self.check_supported()

    def check_supported(self) -> None:
        """Raise :class:`SliceGPTError` for variants of the family this tool cannot convert."""

    @abstractmethod
    def dense_config(self) -> SlicedConfig:
        """The traits and (unsliced) widths of the source model."""

    @abstractmethod
    def layer_tensor_names(self) -> dict[str, str]:
        """Canonical per-layer name -> source name, both with an ``{i}`` layer placeholder.

        Canonical names are those of checkpoint.py plus the norms (``attn_norm``,
        ``mlp_norm`` with ``.weight`` and, for LayerNorm, ``.bias``).
        """

    @abstractmethod
    def global_tensor_names(self) -> dict[str, str]:
        """Canonical -> source names of the tensors outside the layers (embeddings, final norm, head)."""

    def prepare_source_tensors(self, tensors: dict[str, torch.Tensor], num_layers: int) -> None:
        """Bring source tensors, in place, to the form layer_tensor_names reads (split a fused qkv_proj, make a norm's
        effective scale explicit...); nothing by default."""

    def embedding_scale(self) -> float:
        """The factor the source multiplies token embeddings by (Gemma: sqrt(D)); folded into the embedding side."""
        return 1.0

    @property
    def tied_embeddings(self) -> bool:
        """Whether the source head reuses the token embedding (then it stays tied: the matrix is stored once)."""
        return bool(self.hf.get("tie_word_embeddings", False))

    def require(self, key: str) -> Any:
        if key not in self.hf:
            raise SliceGPTError(f"{self.model_type} config lacks the key {key!r}")
        return self.hf[key]

    def rope_spec(self, head_dim: int, partial_factor: float = 1.0) -> RopeSpec:
        """Rope base and scaling from either the transformers v5 ``rope_parameters`` or the older keys."""
        params = self.hf.get("rope_parameters") or {}
        theta = params.get("rope_theta", self.hf.get("rope_theta", 10000.0))
        scaling = self.hf.get("rope_scaling") or {k: v for k, v in params.items() if k != "rope_theta"}
        partial_factor = params.get("partial_rotary_factor", partial_factor)
        kind = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
        return RopeSpec(
            theta=float(theta), dim=int(head_dim * partial_factor), scaling=None if kind == "default" else dict(scaling)
        )

    @staticmethod
    def uniform_layers(num_layers: int, width: int) -> list[LayerWidths]:
        return [LayerWidths(width, width, width, width) for _ in range(num_layers)]


_REGISTRY: dict[str, type[FamilyAdapter]] = {}
#: variants of supported families this tool refuses, by model_type, with the reason
UNSUPPORTED_VARIANTS = {
    "qwen3_moe": "Qwen3 MoE (model_type qwen3_moe) is not supported: mixture-of-experts MLPs; dense Qwen3 (qwen3) is",
    "qwen2_moe": "Qwen2 MoE (model_type qwen2_moe) is not supported: mixture-of-experts MLPs; dense Qwen2 (qwen2) is",
    "gemma3": "Gemma 3 multimodal (model_type gemma3) is not supported: vision tower; its text model (gemma3_text) is",
    "phimoe": "Phi-3.5-MoE (model_type phimoe) is not supported: mixture-of-experts MLPs; dense Phi-3 (phi3) is",
    "phi3small": "Phi-3-small (model_type phi3small) is not supported: blocksparse attention and gegelu MLP; Phi-3 (phi3) is",
}


def register(cls: type[FamilyAdapter]) -> type[FamilyAdapter]:
    """Class decorator adding an adapter to the registry under its ``model_type``."""
    if cls.model_type in _REGISTRY:
        raise ValueError(f"adapter for {cls.model_type!r} registered twice")
    _REGISTRY[cls.model_type] = cls
    return cls


def supported_model_types() -> list[str]:
    return sorted(_REGISTRY)


def adapter_for(hf_config: dict[str, Any]) -> FamilyAdapter:
    """The adapter for a Hugging Face config dict, or an error listing the supported model types."""
    model_type = hf_config.get("model_type")
    if model_type in UNSUPPORTED_VARIANTS:
        raise SliceGPTError(UNSUPPORTED_VARIANTS[model_type])
    if model_type not in _REGISTRY:
        raise SliceGPTError(
            f"unsupported architecture: model_type {model_type!r} (supported: {', '.join(supported_model_types())})"
        )
    return _REGISTRY[model_type](hf_config)
