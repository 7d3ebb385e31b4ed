"""GGUF in llama.cpp's own architecture, for a checkpoint that left the source's basis and widths alone.

A checkpoint sliced with rotation none (`--target-params` spends its budget on MLP neurons alone: SmolLM2's default)
has no shortcut, an identity embedding projection and a diagonal head projection (the final norm's scale), every
residual width D and, with a uniform allocation, one MLP width for every block.  That is the source family's own
architecture with narrower MLPs: written as such (`--gguf-arch stock`), the file runs in any llama.cpp, unpatched,
and in the programs built on it, and its graph is llama.cpp's own (no projection products around the stack).

The norms' scales stay folded into the linears, so every stored norm weight is ones except the final norm's, which
is the tied head's diagonal projection.  In a `llama` file q and k rows are interleaved as llama.cpp's
convert_hf_to_gguf.py does for that architecture, whose rotary pairs adjacent channels (`qwen2` pairs the halves).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from pathlib import Path

import gguf
import numpy as np
import torch

from slicegpt_export import gguf_spec as spec
from slicegpt_export.atomic import atomic_directory
from slicegpt_export.checkpoint import SlicedConfig, is_shortcut, lazy_tensors, read_config
from slicegpt_export.errors import SliceGPTError
from slicegpt_export.exporters.gguf import BLOCK_TYPES, GGUF_TYPES, PlannedTensor, gguf_file_name, planned_type, write_gguf_file
from slicegpt_export.exporters.padding import pad_dims, padded
from slicegpt_export.modeling import rope_scaling_kind

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class StockArchitecture:
    """A family's llama.cpp architecture: its name, whether its rotary pairs adjacent channels (q and k rows then
    interleaved), and the checkpoint's bias flags it holds (`cfg.bias` keys)."""

    arch: str
    interleave_qk: bool
    biases: tuple[str, ...] = ()


#: per-family hook: the llama.cpp architecture an unrotated checkpoint of that family is written in (convert_hf_to_gguf.py
#: writes Mistral as `llama` too; a sliding window, which `llama` lacks, is refused in stock_blockers)
STOCK_ARCHITECTURES = {
    "llama": StockArchitecture("llama", interleave_qk=True),
    "mistral": StockArchitecture("llama", interleave_qk=True),
    "qwen2": StockArchitecture("qwen2", interleave_qk=False, biases=("qkv",)),  # rotary on half-split channels (NEOX)
}
#: the bias tensors a `qkv` bias flag stands for, per block
QKV_BIASES = ("q_proj", "k_proj", "v_proj")
#: the checkpoint's linears of a block, each written under llama.cpp's own name (gguf_spec.gguf_name)
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
#: rope scalings written: unscaled only (llama.cpp reads Llama 3's as a rope_freqs tensor, exactly, but transformers' GGUF
#: reader, which validates a stock file, does not)
STOCK_ROPE_SCALINGS = ("default",)


def stock_blockers(cfg: SlicedConfig, names: list[str], tensor: Callable[[str], torch.Tensor]) -> list[str]:
    """Why the checkpoint cannot be written in its family's stock llama.cpp architecture (empty: it can)."""
    D = cfg.hidden_size
    if cfg.model_type not in STOCK_ARCHITECTURES:
        return [f"llama.cpp's own architecture is written for {', '.join(STOCK_ARCHITECTURES)} only (this is {cfg.model_type})"]
    reasons = []
    if cfg.rotated:
        reasons.append(f"the weights are rotated (rotation {cfg.slicing.get('rotation', 'pca')})")
    widths = {cfg.embedding_width, cfg.head_in, *(getattr(w, f) for w in cfg.layers for f in ("attn_in", "attn_out", "mlp_in", "mlp_out"))}
    if widths != {D}:
        reasons.append(f"residual widths {sorted(widths)} differ from the model's {D}")
    if len({w.intermediate or cfg.intermediate_size for w in cfg.layers}) > 1:
        reasons.append("the MLP width differs from block to block (llama.cpp's llama reads one)")
    if any(is_shortcut(n) for n in names):
        reasons.append("the residual path stores shortcut matrices")
    stock = STOCK_ARCHITECTURES[cfg.model_type]
    layer_linears = {f"layers.{i}.{proj}.weight" for i in range(cfg.num_layers) for proj in LINEARS}
    if cfg.bias["qkv"] and "qkv" in stock.biases:
        layer_linears |= {f"layers.{i}.{proj}.bias" for i in range(cfg.num_layers) for proj in QKV_BIASES}
    unplaced = sorted(set(names) - layer_linears - {"embed_tokens.weight", "embed_proj", "lm_head.proj", "lm_head.weight"})
    if unplaced and not any(is_shortcut(n) for n in unplaced):
        reasons.append(f"it stores tensors the stock architecture has no place for ({', '.join(unplaced[:3])})")
    if "embed_proj" in names and not torch.equal(tensor("embed_proj"), torch.eye(D)):
        reasons.append("the embedding projection is not the identity")
    if "lm_head.proj" in names:
        proj = tensor("lm_head.proj")
        if proj.shape != (D, D) or not torch.equal(proj, torch.diag(torch.diagonal(proj))):
            reasons.append("the head projection is not diagonal")
    traits = {"a sliding window": cfg.sliding_window is not None, "q/k norms": cfg.qk_norm, "post-norms": cfg.post_norms,
              "soft-capping": cfg.attn_logit_softcap is not None or cfg.final_logit_softcap is not None,
              "a custom attention scale": cfg.attention_scale is not None, "blocks without rope": cfg.rope_layers is not None,
              "biases the architecture lacks": any(on and flag not in stock.biases for flag, on in cfg.bias.items()), "parallel blocks": cfg.block_kind != "sequential",
              "an MLP other than SiLU-gated": not cfg.gated_mlp or cfg.activation != "silu"}  # fmt: skip
    reasons += [f"the model has {trait}" for trait, present in traits.items() if present]
    if cfg.rope is None:
        reasons.append("the model has no rotary position embedding")
    elif cfg.rope.dim != cfg.head_dim or rope_scaling_kind(cfg.rope) not in STOCK_ROPE_SCALINGS:
        reasons.append(f"rope over {cfg.rope.dim} of {cfg.head_dim} channels, scaling {rope_scaling_kind(cfg.rope)}")
    return reasons


def fits_stock_architecture(checkpoint: Path) -> bool:
    """Whether the checkpoint can be written in its family's own llama.cpp architecture (stock_blockers finds nothing)."""
    cfg, _ = read_config(Path(checkpoint))
    tensors = lazy_tensors(Path(checkpoint))
    return not stock_blockers(cfg, list(tensors.meta()), tensors.__getitem__)


def interleave_rotary_rows(w: torch.Tensor, heads: int) -> torch.Tensor:
    """(heads * hd, ...) rows of q or k from Hugging Face's half-split rotary layout to llama.cpp's adjacent pairs."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def stock_tensor_sources(cfg: SlicedConfig, names: list[str], tensor: Callable[[str], torch.Tensor], stock: StockArchitecture,
                         n_ff: int) -> dict[str, Callable[[], torch.Tensor]]:  # fmt: skip
    """GGUF name -> a function making that tensor in the linear layout (d_out, d_in), read from the checkpoint when called.

    `n_ff`: the MLP width as stored, the checkpoint's padded with zero neurons (exact: silu(0) * 0 = 0).
    """
    ones = lambda: torch.ones(cfg.hidden_size)
    sources: dict[str, Callable[[], torch.Tensor]] = {"token_embd.weight": lambda: tensor("embed_tokens.weight")}  # (V, D)
    if cfg.tied_embeddings:
        sources["output_norm.weight"] = (lambda: torch.diagonal(tensor("lm_head.proj")).clone()) if "lm_head.proj" in names else ones
    else:
        sources["output_norm.weight"], sources["output.weight"] = ones, lambda: tensor("lm_head.weight")
    rows = {"q_proj": cfg.num_heads, "k_proj": cfg.num_kv_heads}
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        sources[f"blk.{i}.attn_norm.weight"] = sources[f"blk.{i}.ffn_norm.weight"] = ones
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            heads = rows.get(proj) if stock.interleave_qk else None
            kinds = ("weight", "bias") if proj in QKV_BIASES and cfg.bias["qkv"] else ("weight",)
            for name in (f"{p}{proj}.{kind}" for kind in kinds):  # a bias's rows move with its weight's
                sources[spec.gguf_name(name)] = (
                    lambda name=name, heads=heads: interleave_rotary_rows(tensor(name), heads) if heads else tensor(name))
        for proj in ("gate_proj", "up_proj"):  # (F, D) -> (n_ff, D)
            sources[spec.gguf_name(p + proj + ".weight")] = lambda name=p + proj + ".weight": pad_dims(tensor(name), rows=n_ff)
        sources[spec.gguf_name(p + "down_proj.weight")] = lambda name=p + "down_proj.weight": pad_dims(tensor(name), cols=n_ff)  # (D, n_ff)
    return sources


def add_stock_hyperparameters(w: gguf.GGUFWriter, cfg: SlicedConfig, n_ff: int) -> None:
    """The `<arch>.*` keys llama.cpp's loader reads, as convert_hf_to_gguf.py writes them for the family."""
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_layers)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(cfg.num_heads)
    w.add_head_count_kv(cfg.num_kv_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    assert cfg.rope is not None  # stock_blockers
    w.add_rope_freq_base(cfg.rope.theta)
    w.add_rope_dimension_count(cfg.rope.dim)


def export_stock_gguf(*, checkpoint: Path, out: Path, gguf_type: str = "f16", rounding: str = "least-squares", overwrite: bool = False) -> Path:
    """Write `out`/model-<type>.gguf in the family's own llama.cpp architecture; refuse a checkpoint it cannot hold.

    Stored parameters are the checkpoint's less its identity embedding projection (the head's diagonal becomes the
    final norm's weight), plus a norm weight of ones per block.  Block-quantized files pad the MLP width to the block.
    """
    if gguf_type not in GGUF_TYPES:
        raise SliceGPTError(f"unknown GGUF type {gguf_type!r} (choose from {', '.join(GGUF_TYPES)})")
    qtype, file_type = GGUF_TYPES[gguf_type]
    checkpoint = Path(checkpoint)
    cfg, _ = read_config(checkpoint)
    tensors = lazy_tensors(checkpoint)
    names = list(tensors.meta())
    reasons = stock_blockers(cfg, names, tensors.__getitem__)
    if reasons:
        raise SliceGPTError(f"{checkpoint} cannot be written in llama.cpp's own architecture: {'; '.join(reasons)} (use --gguf-arch slicegpt)")
    stock = STOCK_ARCHITECTURES[cfg.model_type]
    width = cfg.layers[0].intermediate or cfg.intermediate_size
    n_ff = padded(width, gguf.GGML_QUANT_SIZES[qtype][0]) if qtype in BLOCK_TYPES else width
    sources = stock_tensor_sources(cfg, names, tensors.__getitem__, stock, n_ff)
    shapes = stock_shapes(cfg, n_ff, list(sources))
    planned = [PlannedTensor(name, name, shapes[name], planned_type(name, shapes[name], qtype)) for name in sources]
    n_params = sum(int(np.prod(p.shape)) for p in planned) - cfg.num_layers * (n_ff - width) * 3 * cfg.hidden_size
    with atomic_directory(Path(out), overwrite=overwrite) as tmp:
        write_gguf_file(tmp / gguf_file_name(gguf_type), arch=stock.arch, checkpoint=checkpoint, cfg=cfg, file_type=file_type,
                        n_params=n_params, add_keys=lambda w: add_stock_hyperparameters(w, cfg, n_ff), planned=planned,
                        tensor_of=lambda p: sources[p.name](), qtype=qtype, residual_qtype=None, rounding=rounding)  # fmt: skip
    logger.info("wrote %s in llama.cpp's %s architecture (MLP width %d%s)", out, stock.arch, n_ff,
                f", {width} padded with zero neurons" if n_ff != width else "")  # fmt: skip
    return Path(out) / gguf_file_name(gguf_type)


def stock_shapes(cfg: SlicedConfig, n_ff: int, names: list[str]) -> Mapping[str, tuple[int, ...]]:
    """Each stock tensor's shape in the linear layout (d_out, d_in), from the config alone."""
    D, hd = cfg.hidden_size, cfg.head_dim
    per_layer = {"attn_norm.weight": (D,), "ffn_norm.weight": (D,), "attn_q.weight": (cfg.num_heads * hd, D),
                 "attn_k.weight": (cfg.num_kv_heads * hd, D), "attn_v.weight": (cfg.num_kv_heads * hd, D),
                 "attn_output.weight": (D, cfg.num_heads * hd), "ffn_gate.weight": (n_ff, D), "ffn_up.weight": (n_ff, D),
                 "ffn_down.weight": (D, n_ff)}  # fmt: skip
    per_layer.update({"attn_q.bias": (cfg.num_heads * hd,), "attn_k.bias": (cfg.num_kv_heads * hd,), "attn_v.bias": (cfg.num_kv_heads * hd,)})
    fixed = {"token_embd.weight": (cfg.vocab_size, D), "output.weight": (cfg.vocab_size, D), "output_norm.weight": (D,)}
    return {n: fixed[n] if n in fixed else per_layer[n.split(".", 2)[2]] for n in names}
