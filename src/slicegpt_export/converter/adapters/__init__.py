"""Model-family adapters, registered by Hugging Face ``model_type``; importing this package registers them all."""

from slicegpt_export.converter.adapters import llama, mistral, opt, phi, qwen2  # noqa: F401  (registration)
from slicegpt_export.converter.adapters.base import FamilyAdapter, adapter_for, supported_model_types

__all__ = ["FamilyAdapter", "adapter_for", "supported_model_types"]
