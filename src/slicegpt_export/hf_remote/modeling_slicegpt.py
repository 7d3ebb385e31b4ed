"""transformers model of a sliced checkpoint (remote code): a thin wrapper over slicegpt_reference.SlicedModel.

Weights are read from the checkpoint's safetensors files under the checkpoint's own names;
generation uses transformers' cache through a small adapter, so `generate()` works as for
any causal LM.
"""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import torch
from safetensors.torch import load_file
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_slicegpt import SliceGPTConfig
from .slicegpt_reference import SlicedModel, build_model


def namespace(section: dict) -> SimpleNamespace:
    """The `slicegpt` config section with attribute access, as slicegpt_reference expects."""
    ns = SimpleNamespace(**section)
    ns.layers = [SimpleNamespace(**w) for w in section["layers"]]
    ns.rope = SimpleNamespace(**section["rope"]) if section.get("rope") else None
    ns.local_rope = SimpleNamespace(**section["local_rope"]) if section.get("local_rope") else None
    return ns


class CacheAdapter:
    """transformers' Cache seen through the two calls slicegpt_reference makes (length, update)."""

    def __init__(self, cache) -> None:
        self.cache = cache

    @property
    def length(self) -> int:
        return self.cache.get_seq_length()

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        return self.cache.update(k, v, layer)


def weight_files(directory: str) -> list[str]:
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            return sorted({os.path.join(directory, n) for n in json.load(f)["weight_map"].values()})
    return [os.path.join(directory, "model.safetensors")]


class SliceGPTForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = SliceGPTConfig
    base_model_prefix = "model"
    _supports_cache_class = True

    def __init__(self, config: SliceGPTConfig, model: SlicedModel | None = None) -> None:
        super().__init__(config)
        self.model = model if model is not None else SlicedModel(namespace(config.slicegpt))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, config=None, **kwargs):
        directory = str(pretrained_model_name_or_path)
        if not os.path.isdir(directory):
            from huggingface_hub import snapshot_download

            directory = snapshot_download(directory)
        config = config if isinstance(config, SliceGPTConfig) else SliceGPTConfig.from_pretrained(directory)
        tensors = {}
        for path in weight_files(directory):
            tensors.update(load_file(path))
        dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
        if isinstance(dtype, torch.dtype):
            tensors = {k: v.to(dtype) for k, v in tensors.items()}
        model = cls(config, build_model(namespace(config.slicegpt), tensors))
        return model.eval()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def forward(self, input_ids=None, attention_mask=None, past_key_values=None, use_cache=None, **kwargs):
        hf_cache = past_key_values if past_key_values is not None else kwargs.get("cache")  # renamed `cache` in transformers 5
        if hf_cache is None and use_cache:
            from transformers import DynamicCache

            hf_cache = DynamicCache()
        out = self.model(input_ids, attention_mask=attention_mask, past_key_values=CacheAdapter(hf_cache) if hf_cache is not None else None)
        field = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
        return CausalLMOutputWithPast(logits=out.logits, **{field: hf_cache})
