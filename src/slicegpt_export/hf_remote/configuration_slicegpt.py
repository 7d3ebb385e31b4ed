"""transformers configuration of a sliced checkpoint (remote code): the base config plus its `slicegpt` section."""

from __future__ import annotations

from transformers import PretrainedConfig


class SliceGPTConfig(PretrainedConfig):
    model_type = "slicegpt"

    def __init__(self, slicegpt: dict | None = None, **kwargs) -> None:
        self.slicegpt = slicegpt or {}
        kwargs.setdefault("tie_word_embeddings", False)  # the head is always its own tensor
        super().__init__(**kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """Read config.json, which keeps its base family's `model_type` (e.g. "llama").

        The base type stays so that tokenizers and tools that read config.json load as before
        (an unknown model_type would make AutoTokenizer ask to run this remote code); this
        class is reached through `auto_map`, so transformers' check that config.json's
        model_type equals "slicegpt", which only warns, is left out.
        """
        config_dict, kwargs = cls.get_config_dict(pretrained_model_name_or_path, **kwargs)
        return cls.from_dict(config_dict, **kwargs)
