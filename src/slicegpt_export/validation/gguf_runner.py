"""Run a `slicegpt` GGUF file from the file alone: metadata, tensors and tokenizer (docs/gguf-slicegpt.md).

Nothing from the sliced checkpoint is consulted.  The file is memory-mapped with gguf-py's
GGUFReader after a bounds check of its header, every key and tensor is checked against the
spec, and any malformed, truncated or inconsistent file is refused with a SliceGPTError.  A file of a family's own llama.cpp
architecture (exporters/gguf_stock.py) is run by transformers' GGUF reader instead (StockGGUFModel, open_gguf_model).
"""

from __future__ import annotations

import dataclasses
import logging
import struct
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from slicegpt_export import gguf_spec as spec
from slicegpt_export.checkpoint import LayerWidths, RopeSpec, SlicedConfig, is_shortcut
from slicegpt_export.errors import SliceGPTError
from slicegpt_export.modeling import ModelDefinitionError, SlicedModel, build_model, rope_frequency_divisors, rope_scaling_kind

logger = logging.getLogger(__name__)
MIN_KV_BYTES = 8 + 8 + 4  # key length, one byte of key, value type
MIN_TENSOR_INFO_BYTES = 8 + 1 + 4 + 8 + 4 + 8  # name length, one byte, n_dims, one dim, type, offset
MAX_DIMS = 4
ROPE_TENSORS = (spec.ROPE_FREQS, spec.ROPE_FACTORS_LONG, spec.ROPE_FACTORS_SHORT)  # not checkpoint tensors


class GGUFFormatError(SliceGPTError):
    """The file is not a well-formed, consistent `slicegpt` GGUF file."""


def check_header(path: Path) -> None:
    """Refuse files whose header counts cannot fit in the file (before gguf-py walks them)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(24)
    if len(head) < 24:
        raise GGUFFormatError(f"{path}: {size} bytes, too short for a GGUF header")
    magic, version, n_tensors, n_kv = struct.unpack("<IIQQ", head)
    if magic != gguf.GGUF_MAGIC:
        raise GGUFFormatError(f"{path}: not a GGUF file (bad magic)")
    if version not in (2, 3):
        raise GGUFFormatError(f"{path}: unsupported GGUF version {version}")
    if n_kv * MIN_KV_BYTES + n_tensors * MIN_TENSOR_INFO_BYTES > size:
        raise GGUFFormatError(f"{path}: header claims {n_kv} keys and {n_tensors} tensors, more than {size} bytes can hold")


def open_reader(path: Path) -> gguf.GGUFReader:
    path = Path(path)
    if not path.is_file():
        raise GGUFFormatError(f"GGUF file {path} does not exist")
    check_header(path)
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as exc:  # gguf-py raises ValueError, IndexError, KeyError, OverflowError ... on damaged files
        raise GGUFFormatError(f"{path}: malformed GGUF ({type(exc).__name__}: {str(exc)[:120]})") from exc
    size = path.stat().st_size
    for t in reader.tensors:
        end = t.data_offset + t.n_bytes
        if t.data_offset < 0 or end > size or len(t.shape) > MAX_DIMS or len(t.shape) == 0:
            raise GGUFFormatError(f"{path}: tensor {t.name} lies outside the file or has {len(t.shape)} dimensions")
    return reader


class Metadata:
    """Typed access to the key/value section, each read refusing a missing or mistyped key."""

    def __init__(self, reader: gguf.GGUFReader, path: Path) -> None:
        self.fields, self.path = reader.fields, path

    def get(self, key: str, kind: type, default: Any = ...) -> Any:
        field = self.fields.get(key)
        if field is None:
            if default is ...:
                raise GGUFFormatError(f"{self.path}: missing key {key}")
            return default
        try:
            value = field.contents()
        except Exception as exc:
            raise GGUFFormatError(f"{self.path}: unreadable key {key}") from exc
        if kind is list:
            ok = isinstance(value, list)
        elif kind is int:
            ok = isinstance(value, int | np.integer) and not isinstance(value, bool)
        elif kind is float:
            ok = isinstance(value, float | int | np.floating)
        else:
            ok = isinstance(value, kind)
        if not ok:
            raise GGUFFormatError(f"{self.path}: key {key} has the wrong type ({type(value).__name__})")
        return value


def config_from_metadata(meta: Metadata) -> SlicedConfig:
    """Rebuild the model description from `slicegpt.*` keys alone."""
    arch = meta.get("general.architecture", str)
    if arch != spec.ARCH:
        raise GGUFFormatError(f"{meta.path}: architecture {arch!r}, expected {spec.ARCH!r}")
    version = meta.get(spec.SPEC_VERSION_KEY, int)
    if version not in spec.READABLE_SPEC_VERSIONS:
        raise GGUFFormatError(f"{meta.path}: slicegpt spec version {version}, this reader implements {spec.READABLE_SPEC_VERSIONS}")
    n = meta.get(spec.BLOCK_COUNT, int)
    widths = {k: meta.get(k, list) for k in (spec.WIDTH_ATTN_IN, spec.WIDTH_ATTN_OUT, spec.WIDTH_MLP_IN, spec.WIDTH_MLP_OUT)}
    if any(len(v) != n for v in widths.values()):
        raise GGUFFormatError(f"{meta.path}: width arrays do not have block_count = {n} entries")
    intermediates = feed_forward_lengths(meta, n)
    tied, token_width = meta.get(spec.TIED_EMBEDDINGS, bool), meta.get(spec.WIDTH_TOKEN_EMBD, int)
    rope = None
    if meta.get(spec.POSITION_EMBEDDING, str) == "rope":
        kind = meta.get(spec.ROPE_SCALING_TYPE, str, "none")
        scaling = None
        if kind not in ("none", "linear", "longrope") or (kind == "longrope" and version < 3):
            raise GGUFFormatError(f"{meta.path}: rope scaling type {kind!r} (spec version {version} allows none, linear{', longrope' if version >= 3 else ''})")
        if kind == "linear":
            scaling = {"rope_type": kind, "factor": meta.get(spec.ROPE_SCALING_FACTOR, float)}
        if kind == "longrope":  # the factors themselves are tensors, filled in by GGUFModel
            scaling = {"rope_type": kind, "attention_factor": float(meta.get(spec.ROPE_SCALING_ATTN_FACTOR, float)),
                       "original_max_position_embeddings": meta.get(spec.ROPE_SCALING_ORIG_CTX, int)}  # fmt: skip
        if meta.get(spec.ROPE_LLAMA3_FACTOR, float, None) is not None:
            scaling = {"rope_type": "llama3", "factor": meta.get(spec.ROPE_LLAMA3_FACTOR, float),
                       "low_freq_factor": meta.get(spec.ROPE_LLAMA3_LOW_FREQ_FACTOR, float),
                       "high_freq_factor": meta.get(spec.ROPE_LLAMA3_HIGH_FREQ_FACTOR, float),
                       "original_max_position_embeddings": meta.get(spec.ROPE_LLAMA3_ORIG_CTX, int)}  # fmt: skip
        rope = RopeSpec(theta=meta.get(spec.ROPE_FREQ_BASE, float), dim=meta.get(spec.ROPE_DIMENSION_COUNT, int), scaling=scaling)
    cfg = SlicedConfig(
        model_type=meta.get(spec.BASE_FAMILY, str),
        hidden_size=meta.get(spec.EMBEDDING_LENGTH, int),
        vocab_size=meta.get(spec.VOCAB_SIZE, int),
        num_heads=meta.get(spec.HEAD_COUNT, int),
        num_kv_heads=meta.get(spec.HEAD_COUNT_KV, int),
        head_dim=meta.get(spec.KEY_LENGTH, int),
        intermediate_size=max(intermediates) if intermediates[0] else meta.get(spec.FEED_FORWARD_LENGTH, int),
        norm_eps=float(meta.get(spec.NORM_EPSILON, float)),
        max_position_embeddings=meta.get(spec.CONTEXT_LENGTH, int),
        block_kind=meta.get(spec.BLOCK_KIND, str),
        activation=meta.get(spec.ACTIVATION, str),
        gated_mlp=meta.get(spec.GATED_MLP, bool),
        bias={"qkv": meta.get(spec.BIAS_QKV, bool), "attn_out": meta.get(spec.BIAS_ATTN_OUT, bool),
              "mlp": meta.get(spec.BIAS_MLP, bool), "head": meta.get(spec.BIAS_HEAD, bool)},  # fmt: skip
        position_embedding=meta.get(spec.POSITION_EMBEDDING, str),
        rope=rope,
        position_offset=meta.get(spec.POSITION_OFFSET, int),
        sliding_window=meta.get(spec.SLIDING_WINDOW, int, None),
        embedding_width=meta.get(spec.WIDTH_EMBEDDING, int),
        layers=[LayerWidths(*(int(widths[k][i]) for k in widths), intermediate=intermediates[i]) for i in range(n)],
        head_in=meta.get(spec.WIDTH_HEAD_IN, int),
        tied_embeddings=tied,
        tied_width=token_width if tied and token_width != meta.get(spec.EMBEDDING_LENGTH, int) else None,
        qk_norm=meta.get(spec.QK_NORM, bool) if version >= 3 else False,
        post_norms=meta.get(spec.POST_NORMS, bool) if version >= 3 else False,
        attention_scale=optional_float(meta, spec.ATTENTION_SCALE),
        attn_logit_softcap=optional_float(meta, spec.ATTN_LOGIT_SOFTCAPPING),
        final_logit_softcap=optional_float(meta, spec.FINAL_LOGIT_SOFTCAPPING),
        sliding_layers=layer_flags(meta, spec.SLIDING_WINDOW_PATTERN, n),
        rope_layers=layer_flags(meta, spec.ROPE_LAYERS, n),
        bos_windows=meta.get(spec.BOS_WINDOWS, bool, False),
        local_rope=RopeSpec(float(meta.get(spec.ROPE_FREQ_BASE_SWA, float)), rope.dim) if rope and spec.ROPE_FREQ_BASE_SWA in meta.fields else None,
        sparsity=float(meta.get(spec.SPARSITY, float, 0.0)),
    )
    check_config(cfg, meta.path)
    return cfg


def optional_float(meta: Metadata, key: str) -> float | None:
    value = meta.get(key, float, None)
    return None if value is None else float(value)


def layer_flags(meta: Metadata, key: str, n: int) -> list[bool] | None:
    """One flag per block (which use the sliding window, which rotate); None when the file has no such key (all do)."""
    values = meta.get(key, list, None)
    if values is None:
        return None
    if len(values) != n:
        raise GGUFFormatError(f"{meta.path}: {key} must hold block_count = {n} entries")
    return [bool(v) for v in values]


def feed_forward_lengths(meta: Metadata, n: int) -> list[int | None]:
    """MLP neurons per block when the key is an array of block_count (pruned MLPs); [None] * n for one uint32."""
    field = meta.fields.get(spec.FEED_FORWARD_LENGTH)
    if field is not None and field.types and field.types[0] == gguf.GGUFValueType.ARRAY:
        values = [int(v) for v in meta.get(spec.FEED_FORWARD_LENGTH, list)]
        if len(values) != n or min(values, default=0) < 1:
            raise GGUFFormatError(f"{meta.path}: {spec.FEED_FORWARD_LENGTH} must hold block_count = {n} positive entries")
        return values
    return [None] * n


def check_config(cfg: SlicedConfig, path: Path) -> None:
    """Plausibility of the hyperparameters, so no absurd value reaches an allocation."""
    problems = []
    if cfg.block_kind not in ("sequential", "parallel"):
        problems.append(f"block_kind {cfg.block_kind!r}")
    if cfg.activation not in ("silu", "gelu", "gelu_tanh", "relu"):
        problems.append(f"activation {cfg.activation!r}")
    if cfg.position_embedding not in ("rope", "learned"):
        problems.append(f"position_embedding {cfg.position_embedding!r}")
    if cfg.num_heads < 1 or cfg.num_kv_heads < 1 or cfg.num_heads % cfg.num_kv_heads:
        problems.append(f"head counts {cfg.num_heads}/{cfg.num_kv_heads}")
    if cfg.rope is not None and not (0 < cfg.rope.dim <= cfg.head_dim and cfg.rope.dim % 2 == 0):
        problems.append(f"rope dimension {cfg.rope.dim} for head_dim {cfg.head_dim}")
    if not 0 < cfg.max_position_embeddings <= 1 << 24:
        problems.append(f"context_length {cfg.max_position_embeddings}")
    if problems:
        raise GGUFFormatError(f"{path}: inconsistent hyperparameters: {', '.join(problems)}")


def read_tensors(reader: gguf.GGUFReader, path: Path) -> dict[str, torch.Tensor]:
    """Dequantized tensors under checkpoint names (shortcuts transposed back to (d_in, d_out))."""
    out: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        try:
            name = t.name if t.name in ROPE_TENSORS else spec.checkpoint_name(t.name)
        except (KeyError, ValueError, IndexError):
            raise GGUFFormatError(f"{path}: tensor {t.name!r} is not part of the slicegpt spec") from None
        try:
            array = gguf.quants.dequantize(t.data, t.tensor_type)  # numpy shape = reversed ggml ne
        except Exception as exc:
            raise GGUFFormatError(f"{path}: cannot decode tensor {t.name} ({type(exc).__name__})") from exc
        expected = tuple(int(d) for d in reversed(t.shape.tolist()))
        if array.shape != expected:
            raise GGUFFormatError(f"{path}: tensor {t.name} holds {array.shape}, header says {expected}")
        tensor = torch.from_numpy(np.array(array, dtype=np.float32))  # a writable copy, off the memory map
        out[name] = tensor.T.contiguous() if spec.is_right_multiplied(name) else tensor
    return out


def add_shortcut_identity(tensors: dict[str, torch.Tensor]) -> None:
    """Shortcuts stored as S - J (spec version 4) back to S = J + (S - J); each (d_in, d_out)."""
    for name, t in tensors.items():
        if is_shortcut(name):
            tensors[name] = t + torch.eye(t.shape[0], t.shape[1], dtype=t.dtype)


def check_rope_freqs(cfg: SlicedConfig, stored: torch.Tensor | None, path: Path) -> None:
    """`rope_freqs.weight` (llama.cpp's form of Llama 3 scaling) must be present exactly when the keys ask for it and agree."""
    llama3 = cfg.rope is not None and rope_scaling_kind(cfg.rope) == "llama3"
    if stored is None and not llama3:
        return
    if stored is None or not llama3:
        raise GGUFFormatError(f"{path}: {spec.ROPE_FREQS} and the rope.llama3 keys must come together")
    expected = rope_frequency_divisors(cfg.rope)
    if stored.shape != expected.shape or not torch.allclose(stored, expected, rtol=1e-6):
        raise GGUFFormatError(f"{path}: {spec.ROPE_FREQS} disagrees with the rope.llama3 keys")


def attach_longrope_factors(cfg: SlicedConfig, tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Move `rope_factors_long/short` into a LongRoPE config; they must come exactly with the longrope keys, r/2 each."""
    stored = [tensors.pop(n, None) for n in (spec.ROPE_FACTORS_LONG, spec.ROPE_FACTORS_SHORT)]
    longrope = cfg.rope is not None and rope_scaling_kind(cfg.rope) == "longrope"
    if not longrope and stored == [None, None]:
        return
    if not longrope or any(t is None or t.shape != (cfg.rope.dim // 2,) for t in stored):
        raise GGUFFormatError(f"{path}: {spec.ROPE_FACTORS_LONG} and {spec.ROPE_FACTORS_SHORT} ([rope dimension / 2] each) "
                              "must come exactly with rope scaling type longrope")  # fmt: skip
    cfg.rope.scaling["long_factor"], cfg.rope.scaling["short_factor"] = (t.double().tolist() for t in stored)


class GGUFModel:
    """A `slicegpt` GGUF file as a runnable model plus its own tokenizer."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.reader = open_reader(self.path)
        self.meta = Metadata(self.reader, self.path)
        self.config = config_from_metadata(self.meta)
        tensors = read_tensors(self.reader, self.path)
        if self.meta.get(spec.SHORTCUT_DELTA, bool, None) is not None and self.meta.get(spec.SPEC_VERSION_KEY, int) < spec.DELTA_SPEC_VERSION:
            raise GGUFFormatError(f"{self.path}: {spec.SHORTCUT_DELTA} needs spec version {spec.DELTA_SPEC_VERSION}")
        if self.meta.get(spec.SHORTCUT_DELTA, bool, False):
            add_shortcut_identity(tensors)
        check_rope_freqs(self.config, tensors.pop(spec.ROPE_FREQS, None), self.path)
        attach_longrope_factors(self.config, tensors, self.path)
        try:
            self.model: SlicedModel = build_model(self.config, tensors)
        except ModelDefinitionError as exc:
            raise GGUFFormatError(f"{self.path}: {exc}") from exc

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(input_ids, attention_mask=attention_mask).logits

    def tokenizer(self) -> Any:
        """A `tokenizers.Tokenizer` built from the file's own vocabulary, merges and pre-tokenizer name."""
        return tokenizer_from_metadata(self.meta)


@dataclasses.dataclass(frozen=True)
class StockConfig:
    """What validation reads of a stock file's configuration (a SlicedConfig's fields of the same names)."""

    vocab_size: int
    max_position_embeddings: int
    bos_windows: bool = False


class StockGGUFModel:
    """A GGUF file of a family's own llama.cpp architecture (exporters/gguf_stock.py), run by transformers from the file
    alone, as a GGUF source model is read (sources.models.load_source), plus the file's own tokenizer."""

    def __init__(self, path: str | Path) -> None:
        from slicegpt_export.sources.models import dense_model, load_source

        self.path = Path(path)
        self.meta = Metadata(open_reader(self.path), self.path)
        source = load_source(self.path)
        self.config = StockConfig(int(source.hf_config["vocab_size"]), int(source.hf_config["max_position_embeddings"]))
        self.model = dense_model(source)

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(input_ids, attention_mask=attention_mask).logits

    def tokenizer(self) -> Any:
        return tokenizer_from_metadata(self.meta)


def file_architecture(path: Path) -> str | None:
    """The file's `general.architecture` (None when it names none)."""
    return Metadata(open_reader(path), path).get("general.architecture", str, None)


def open_gguf_model(path: str | Path) -> GGUFModel | StockGGUFModel:
    """A GGUF file as a runnable model: the `slicegpt` architecture by this module's reader, a stock one by transformers."""
    path = Path(path)
    return GGUFModel(path) if file_architecture(path) == spec.ARCH else StockGGUFModel(path)


#: llama.cpp pre-tokenizer name -> the equivalent Hugging Face pre-tokenizer
def _pre_tokenizer(name: str) -> Any:
    from tokenizers import pre_tokenizers

    if name in ("gpt-2", "default"):
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if name == "smollm":
        return pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
        )
    raise GGUFFormatError(f"pre-tokenizer {name!r} is not implemented by this runner (gpt2, default, smollm)")


def tokenizer_from_metadata(meta: Metadata) -> Any:
    from tokenizers import AddedToken, Tokenizer, decoders, models

    if meta.get("tokenizer.ggml.model", str) != "gpt2":
        raise GGUFFormatError(f"{meta.path}: only byte-level BPE ('gpt2') vocabularies are tokenized by this runner")
    tokens = meta.get("tokenizer.ggml.tokens", list)
    types = meta.get("tokenizer.ggml.token_type", list, [int(gguf.TokenType.NORMAL)] * len(tokens))
    merges = meta.get("tokenizer.ggml.merges", list, [])
    vocab = {tok: i for i, tok in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False))
    tok.pre_tokenizer = _pre_tokenizer(meta.get("tokenizer.ggml.pre", str, "default"))
    tok.decoder = decoders.ByteLevel()
    special = [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if int(k) == int(gguf.TokenType.CONTROL)]
    tok.add_special_tokens(special)
    return tok


FT = gguf.LlamaFileType
#: general.file_type -> max |logit difference| on random prompts; absent = reported only.
#: Lossy types are judged by perplexity on real text (`validate --text`): on random tokens a real model sits in an
#: unusual regime where half-precision rounding moves logits by ~1 while text perplexity moves by <0.1%.
TOLERANCES = {FT.ALL_F32: 1e-3}


class GGUFValidationError(SliceGPTError):
    """The GGUF file's logits disagree with the PyTorch reference beyond the tolerance."""


def validate_gguf(path: Path, checkpoint: Path, *, prompts: int = 8, length: int = 32, seed: int = 0) -> dict[str, float]:
    """Compare the file's logits with the reference on random prompts; an f32 file beyond its bound is an error."""
    from slicegpt_export.checkpoint import load_sliced

    model = open_gguf_model(path)
    reference = load_sliced(checkpoint)
    ids = torch.randint(0, model.config.vocab_size, (prompts, length), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        got, expected = model.logits(ids), reference(ids).logits
    diff = (got - expected).abs().max().item()
    top1 = (got.argmax(-1) == expected.argmax(-1)).float().mean().item()
    logger.info("gguf %s against the reference on %d prompts of %d random tokens: max |logit diff| %.3g, top-1 agreement %.1f%% "
                "(random tokens are harder on lossy types than text; the validate table compares on text)",
                Path(path).name, prompts, length, diff, 100 * top1)  # fmt: skip
    bound = TOLERANCES.get(model.meta.get("general.file_type", int))
    if bound is not None and not diff <= bound:
        raise GGUFValidationError(f"{path}: max |logit diff| {diff:.3g} against the reference, more than {bound:g}")
    return {"max_abs_diff": diff, "top1_agreement": top1}
