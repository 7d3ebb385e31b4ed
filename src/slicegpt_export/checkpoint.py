"""The sliced checkpoint: the contract between the converter, the exporters and validation.

A sliced checkpoint is a folder holding

* ``config.json`` -- the source model's Hugging Face config plus a ``slicegpt`` section
  (:class:`SlicedConfig`) that records every per-layer width and every family trait a
  reader needs to run the model without guessing;
* ``model.safetensors`` (or shards plus ``model.safetensors.index.json``) -- the weights,
  named as in :data:`TENSOR_NAMES`;
* the tokenizer files of the source model, and for a GGUF source ``gguf_metadata.json``
  (its ``tokenizer.*`` and ``general.*`` keys, so a GGUF export carries the exact vocabulary).

Tensor names and shapes (PyTorch order, ``out x in`` for linears), with ``d_l`` the widths below:

==============================  =================================================
``embed_tokens.weight``         (vocab, embedding)
``embed_positions.weight``      (positions, embedding) -- learned positions only
``layers.N.q_proj.weight``      (heads * head_dim, attn_in)    (+ ``.bias``)
``layers.N.k_proj.weight``      (kv_heads * head_dim, attn_in) (+ ``.bias``)
``layers.N.v_proj.weight``      (kv_heads * head_dim, attn_in) (+ ``.bias``)
``layers.N.o_proj.weight``      (attn_out, heads * head_dim)   (+ ``.bias``)
``layers.N.q_norm.weight``      (head_dim,) -- ``qk_norm`` only (Qwen3): per-head RMSNorm of queries
``layers.N.k_norm.weight``      (head_dim,) -- ``qk_norm`` only: per-head RMSNorm of keys
``layers.N.attn_shortcut``      (attn_in, attn_out)
``layers.N.gate_proj.weight``   (intermediate, mlp_in) -- gated MLPs only
``layers.N.up_proj.weight``     (intermediate, mlp_in)         (+ ``.bias``)
``layers.N.down_proj.weight``   (mlp_out, intermediate)        (+ ``.bias``)  intermediate: per block
``layers.N.mlp_shortcut``       (mlp_in, mlp_out) -- sequential blocks only
``layers.N.attn_post_proj``     (hidden_size, attn_out) -- ``post_norms`` only; o_proj then has hidden_size rows
``layers.N.mlp_post_proj``      (hidden_size, mlp_out) -- ``post_norms`` only; down_proj then has hidden_size rows
``lm_head.weight``              (vocab, head_in)               (+ ``.bias``)
==============================  =================================================

A shortcut that is the identity (the block keeps its basis and width) is not stored.  With
``tied_embeddings`` (a source whose head reuses the token embedding) the V x D matrix is stored
once and the rotations travel in small matrices beside it:

==============================  =================================================
``embed_tokens.weight``         (vocab, e)  -- also the head's weight; e = tied_width or hidden_size
``embed_proj``                  (e, embedding) -- absent = identity
``lm_head.proj``                (head_in, e); no ``lm_head.weight``
==============================  =================================================

The residual stream is a row vector: a shortcut maps ``x -> x @ S``, the embedding is
``E[t] @ embed_proj``, a tied head computes ``(x @ proj) @ E^T + b``.  Every norm is the
weightless RMSNorm of SliceGPT that divides by the *original* width ``hidden_size``:
``x / sqrt(sum(x**2) / hidden_size + eps)``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import torch

from slicegpt_export.errors import SliceGPTError
from slicegpt_export.modeling import ModelDefinitionError, SlicedModel, build_model
from slicegpt_export.tensorio import DEFAULT_SHARD_BYTES, WEIGHTS_INDEX_NAME, WEIGHTS_NAME, LazyMapping, LazyTensors, ShardWriter

logger = logging.getLogger(__name__)

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)  # version 1 lacks tied embeddings and the size summary
CONFIG_NAME = "config.json"
SECTION = "slicegpt"
GGUF_METADATA_NAME = "gguf_metadata.json"  # a GGUF source's tokenizer.* / general.* keys, for GGUF export
SPECTRA_NAME = "eigenvalues.safetensors"  # the PCA spectrum of every sliced signal (report plots)


@dataclasses.dataclass
class LayerWidths:
    """Residual widths around one block; for a parallel block attn_* == mlp_*."""

    attn_in: int  # width of the residual entering the block (input of q/k/v)
    attn_out: int  # width after the attention shortcut (rows of o_proj)
    mlp_in: int  # input of the MLP (== attn_out for sequential blocks)
    mlp_out: int  # width leaving the block (rows of down_proj) == next block's attn_in
    intermediate: int | None = None  # MLP neurons kept in this block (None: the config's intermediate_size)


@dataclasses.dataclass
class RopeSpec:
    """Rotary position embedding: inv_freq_i = scaling(theta ** (-2i / dim)) for i < dim / 2."""

    theta: float
    dim: int  # number of rotated channels per head (== head_dim unless partial rotary)
    scaling: dict[str, Any] | None = None  # Hugging Face rope_scaling dict (rope_type linear/llama3/longrope) or None


@dataclasses.dataclass
class SlicedConfig:
    """Everything a reader needs to run a sliced checkpoint; stored as config.json's ``slicegpt`` section."""

    model_type: str  # base family (the Hugging Face model_type)
    hidden_size: int  # original width D; every norm divides by it
    vocab_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    norm_eps: float
    max_position_embeddings: int
    block_kind: str  # "sequential" (attention then MLP) or "parallel" (both read one norm)
    activation: str  # "silu", "gelu", "gelu_tanh" or "relu"
    gated_mlp: bool  # act(gate(x)) * up(x) when True, act(up(x)) otherwise
    bias: dict[str, bool]  # keys: qkv, attn_out, mlp, head
    position_embedding: str  # "rope" or "learned"
    rope: RopeSpec | None
    position_offset: int  # learned positions: row = position + offset (OPT uses 2)
    sliding_window: int | None
    embedding_width: int  # columns of embed_tokens (residual width entering layer 0)
    layers: list[LayerWidths]
    head_in: int  # columns of lm_head
    tied_embeddings: bool = False  # embed_tokens (vocab, e) stored once, read by the embedding and the head
    tied_width: int | None = None  # e: columns of a tied embedding matrix sliced to E U (None: D)
    qk_norm: bool = False  # per-head RMSNorm (weighted, over head_dim) of queries and keys before rope (Qwen3, Gemma 3)
    post_norms: bool = False  # Gemma 2/3: branch outputs stay D wide, weightless norm over D, then a (D, d_out) post_proj
    attention_scale: float | None = None  # softmax scale of q k^T (None: 1 / sqrt(head_dim)); Gemma: query_pre_attn_scalar^-0.5
    attn_logit_softcap: float | None = None  # Gemma 2: scores -> cap * tanh(scores / cap) before the softmax
    final_logit_softcap: float | None = None  # Gemma 2: logits -> cap * tanh(logits / cap)
    sliding_layers: list[bool] | None = None  # which layers use sliding_window (None: all of them when it is set)
    local_rope: RopeSpec | None = None  # rope of the sliding layers when it differs from `rope` (Gemma 3)
    rope_layers: list[bool] | None = None  # which layers rotate q and k (None: all); SmolLM3 skips every 4th
    bos_windows: bool = False  # trained to always see BOS (Gemma): every calibration and evaluation window starts with it
    sparsity: float = 0.0  # the paper's slicing fraction (of the hidden width), 0 for a budget
    round_to: int = 8
    slicing: dict[str, Any] = dataclasses.field(default_factory=dict)  # how widths were chosen (rotation, allocation, budget)
    calibration: dict[str, Any] = dataclasses.field(default_factory=dict)
    recovery: dict[str, Any] = dataclasses.field(default_factory=dict)  # recovery fine-tuning settings; empty: none
    source_model: str = ""  # where the dense model came from (folder, hub id or .gguf file)
    size: dict[str, Any] = dataclasses.field(default_factory=dict)  # stored parameters and weight MACs/token vs dense
    format_version: int = FORMAT_VERSION

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def rotated(self) -> bool:
        """Whether the weights left the source's basis: rotation none (and the plain dense model) keeps it."""
        return self.slicing.get("rotation") != "none"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SlicedConfig:
        data = dict(data)
        version = data.get("format_version")
        if version not in READABLE_VERSIONS:
            raise SliceGPTError(f"unsupported sliced checkpoint format version {version!r} (this tool reads {READABLE_VERSIONS})")
        if version == 1:
            data["size"] = {"dense_parameters": data.pop("dense_parameters", 0)}
            data["format_version"] = FORMAT_VERSION
        data["layers"] = [LayerWidths(**w) for w in data["layers"]]
        data["rope"] = RopeSpec(**data["rope"]) if data.get("rope") else None
        data["local_rope"] = RopeSpec(**data["local_rope"]) if data.get("local_rope") else None
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise SliceGPTError(f"unknown keys in the slicegpt config section: {sorted(unknown)}")
        return cls(**data)


def is_shortcut(name: str) -> bool:
    """Whether checkpoint tensor `name` is a shortcut matrix (``layers.N.attn_shortcut`` / ``layers.N.mlp_shortcut``)."""
    return name.endswith("_shortcut")


def weight_macs_per_token(tensors: dict[str, torch.Tensor], *, tied_embeddings: bool) -> int:
    """Multiply-accumulates per token of every weight matrix product: linears, shortcuts, projections, head.

    Embedding lookups cost none; a tied embedding matrix is counted once, as the head's product.
    """
    macs = sum(t.numel() for n, t in tensors.items() if t.dim() == 2 and not n.startswith(("embed_tokens.", "embed_positions.")))
    return macs + (tensors["embed_tokens.weight"].numel() if tied_embeddings else 0)


def size_summary(tensors: dict[str, torch.Tensor], cfg: SlicedConfig, *, dense_parameters: int, dense_macs: int) -> dict[str, Any]:
    """Stored parameters and weight MACs per token against the dense model, beside the paper's slicing fraction."""
    params = parameter_count(tensors)
    macs = weight_macs_per_token(tensors, tied_embeddings=cfg.tied_embeddings)
    return {
        "sparsity": cfg.sparsity,
        "parameters": params,
        "dense_parameters": dense_parameters,
        "parameter_fraction": params / dense_parameters if dense_parameters else None,
        "macs_per_token": macs,
        "dense_macs_per_token": dense_macs,
        "mac_fraction": macs / dense_macs if dense_macs else None,
    }


def parameter_count(tensors: dict[str, torch.Tensor]) -> int:
    """Number of stored parameters, counting a tensor shared under two names once (meta tensors: each once).

    A lazy mapping is counted from its headers: it reads a fresh tensor on every access and frees
    it after, so two tensors of one shape could share an address and count once.
    """
    if isinstance(tensors, LazyMapping):
        tensors = tensors.meta()
    seen: set[tuple[int, tuple[int, ...]]] = set()
    total = 0
    for t in tensors.values():
        key = (id(t) if t.is_meta else t.data_ptr(), tuple(t.shape))  # a tied head is the embedding under a second name
        if key not in seen:
            seen.add(key)
            total += t.numel()
    return total


def save_checkpoint(
    directory: Path,
    *,
    tensors: dict[str, torch.Tensor],
    config: SlicedConfig,
    base_config: dict[str, Any],
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> None:
    """Write weights (cast to `dtype` when given) and config.json into `directory` (which the caller creates atomically)."""
    writer = ShardWriter(Path(directory), dtype=dtype, max_shard_bytes=max_shard_bytes)
    writer.add_all(tensors)
    writer.close()
    write_config(directory, config=config, base_config=base_config)


def write_config(directory: Path, *, config: SlicedConfig, base_config: dict[str, Any]) -> None:
    """config.json: the source's Hugging Face config, the remote-code entries and the ``slicegpt`` section."""
    from slicegpt_export.hf_remote import write_remote_code

    directory = Path(directory)
    full = {**base_config, **write_remote_code(directory)}
    full[SECTION] = config.to_dict()
    (directory / CONFIG_NAME).write_text(json.dumps(full, indent=2, sort_keys=False) + "\n")


def save_spectra(directory: Path, eigenvalues: dict[str, list[float]]) -> None:
    """Every PCA spectrum (signal name -> eigenvalues, descending) as float64 tensors."""
    from safetensors.torch import save_file

    if eigenvalues:
        save_file({k: torch.tensor(v, dtype=torch.float64) for k, v in eigenvalues.items()}, str(Path(directory) / SPECTRA_NAME))


def read_spectra(directory: Path) -> dict[str, torch.Tensor]:
    """The spectra saved by save_spectra ({} when the checkpoint has none)."""
    from safetensors.torch import load_file

    path = Path(directory) / SPECTRA_NAME
    return load_file(str(path)) if path.is_file() else {}


def read_json(path: Path, *, missing: str) -> dict[str, Any]:
    """A JSON file's content; `missing` is the error message when the file is absent."""
    if not path.is_file():
        raise SliceGPTError(missing)
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SliceGPTError(f"cannot read {path}: {exc}") from exc


def read_config(directory: Path) -> tuple[SlicedConfig, dict[str, Any]]:
    """Return the sliced config and the full config.json dict of a checkpoint folder."""
    path = Path(directory) / CONFIG_NAME
    full = read_json(path, missing=f"{directory} is not a sliced checkpoint: {CONFIG_NAME} is missing")
    if SECTION not in full:
        raise SliceGPTError(f"{path} has no '{SECTION}' section: this is not a sliced checkpoint")
    try:
        return SlicedConfig.from_dict(full[SECTION]), full
    except (TypeError, KeyError) as exc:
        raise SliceGPTError(f"malformed '{SECTION}' section in {path}: {exc}") from exc


def weight_files(directory: Path) -> list[Path]:
    """The safetensors files of a folder: the shards named by an index, else model.safetensors, else any *.safetensors."""
    directory = Path(directory)
    index = directory / WEIGHTS_INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError) as exc:
            raise SliceGPTError(f"cannot read {index}: {exc}") from exc
        files = sorted({directory / name for name in weight_map.values()})
    elif (directory / WEIGHTS_NAME).exists():
        files = [directory / WEIGHTS_NAME]
    else:
        files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise SliceGPTError(f"no safetensors weights found in {directory}")
    for f in files:
        if not f.is_file():
            raise SliceGPTError(f"weights file {f} is missing")
    return files


def read_tensors(directory: Path, *, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Load every tensor of a folder's safetensors files, refusing missing or truncated files."""
    return dict(lazy_tensors(directory, dtype=dtype).read_all())


def lazy_tensors(directory: Path, *, dtype: torch.dtype | None = None) -> LazyTensors:
    """The tensors of a folder's safetensors files, read one at a time when asked for (see tensorio)."""
    return LazyTensors(weight_files(directory), dtype=dtype)


def build_checked(cfg: SlicedConfig, tensors: dict[str, torch.Tensor]) -> SlicedModel:
    """build_model, with a definition problem reported as a SliceGPTError."""
    try:
        return build_model(cfg, tensors)
    except ModelDefinitionError as exc:
        raise SliceGPTError(str(exc)) from exc


def load_sliced(path: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> SlicedModel:
    """Load a sliced checkpoint folder as the project's PyTorch model."""
    cfg, _ = read_config(Path(path))
    tensors = read_tensors(Path(path), dtype=dtype)
    return build_checked(cfg, tensors).to(device)
