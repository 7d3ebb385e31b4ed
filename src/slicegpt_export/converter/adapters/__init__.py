"""Model-family adapters, registered by Hugging Face ``model_type``; importing this package registers them all."""

from slicegpt_export.converter.adapters import gemma, llama, mistral, opt, phi, phi3, qwen2, qwen3, smollm3  # noqa: F401  (registration)
from slicegpt_export.converter.adapters.base import FamilyAdapter, adapter_for, supported_model_types

__all__ = ["FamilyAdapter", "adapter_for", "supported_model_types"]
