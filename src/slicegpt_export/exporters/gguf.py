"""GGUF exporter: a sliced checkpoint as a GGUF file of architecture `slicegpt` (docs/gguf-slicegpt.md).

Written with gguf-py's GGUFWriter; block types rounded with a least-squares scale per block
(exporters/quantize.py), others through gguf-py's converters.  The tokenizer
is embedded: a GGUF source's ``tokenizer.*`` keys verbatim (kept in the checkpoint's
gguf_metadata.json), otherwise derived from the checkpoint's Hugging Face tokenizer.json.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from tqdm.auto import tqdm

from slicegpt_export import gguf_spec as spec
from slicegpt_export.atomic import atomic_directory
from slicegpt_export.checkpoint import GGUF_METADATA_NAME, SlicedConfig, is_shortcut, lazy_tensors, parameter_count, read_config
from slicegpt_export.errors import SliceGPTError
from slicegpt_export.exporters import padding, quantize
from slicegpt_export.exporters.padding import ResidualTensors, pad_residual_widths
from slicegpt_export.modeling import (
    longrope_original_context,
    rope_attention_factor,
    rope_frequency_divisors,
    rope_scaling_kind,
)

logger = logging.getLogger(__name__)

Q = gguf.GGMLQuantizationType
#: --gguf-type -> (tensor type of 2-D weights, general.file_type)
GGUF_TYPES = {
    "f32": (Q.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (Q.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (Q.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (Q.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
    "q4_0": (Q.Q4_0, gguf.LlamaFileType.MOSTLY_Q4_0),
}
VALUE_TYPES = {
    "string": gguf.GGUFValueType.STRING,
    "bool": gguf.GGUFValueType.BOOL,
    "uint32": gguf.GGUFValueType.UINT32,
    "int32": gguf.GGUFValueType.INT32,
    "float32": gguf.GGUFValueType.FLOAT32,
}
#: llama.cpp pre-tokenizer names, recognised from a tokenizer.json pre_tokenizer
PRE_TOKENIZERS = {
    json.dumps({"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}): "gpt-2",
    json.dumps({"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True},
               {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}]}): "smollm",
}  # fmt: skip


class SliceGPTWriter(gguf.GGUFWriter):
    """gguf-py's writer, also writing empty typed arrays (GGUF allows them; gguf-py refuses them).

    llama.cpp requires `tokenizer.ggml.merges` for every BPE vocabulary, so a byte-level tokenizer
    without merges must still write the key, as an empty string array.
    """

    def _pack_val(self, val: Any, vtype: gguf.GGUFValueType, add_vtype: bool, sub_type: gguf.GGUFValueType | None = None) -> bytes:
        if vtype == gguf.GGUFValueType.ARRAY and sub_type is not None and len(val) == 0:
            head = self._pack("I", vtype) if add_vtype else b""
            return head + self._pack("I", sub_type) + self._pack("Q", 0)
        return super()._pack_val(val, vtype, add_vtype, sub_type)


def gguf_file_name(gguf_type: str) -> str:
    return f"model-{gguf_type}.gguf"


def add_hyperparameters(w: gguf.GGUFWriter, cfg: SlicedConfig, *, shortcut_delta: bool = False) -> None:
    """Every `slicegpt.*` key of the spec; a file storing shortcuts as S - J says so and is version 4 (older readers
    refuse it instead of misreading it)."""
    w.add_uint32(spec.SPEC_VERSION_KEY, spec.DELTA_SPEC_VERSION if shortcut_delta else spec.SPEC_VERSION)
    if shortcut_delta:
        w.add_bool(spec.SHORTCUT_DELTA, True)
    w.add_string(spec.BASE_FAMILY, cfg.model_type)
    for k, v in [(spec.BLOCK_COUNT, cfg.num_layers), (spec.EMBEDDING_LENGTH, cfg.hidden_size),
                 (spec.CONTEXT_LENGTH, cfg.max_position_embeddings),
                 (spec.VOCAB_SIZE, cfg.vocab_size), (spec.HEAD_COUNT, cfg.num_heads), (spec.HEAD_COUNT_KV, cfg.num_kv_heads),
                 (spec.KEY_LENGTH, cfg.head_dim), (spec.VALUE_LENGTH, cfg.head_dim), (spec.POSITION_OFFSET, cfg.position_offset),
                 (spec.WIDTH_EMBEDDING, cfg.embedding_width), (spec.WIDTH_HEAD_IN, cfg.head_in),
                 (spec.WIDTH_TOKEN_EMBD, (cfg.tied_width or cfg.hidden_size) if cfg.tied_embeddings else cfg.embedding_width)]:  # fmt: skip
        w.add_uint32(k, int(v))
    intermediates = [layer.intermediate or cfg.intermediate_size for layer in cfg.layers]
    if all(n == cfg.intermediate_size for n in intermediates):
        w.add_uint32(spec.FEED_FORWARD_LENGTH, cfg.intermediate_size)
    else:  # MLPs pruned per block: llama.cpp's per-layer form of the key
        w.add_key_value(spec.FEED_FORWARD_LENGTH, intermediates, gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.UINT32)
    w.add_float32(spec.NORM_EPSILON, cfg.norm_eps)
    w.add_float32(spec.SPARSITY, cfg.sparsity)
    if cfg.sliding_window is not None:
        w.add_uint32(spec.SLIDING_WINDOW, cfg.sliding_window)
    for k, s in [(spec.BLOCK_KIND, cfg.block_kind), (spec.ACTIVATION, cfg.activation), (spec.POSITION_EMBEDDING, cfg.position_embedding)]:
        w.add_string(k, s)
    w.add_bool(spec.GATED_MLP, cfg.gated_mlp)
    w.add_bool(spec.TIED_EMBEDDINGS, cfg.tied_embeddings)
    w.add_bool(spec.QK_NORM, cfg.qk_norm)
    w.add_bool(spec.POST_NORMS, cfg.post_norms)
    for k, value in [(spec.ATTENTION_SCALE, cfg.attention_scale), (spec.ATTN_LOGIT_SOFTCAPPING, cfg.attn_logit_softcap),
                     (spec.FINAL_LOGIT_SOFTCAPPING, cfg.final_logit_softcap)]:  # fmt: skip
        if value is not None:
            w.add_float32(k, value)
    if cfg.sliding_window is not None and cfg.sliding_layers is not None:
        w.add_key_value(spec.SLIDING_WINDOW_PATTERN, [bool(f) for f in cfg.sliding_layers], gguf.GGUFValueType.ARRAY,
                        sub_type=gguf.GGUFValueType.BOOL)  # fmt: skip
    if cfg.local_rope is not None:
        w.add_float32(spec.ROPE_FREQ_BASE_SWA, cfg.local_rope.theta)
    if cfg.bos_windows:
        w.add_bool(spec.BOS_WINDOWS, True)
    if cfg.rope_layers is not None:
        w.add_key_value(spec.ROPE_LAYERS, [bool(f) for f in cfg.rope_layers], gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.BOOL)
    for k, flag in [(spec.BIAS_QKV, "qkv"), (spec.BIAS_ATTN_OUT, "attn_out"), (spec.BIAS_MLP, "mlp"), (spec.BIAS_HEAD, "head")]:
        w.add_bool(k, cfg.bias[flag])
    for k, field in [(spec.WIDTH_ATTN_IN, "attn_in"), (spec.WIDTH_ATTN_OUT, "attn_out"), (spec.WIDTH_MLP_IN, "mlp_in"), (spec.WIDTH_MLP_OUT, "mlp_out")]:
        widths = [int(getattr(layer, field)) for layer in cfg.layers]
        w.add_key_value(k, widths, gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.UINT32)
    if cfg.rope is not None:
        w.add_float32(spec.ROPE_FREQ_BASE, cfg.rope.theta)
        w.add_uint32(spec.ROPE_DIMENSION_COUNT, cfg.rope.dim)
        scaling = cfg.rope.scaling or {}
        kind = rope_scaling_kind(cfg.rope)
        w.add_string(spec.ROPE_SCALING_TYPE, kind if kind in ("linear", "longrope") else "none")
        if kind == "linear":
            w.add_float32(spec.ROPE_SCALING_FACTOR, float(scaling["factor"]))
        if kind == "longrope":
            w.add_float32(spec.ROPE_SCALING_ATTN_FACTOR, rope_attention_factor(cfg.rope))
            w.add_uint32(spec.ROPE_SCALING_ORIG_CTX, longrope_original_context(cfg.rope))
        if kind == "llama3":
            w.add_float32(spec.ROPE_LLAMA3_FACTOR, float(scaling["factor"]))
            w.add_float32(spec.ROPE_LLAMA3_LOW_FREQ_FACTOR, float(scaling["low_freq_factor"]))
            w.add_float32(spec.ROPE_LLAMA3_HIGH_FREQ_FACTOR, float(scaling["high_freq_factor"]))
            w.add_uint32(spec.ROPE_LLAMA3_ORIG_CTX, int(scaling["original_max_position_embeddings"]))


def add_typed(w: gguf.GGUFWriter, key: str, item: dict[str, Any]) -> None:
    """Write one {"type", "value"} entry as carried from a GGUF source."""
    kind = item["type"]
    if kind.startswith("array["):
        w.add_key_value(key, item["value"], gguf.GGUFValueType.ARRAY, sub_type=VALUE_TYPES[kind[6:-1]])
    else:
        w.add_key_value(key, item["value"], VALUE_TYPES[kind])


def tokenizer_from_hf(checkpoint: Path, vocab_size: int) -> tuple[list[str], list[int], str]:
    """Tokens, token types and the llama.cpp pre-tokenizer name from a byte-level BPE tokenizer.json."""
    path = checkpoint / "tokenizer.json"
    if not path.is_file():
        raise SliceGPTError(f"{checkpoint} has no tokenizer.json to embed in the GGUF file")
    data = json.loads(path.read_text())
    if data["model"]["type"] != "BPE" or data["model"].get("byte_fallback"):
        raise SliceGPTError("GGUF export embeds byte-level BPE tokenizers only (this one is "
                            f"{data['model']['type']}{' with byte fallback' if data['model'].get('byte_fallback') else ''})")  # fmt: skip
    pre = {k: v for k, v in (data.get("pre_tokenizer") or {}).items() if k in ("type", "add_prefix_space", "use_regex", "pretokenizers")}
    if "pretokenizers" in pre:
        pre["pretokenizers"] = [{k: v for k, v in p.items() if k in ("type", "individual_digits", "add_prefix_space", "use_regex")}
                                for p in pre["pretokenizers"]]  # fmt: skip
    name = PRE_TOKENIZERS.get(json.dumps(pre))
    if name is None:
        raise SliceGPTError(f"no llama.cpp pre-tokenizer known for {json.dumps(data.get('pre_tokenizer'))[:200]}")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [gguf.TokenType.UNUSED] * vocab_size
    for tok, idx in data["model"]["vocab"].items():
        if idx < vocab_size:
            tokens[idx], types[idx] = tok, gguf.TokenType.NORMAL
    for added in data.get("added_tokens", []):
        if added["id"] < vocab_size:
            tokens[added["id"]] = added["content"]
            types[added["id"]] = gguf.TokenType.CONTROL if added["special"] else gguf.TokenType.USER_DEFINED
    return tokens, [int(t) for t in types], name


def add_tokenizer(w: gguf.GGUFWriter, checkpoint: Path, cfg: SlicedConfig) -> None:
    """The source's tokenizer, special tokens and chat template, so llama.cpp's programs chat as with the source.

    A GGUF source's ``tokenizer.*`` keys verbatim (``tokenizer.chat_template`` among them).  Otherwise the
    vocabulary from tokenizer.json, and the rest as llama.cpp's convert_hf_to_gguf.py writes it, through
    gguf-py's SpecialVocab: special token ids and add_bos/add_eos from tokenizer_config.json and config.json,
    the chat template from tokenizer_config.json or chat_template.jinja (where transformers saves it).
    """
    carried_path = checkpoint / GGUF_METADATA_NAME
    if carried_path.is_file():
        for k, item in json.loads(carried_path.read_text()).items():
            if k.startswith("tokenizer."):
                add_typed(w, k, item)
        return
    tokens, types, pre = tokenizer_from_hf(checkpoint, cfg.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    has_merges = bool(json.loads((checkpoint / "tokenizer.json").read_text())["model"].get("merges"))
    gguf.SpecialVocab(checkpoint, load_merges=has_merges, n_vocab=cfg.vocab_size).add_to_gguf(w, quiet=True)
    if not has_merges:
        w.add_key_value(gguf.Keys.Tokenizer.MERGES, [], gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.STRING)


def add_general(w: gguf.GGUFWriter, checkpoint: Path, cfg: SlicedConfig, file_type: int, n_params: int) -> None:
    carried = {}
    if (checkpoint / GGUF_METADATA_NAME).is_file():
        carried = {k: v["value"] for k, v in json.loads((checkpoint / GGUF_METADATA_NAME).read_text()).items()}
    # the source's own name where known (a folder or hub id: llama.cpp keys some vocabulary fixes on it, e.g. Phi-3's
    # end-of-turn tokens), else the family
    basename = carried.get("general.basename", Path(cfg.source_model).name if cfg.source_model else cfg.model_type)
    w.add_name(f"{carried.get('general.name', basename)} (SliceGPT {cfg.sparsity:g})")
    w.add_basename(basename)
    w.add_size_label(gguf.size_label(n_params, 0, 0, 0))
    w.add_file_type(int(file_type))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)


#: block-quantized types: residual widths are zero-padded to their block (exporters/padding.py), exactly
BLOCK_TYPES = (Q.Q8_0, Q.Q4_0)
#: residual-path matrices: the shortcuts, and a tied model's embedding and head projections.  They act on the raw
#: residual and add their rounding error to it, once per matrix and for good, where a block's weights act on a
#: normed signal and only add a branch; llama.cpp rounds the activations of q8_0 products to 8 bits as well
RESIDUAL_PATH = ("shortcut", "token_embd_proj", "output_proj")
#: q4_0 files keep these tensors at a higher precision unless --gguf-shortcut-type names one (see the spec and
#: residual_path_type; SmolLM2 at 0.25 in the PCA basis: q4_0 shortcuts take perplexity from 50.8 to 1698), and a
#: 4-bit head is the usual weak spot of q4 files.
PROTECTED = {Q.Q4_0: {**dict.fromkeys(RESIDUAL_PATH, Q.F16), "output.weight": Q.Q8_0}}


def stored_type(name: str, qtype: Q, residual_qtype: Q | None = None) -> Q:
    """The type a tensor is stored in: the file's, the spec's protected type, or the residual path's explicit type."""
    if residual_qtype is not None and any(fragment in name for fragment in RESIDUAL_PATH):
        return residual_qtype
    for fragment, protected in PROTECTED.get(qtype, {}).items():
        if fragment in name:
            return protected
    return qtype


#: the residual signals' basis in a block-quantized file (export_gguf)
BASES = ("auto", *padding.BASES)


def residual_path_type(shortcut_type: str, qtype: Q) -> Q | None:
    """The residual path's type: `shortcut_type` when named; "auto" is q8_0 in a q8_0 file and None elsewhere (the
    PROTECTED rule: f16 in q4_0 files, the file's type in others).

    Quantized, a shortcut rounds the residual it carries to 8 bits (weights and, in llama.cpp, activations), once
    per shortcut and for good.  In the PCA basis that cost SmolLM2 +5.9% of llama.cpp perplexity at the paper's
    --sparsity 0.25 (two shortcuts per block), in the incoherent basis +1.1%; in the aligned basis, each shortcut
    stored as the correction S - J, from -0.25% to +0.35% over four draws of the rotation's signs (--target-params
    0.75: +0.19% to +0.43%), against +0.29% (+0.82%) for an f16 residual path in the PCA basis
    (bench/results/residual_path*.md).  So a q8_0 file is all q8_0 by default, and decodes faster for it.
    """
    if shortcut_type != "auto":
        return GGUF_TYPES[shortcut_type][0]
    return Q.Q8_0 if qtype == Q.Q8_0 else None


def file_basis(qtype: Q, residual_qtype: Q | None, basis: str, *, rotated: bool = True) -> str:
    """The basis of a file's residual signals (exporters/padding.py): `basis` when named; "auto" is "aligned" for a q8_0
    file whose residual path is block-quantized too, which its 8-bit rounding needs, else "pca" (see export_gguf).
    An unrotated checkpoint (rotation none: the source's own basis) keeps its basis: its residual path is the identity
    and the final norm's diagonal, and its weights round as well as the source's own (SmolLM2 at --target-params 0.75,
    q8_0: +0.26% perplexity in its own basis, +0.77% in the aligned one; bench/results/residual_path.md)."""
    if basis != "auto":
        return basis
    return "aligned" if rotated and qtype == Q.Q8_0 and residual_qtype in BLOCK_TYPES else "pca"


def stores_shortcut_delta(basis: str) -> bool:
    """Aligned shortcuts are J plus a small correction: the file stores S - J (spec version 4)."""
    return basis == "aligned"


def planned_type(name: str, shape: tuple[int, ...], qtype: Q, residual_qtype: Q | None = None) -> Q:
    """The type a tensor of `shape` is stored in: 1-D tensors stay f32; rows not a multiple of the block fall back to f16."""
    qtype = stored_type(name, qtype, residual_qtype)
    if len(shape) == 1 or qtype == Q.F32:
        return Q.F32
    block, _ = gguf.GGML_QUANT_SIZES[qtype]
    if shape[-1] % block:
        logger.info("%s: row length %d is not a multiple of %d, stored as f16 (slice with --round-to 32 to avoid)", name, shape[-1], block)
        return Q.F16
    return qtype


def tensor_data(
    name: str, tensor: torch.Tensor, qtype: Q, residual_qtype: Q | None = None, rounding: str = "least-squares"
) -> tuple[np.ndarray, Q]:
    """The array to store and its type (planned_type); block types rounded as `rounding` says (exporters/quantize.py)."""
    array = tensor.detach().float().cpu().numpy()
    stored = planned_type(name, array.shape, qtype, residual_qtype)
    if stored == Q.F32:
        return array.astype(np.float32), Q.F32
    if stored == Q.F16:
        return array.astype(np.float16), Q.F16
    return quantize.quantize(array, stored, rounding), stored


@dataclasses.dataclass(frozen=True)
class PlannedTensor:
    """A tensor of the file before its data is made: GGUF name, checkpoint name (None: made here), shape, type."""

    name: str
    source: str | None
    shape: tuple[int, ...]  # as written: linear layout (d_out, d_in)
    qtype: Q

    def info(self) -> tuple[tuple[int, ...], type, int]:
        """(shape, numpy dtype, bytes) as gguf-py's add_tensor_info takes them (block types: the byte shape, uint8)."""
        if self.qtype in (Q.F32, Q.F16):
            dtype = np.float32 if self.qtype == Q.F32 else np.float16
            return self.shape, dtype, math.prod(self.shape) * np.dtype(dtype).itemsize
        byte_shape = tuple(gguf.quant_shape_to_byte_shape(self.shape, self.qtype))
        return byte_shape, np.uint8, math.prod(byte_shape)


def plan_tensors(tensors: Mapping[str, torch.Tensor], shape_of: Callable[[str], tuple[int, ...]], extra: dict[str, torch.Tensor],
                 qtype: Q, residual_qtype: Q | None) -> list[PlannedTensor]:  # fmt: skip
    """Every tensor of the file, from shapes alone: right-multiplied matrices transposed to the linear layout."""
    planned = []
    for name in tensors:
        shape = tuple(shape_of(name))
        if spec.is_right_multiplied(name):
            shape = shape[::-1]
        gguf_name = spec.gguf_name(name)
        planned.append(PlannedTensor(gguf_name, name, shape, planned_type(gguf_name, shape, qtype, residual_qtype)))
    for name, t in extra.items():
        shape = tuple(t.shape)
        planned.append(PlannedTensor(name, None, shape, planned_type(name, shape, qtype, residual_qtype)))
    return planned


def rope_tensors(cfg: SlicedConfig) -> dict[str, torch.Tensor]:
    """The per-frequency divisors llama.cpp reads: `rope_freqs` (Llama 3), `rope_factors_long/short` (LongRoPE)."""
    if cfg.rope is None:
        return {}
    kind = rope_scaling_kind(cfg.rope)
    if kind == "llama3":
        return {spec.ROPE_FREQS: rope_frequency_divisors(cfg.rope)}
    if kind == "longrope":
        factors = lambda which: torch.tensor(cfg.rope.scaling[f"{which}_factor"], dtype=torch.float32)  # noqa: E731
        return {spec.ROPE_FACTORS_LONG: factors("long"), spec.ROPE_FACTORS_SHORT: factors("short")}
    return {}


def export_gguf(
    *,
    checkpoint: Path,
    out: Path,
    gguf_type: str = "f16",
    shortcut_type: str = "auto",
    basis: str = "auto",
    rounding: str = "least-squares",
    overwrite: bool = False,
) -> Path:
    """Write `out`/model-<type>.gguf from a sliced checkpoint folder; returns the file's path.

    `shortcut_type` is the type of the residual path (shortcuts, a tied model's projections): "auto" (see
    residual_path_type) or a GGUF type name.  `basis` of the residual signals (exporters/padding.py): "auto" as
    file_basis says, "pca" (the checkpoint's own), "incoherent" or "aligned" (shortcuts then stored as S - J, spec
    version 4; in any file type, which tests the readers exactly).  The incoherent basis is no safe default with an
    f16 residual path: SmolLM2 at 0.25 measured +0.26% against the PCA basis' +0.29% on one slicing, but +0.63%
    (47.234 against 46.936) on a fresh slicing of the same model; q4_0 lost more in it (87.2 against 76.8 on 16
    windows).  bench/residual_path.py measures each combination in q8_0.  `rounding` of q8_0/q4_0 blocks:
    "least-squares" (exporters/quantize.py) or "nearest", ggml's reference rounding as llama-quantize does it.
    """
    if basis not in BASES:
        raise SliceGPTError(f"unknown basis {basis!r} (choose from {', '.join(BASES)})")
    if rounding not in quantize.ROUNDINGS:
        raise SliceGPTError(f"unknown rounding {rounding!r} (choose from {', '.join(quantize.ROUNDINGS)})")
    for kind in (gguf_type, *(() if shortcut_type == "auto" else (shortcut_type,))):
        if kind not in GGUF_TYPES:
            raise SliceGPTError(f"unknown GGUF type {kind!r} (choose from {', '.join(GGUF_TYPES)})")
    qtype, file_type = GGUF_TYPES[gguf_type]
    checkpoint = Path(checkpoint)
    cfg, _ = read_config(checkpoint)
    tensors = lazy_tensors(checkpoint)  # read one at a time below
    n_params = parameter_count(tensors.meta())
    residual_qtype = residual_path_type(shortcut_type, qtype)
    padded: Mapping[str, torch.Tensor] = tensors
    shape_of = tensors.shape
    chosen = file_basis(qtype, residual_qtype, basis, rotated=cfg.rotated)
    delta = stores_shortcut_delta(chosen)
    if qtype in BLOCK_TYPES or chosen != "pca":  # widths padded to the quantization block (other files: unpadded)
        multiple = gguf.GGML_QUANT_SIZES[qtype][0] if qtype in BLOCK_TYPES else 1
        cfg, padded = pad_residual_widths(cfg, tensors, multiple, basis=chosen)
        shape_of = padded.shape
    extra = rope_tensors(cfg)
    planned = plan_tensors(padded, shape_of, extra, qtype, residual_qtype)

    def tensor_of(p: PlannedTensor) -> torch.Tensor:
        if delta and p.source is not None and is_shortcut(p.source):
            assert isinstance(padded, ResidualTensors)
            t = padded.shortcut_delta(p.source)  # (d_in', d_out'): S' - P_in J
        else:
            t = extra[p.name] if p.source is None else padded[p.source]
        return t.T if p.source is not None and spec.is_right_multiplied(p.source) else t

    with atomic_directory(Path(out), overwrite=overwrite) as tmp:
        write_gguf_file(tmp / gguf_file_name(gguf_type), arch=spec.ARCH, checkpoint=checkpoint, cfg=cfg, file_type=file_type,
                        n_params=n_params, add_keys=lambda w: add_hyperparameters(w, cfg, shortcut_delta=delta), planned=planned,
                        tensor_of=tensor_of, qtype=qtype, residual_qtype=residual_qtype, rounding=rounding)  # fmt: skip
    return Path(out) / gguf_file_name(gguf_type)


def write_gguf_file(
    path: Path, *, arch: str, checkpoint: Path, cfg: SlicedConfig, file_type: int, n_params: int,
    add_keys: Callable[[gguf.GGUFWriter], None], planned: list[PlannedTensor], tensor_of: Callable[[PlannedTensor], torch.Tensor],
    qtype: Q, residual_qtype: Q | None, rounding: str,
) -> None:  # fmt: skip
    """One GGUF file of `arch`: general keys, the architecture's keys (`add_keys`), the tokenizer, then every planned
    tensor; tensor infos first, from shapes, and the data one tensor at a time (`tensor_of`), no temporary copy."""
    w = SliceGPTWriter(str(path), arch)
    add_general(w, checkpoint, cfg, file_type, n_params)
    add_keys(w)
    add_tokenizer(w, checkpoint, cfg)
    for p in planned:
        shape, dtype, nbytes = p.info()
        w.add_tensor_info(p.name, shape, dtype, nbytes, raw_dtype=p.qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for p in tqdm(planned, desc="writing tensors", unit="tensor", leave=False):
        data, stored = tensor_data(p.name, tensor_of(p), qtype, residual_qtype, rounding)
        if stored != p.qtype or data.nbytes != p.info()[2]:
            raise SliceGPTError(f"{p.name}: planned as {p.qtype.name}, made as {stored.name} ({data.nbytes} bytes)")
        w.write_tensor_data(data)
    w.close()
