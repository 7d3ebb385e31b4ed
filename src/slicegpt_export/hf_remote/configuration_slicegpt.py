"""transformers configuration of a sliced checkpoint (remote code): the base config plus its `slicegpt` section."""

from __future__ import annotations

from transformers import PretrainedConfig


class SliceGPTConfig(PretrainedConfig):
    model_type = "slicegpt"

    def __init__(self, slicegpt: dict | None = None, **kwargs) -> None:
        self.slicegpt = slicegpt or {}
        kwargs.setdefault("tie_word_embeddings", False)  # the head is always its own tensor
        super().__init__(**kwargs)
