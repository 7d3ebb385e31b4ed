"""ONNX exporter: a sliced checkpoint as one decoder graph with a KV cache, for ONNX Runtime and onnxruntime-genai.

The graph is built node by node from the checkpoint's config (no tracing).  Interface, as
Optimum and onnxruntime-genai name it:

* inputs ``input_ids`` (B, T) int64, ``attention_mask`` (B, P + T) int64, ``position_ids``
  (B, T) int64, ``past_key_values.N.key`` / ``.value`` (B, K, P, hd);
* outputs ``logits`` (B, T, vocab), ``present.N.key`` / ``.value`` (B, K, P + T, hd).

Every norm is SliceGPT's RMSNorm over the original width D written as ONNX's fused
``RMSNormalization`` over the sliced width d:  x / sqrt(|x|^2 / D + eps)
= sqrt(D/d) * x / sqrt(mean_d(x^2) + eps * D/d).  Residual projections are MatMul nodes
named ``layers.N.attn_shortcut`` / ``layers.N.mlp_shortcut``; a post-norm model's (Gemma) branch
outputs pass a weightless RMSNorm over D and a MatMul ``layers.N.attn_post_proj`` /
``layers.N.mlp_post_proj``.  Linear weights are stored
transposed (in x out), the MatMul layout.  Operators come from the default domain, opset 23
(Attention with grouped KV heads and a past, RotaryEmbedding, RMSNormalization).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from slicegpt_export.atomic import atomic_directory
from slicegpt_export.checkpoint import CONFIG_NAME, SlicedConfig, lazy_tensors, read_config
from slicegpt_export.errors import SliceGPTError
from slicegpt_export.exporters.padding import pad_residual_widths
from slicegpt_export.modeling import (
    layer_is_sliding,
    longrope_original_context,
    rope_attention_factor,
    rope_inverse_frequencies,
    tied_width,
)
from slicegpt_export.onnx_spec import (
    ATTENTION_MASK,
    EXTERNAL_DATA_FILE,
    INPUT_IDS,
    LOGITS,
    MODEL_FILE,
    POSITION_IDS,
    past_name,
    present_name,
)  # fmt: skip

logger = logging.getLogger(__name__)

OPSET = 23
IR_VERSION = 10
EXTERNAL_DATA_THRESHOLD = 1 << 30  # bytes of initializers above which weights go to an external file
PRECISIONS = {"fp32": (TensorProto.FLOAT, np.float32), "fp16": (TensorProto.FLOAT16, np.float16)}
QUANTIZATIONS = {"int8": 8, "int4": 4}
QUANT_BLOCK_SIZE = 32
#: MatMul nodes on the residual path, kept fp32 by quantization
RESIDUAL_PATH_NODES = ("_shortcut", "embed_proj", "lm_head/proj")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "generation_config.json")  # fmt: skip

#: initializers up to this many bytes stay inside model.onnx when the weights stream to EXTERNAL_DATA_FILE
INLINE_BYTES = 1024
#: alignment of each weight in EXTERNAL_DATA_FILE (what onnx's own external-data writer uses for large tensors)
EXTERNAL_ALIGNMENT = 4096


def external_tensor(name: str, array: np.ndarray, data: BinaryIO) -> onnx.TensorProto:
    """A TensorProto whose bytes are appended to `data` (aligned) now and referenced by offset, never held in the graph."""
    offset = data.tell()
    offset += -offset % EXTERNAL_ALIGNMENT
    data.seek(offset)
    data.write(memoryview(array.reshape(-1).view(np.uint8)))
    tensor = onnx.TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(array.dtype), dims=list(array.shape))
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", EXTERNAL_DATA_FILE), ("offset", offset), ("length", array.nbytes)):
        tensor.external_data.add(key=key, value=str(value))
    return tensor


class GraphBuilder:
    """Accumulates nodes, initializers and value_info; hands out unique intermediate names."""

    def __init__(self, elem_type: int, np_dtype: type, external: BinaryIO | None = None) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.value_info: list[onnx.ValueInfoProto] = []
        self.elem_type, self.np_dtype = elem_type, np_dtype
        self.external = external  # weights over INLINE_BYTES are appended here as they are made (EXTERNAL_DATA_FILE)
        self.counter = 0

    def op(self, op_type: str, inputs: list[str], *, name: str | None = None, outputs: int | list[str] = 1, **attrs: Any) -> Any:
        """Add a node; returns its output name (or names when several)."""
        self.counter += 1
        node_name = name or f"/{op_type}_{self.counter}"
        outs = outputs if isinstance(outputs, list) else [f"{node_name}/output_{k}" for k in range(outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=node_name, **attrs))
        return outs[0] if len(outs) == 1 else outs

    def weight(self, name: str, array: np.ndarray | torch.Tensor, *, dtype: Any = None) -> str:
        if isinstance(array, torch.Tensor):
            array = array.detach().to(torch.float64 if array.is_floating_point() else array.dtype).cpu().numpy()
        array = np.ascontiguousarray(array.astype(dtype or self.np_dtype))
        if self.external is not None and array.nbytes > INLINE_BYTES:
            self.initializers.append(external_tensor(name, array, self.external))
        else:
            self.initializers.append(numpy_helper.from_array(array, name))
        return name

    def const_i64(self, name: str, values: list[int]) -> str:
        return self.weight(name, np.array(values, dtype=np.int64), dtype=np.int64)

    def annotate(self, value: str, shape: list[Any]) -> None:
        self.value_info.append(helper.make_tensor_value_info(value, self.elem_type, shape))


#: graph targets: ai.onnx ops (opset-23 Attention with a mask) for the CPU, or what ONNX Runtime's CUDA provider runs
#: with grouped KV heads (com.microsoft GroupQueryAttention, SkipSimplifiedLayerNormalization), as onnxruntime-genai's builder emits
TARGETS = ("cpu", "cuda")


def check_target(cfg: SlicedConfig, target: str) -> None:
    """Refuse a target whose kernels cannot run this model (ONNX Runtime's GroupQueryAttention checks these at run time)."""
    if target not in TARGETS:
        raise SliceGPTError(f"unknown execution provider {target!r} (choose from {', '.join(TARGETS)})")
    if target != "cuda":
        return
    if cfg.head_dim % 16:
        raise SliceGPTError(f"the CUDA graph's GroupQueryAttention needs a head size that is a multiple of 16 (this model's: {cfg.head_dim})")
    for rope in (cfg.rope, cfg.local_rope):
        if rope is not None and (rope.dim // 2) % 8:
            raise SliceGPTError(f"the CUDA graph's GroupQueryAttention rotates a multiple of 16 channels per head (this model rotates {rope.dim})")


class DecoderGraph:
    """Builds the decoder graph of one sliced checkpoint."""

    def __init__(
        self, cfg: SlicedConfig, tensors: Mapping[str, torch.Tensor], precision: str, external: BinaryIO | None = None, target: str = "cpu"
    ) -> None:
        if precision not in PRECISIONS:
            raise SliceGPTError(f"unknown precision {precision!r} (choose from {', '.join(PRECISIONS)})")
        check_target(cfg, target)
        self.cfg, self.tensors, self.target = cfg, tensors, target
        self.g = GraphBuilder(*PRECISIONS[precision], external=external)

    # ----- building blocks -----------------------------------------------------------
    def linear(self, x: str, name: str) -> str:
        """x @ W^T (+ b) with W stored transposed as `name`.weight (in, out)."""
        w = self.g.weight(f"{name}.weight", self.tensors[f"{name}.weight"].T)
        y = self.g.op("MatMul", [x, w], name=f"{name}/MatMul")
        if f"{name}.bias" in self.tensors:
            y = self.g.op("Add", [y, self.g.weight(f"{name}.bias", self.tensors[f"{name}.bias"])], name=f"{name}/Add")
        return y

    def norm(self, x: str, width: int, name: str) -> str:
        """SliceGPT's RMSNorm over D, as sqrt(D/d) * RMSNormalization_d(x) with epsilon * D/d.

        The CUDA target uses ONNX Runtime's SimplifiedLayerNormalization, the same function (the builder's op).
        """
        ratio = self.cfg.hidden_size / width
        scale = self.g.weight(f"{name}.scale", np.full(width, math.sqrt(ratio)))
        op = "SimplifiedLayerNormalization" if self.target == "cuda" else "RMSNormalization"
        return self.g.op(op, [x, scale], name=name, axis=-1, epsilon=self.cfg.norm_eps * ratio)

    def residual_and_norm(self, branch: str, skip: str, width: int, name: str, residual_name: str) -> tuple[str, str]:
        """(norm(branch + skip), branch + skip) for the next reader of the residual (width d).

        CUDA target: one com.microsoft SkipSimplifiedLayerNormalization (outputs 0 and 3), as the builder fuses them.
        """
        if self.target != "cuda":
            x = self.g.op("Add", [skip, branch], name=residual_name)
            return self.norm(x, width, name), x
        ratio = self.cfg.hidden_size / width
        scale = self.g.weight(f"{name}.scale", np.full(width, math.sqrt(ratio)))
        normed, x = f"{name}/output_0", residual_name
        self.g.op("SkipSimplifiedLayerNormalization", [branch, skip, scale], name=name, outputs=[normed, "", "", x],
                  domain="com.microsoft", epsilon=self.cfg.norm_eps * ratio)  # fmt: skip
        return normed, x

    def activation(self, x: str, name: str) -> str:
        kind = self.cfg.activation
        if kind == "silu":
            return self.g.op("Mul", [x, self.g.op("Sigmoid", [x], name=f"{name}/Sigmoid")], name=f"{name}/Mul")
        if kind in ("gelu", "gelu_tanh"):
            return self.g.op("Gelu", [x], name=f"{name}/Gelu", approximate="tanh" if kind == "gelu_tanh" else "none")
        if kind == "relu":
            return self.g.op("Relu", [x], name=f"{name}/Relu")
        raise SliceGPTError(f"activation {kind!r} has no ONNX lowering")

    def rope(self, x: str, heads: int, name: str, cache: str = "rope") -> str:
        return self.g.op(
            "RotaryEmbedding", [x, f"{cache}.cos_cache", f"{cache}.sin_cache", POSITION_IDS], name=name,
            num_heads=heads, rotary_embedding_dim=self.cfg.rope.dim, interleaved=0,
        )  # fmt: skip

    def packed_linear(self, x: str, names: list[str], packed: str) -> list[str]:
        """Linears reading the same input as one MatMul (weights concatenated along the output), then a Split.

        One product instead of several: at batch 1 a decode step is bound by per-node overhead.
        """
        weights = [self.tensors[f"{n}.weight"] for n in names]  # each (out_k, in)
        w = self.g.weight(f"{packed}.weight", torch.cat(weights).T)  # (in, sum out_k)
        y = self.g.op("MatMul", [x, w], name=f"{packed}/MatMul")
        if f"{names[0]}.bias" in self.tensors:
            bias = torch.cat([self.tensors[f"{n}.bias"] for n in names])
            y = self.g.op("Add", [y, self.g.weight(f"{packed}.bias", bias)], name=f"{packed}/Add")
        sizes = self.g.const_i64(f"{packed}.split", [t.shape[0] for t in weights])
        return self.g.op("Split", [y, sizes], name=f"{packed}/Split", outputs=len(names), axis=-1)

    def head_norm(self, x: str, heads: int, name: str) -> str:
        """The per-head RMSNorm of Qwen3 and Gemma 3 (weight `name`.weight over head_dim): (B, T, heads * hd) -> same shape."""
        hd = self.cfg.head_dim
        per_head = self.g.op("Reshape", [x, self.g.const_i64(f"{name}.heads", [0, 0, heads, hd])], name=f"{name}/Reshape")
        scale = self.g.weight(f"{name}.weight", self.tensors[f"{name}.weight"])
        op = "SimplifiedLayerNormalization" if self.target == "cuda" else "RMSNormalization"
        normed = self.g.op(op, [per_head, scale], name=name, axis=-1, epsilon=self.cfg.norm_eps)
        return self.g.op("Reshape", [normed, self.g.const_i64(f"{name}.flat", [0, 0, heads * hd])], name=f"{name}/Flatten")

    def attention(self, i: int, h: str, masks: dict[bool, str]) -> str:
        """Self-attention of block i on the normed input h; `masks`: the global layers' and the sliding layers' mask."""
        cfg, p = self.cfg, f"layers.{i}."
        sliding = layer_is_sliding(cfg, i)
        q, k, v = self.packed_linear(h, [p + proj for proj in ("q_proj", "k_proj", "v_proj")], p + "qkv_proj")  # (B, T, heads * hd)
        if cfg.qk_norm:
            q, k = self.head_norm(q, cfg.num_heads, p + "q_norm"), self.head_norm(k, cfg.num_kv_heads, p + "k_norm")
        rotary = cfg.rope is not None and (cfg.rope_layers is None or cfg.rope_layers[i])
        cache = "rope_local" if sliding and cfg.local_rope is not None else "rope"
        if self.target == "cuda":
            return self.post_norm(self.linear(self.group_query_attention(i, q, k, v, cache if rotary else None), p + "o_proj"), p + "attn_post_proj")
        if rotary:
            q, k = self.rope(q, cfg.num_heads, p + "q_rotary", cache), self.rope(k, cfg.num_kv_heads, p + "k_rotary", cache)
        attrs = {"softcap": cfg.attn_logit_softcap} if cfg.attn_logit_softcap is not None else {}
        y = self.g.op(
            "Attention", [q, k, v, masks[sliding], past_name(i, "key"), past_name(i, "value")], name=p + "attention",
            outputs=[p + "attention/output", present_name(i, "key"), present_name(i, "value")],
            q_num_heads=cfg.num_heads, kv_num_heads=cfg.num_kv_heads, scale=cfg.attention_scale or 1.0 / math.sqrt(cfg.head_dim),
            **attrs,
        )[0]  # fmt: skip
        return self.post_norm(self.linear(y, p + "o_proj"), p + "attn_post_proj")

    def group_query_attention(self, i: int, q: str, k: str, v: str, cache: str | None) -> str:
        """com.microsoft GroupQueryAttention (the CUDA target): grouped KV heads, rotary inside the op from `cache`'s
        cos/sin tables (None: no rotary), sliding window as local_window_size, padding as seqlens_k (right-padded or
        unpadded batches, as onnxruntime-genai feeds them)."""
        cfg, p = self.cfg, f"layers.{i}."
        seqlens, total = self.gqa_lengths()
        rope_inputs = [f"{cache}.cos_cache", f"{cache}.sin_cache"] if cache is not None else ["", ""]
        window = cfg.sliding_window if cfg.sliding_window is not None and layer_is_sliding(cfg, i) else -1
        return self.g.op(
            "GroupQueryAttention", [q, k, v, past_name(i, "key"), past_name(i, "value"), seqlens, total, *rope_inputs],
            name=p + "attention", outputs=[p + "attention/output", present_name(i, "key"), present_name(i, "value")], domain="com.microsoft",
            num_heads=cfg.num_heads, kv_num_heads=cfg.num_kv_heads, scale=cfg.attention_scale or 1.0 / math.sqrt(cfg.head_dim),
            local_window_size=window, softcap=cfg.attn_logit_softcap or 0.0, do_rotary=int(cache is not None), rotary_interleaved=0,
        )[0]  # fmt: skip

    def gqa_lengths(self) -> tuple[str, str]:
        """seqlens_k = sum(attention_mask) - 1 per row (int32) and total_sequence_length (int32 scalar), made once."""
        g = self.g
        if not getattr(self, "_gqa_lengths", None):
            total = g.op("ReduceSum", [ATTENTION_MASK, g.const_i64("/gqa/axis1", [1])], name="/gqa/keys", keepdims=0)  # (B,)
            seqlens = g.op("Cast", [g.op("Sub", [total, g.const_i64("/gqa/one", [1])], name="/gqa/last")], name="/gqa/seqlens_k",
                           to=TensorProto.INT32)  # fmt: skip
            width = g.op("Gather", [g.op("Shape", [ATTENTION_MASK], name="/gqa/mask_shape"), g.weight("/gqa/index1", np.array(1), dtype=np.int64)],
                         name="/gqa/total", axis=0)  # fmt: skip
            self._gqa_lengths = (seqlens, g.op("Cast", [width], name="/gqa/total_sequence_length", to=TensorProto.INT32))
        return self._gqa_lengths

    def post_norm(self, y: str, name: str) -> str:
        """A post-norm stage's branch output (B, T, D): weightless RMSNorm over D, then the (D, d_out) `name` (Gemma)."""
        if name not in self.tensors:
            return y
        normed = self.norm(y, self.cfg.hidden_size, f"{name}/norm")
        return self.g.op("MatMul", [normed, self.g.weight(name, self.tensors[name])], name=name)

    def mlp(self, i: int, h: str) -> str:
        p = f"layers.{i}."
        if self.cfg.gated_mlp:
            gate, up = self.packed_linear(h, [p + "gate_proj", p + "up_proj"], p + "gate_up_proj")
            hidden = self.g.op("Mul", [self.activation(gate, p + "act"), up], name=p + "gate_mul")
        else:
            hidden = self.activation(self.linear(h, p + "up_proj"), p + "act")
        return self.post_norm(self.linear(hidden, p + "down_proj"), p + "mlp_post_proj")

    def shortcut(self, x: str, i: int, kind: str) -> str:
        """x @ S for the (d_in, d_out) residual projection, a MatMul named layers.N.<kind>."""
        name = f"layers.{i}.{kind}"
        if name not in self.tensors:
            return x
        return self.g.op("MatMul", [x, self.g.weight(name, self.tensors[name])], name=name)

    def attention_masks(self) -> dict[bool, str]:
        """The mask of global layers (False) and of sliding-window layers (True): one mask unless the model mixes them."""
        cfg = self.cfg
        if cfg.sliding_window is None or cfg.sliding_layers is None:
            mask = self.attention_mask_bias(cfg.sliding_window)
            return {False: mask, True: mask}
        return {False: self.attention_mask_bias(None), True: self.attention_mask_bias(cfg.sliding_window, "/mask_local")}

    def attention_mask_bias(self, window: int | None, prefix: str = "/mask") -> str:
        """(B, 1, T, P + T) bool: causal, real keys only, within the sliding window; an empty row may see itself."""
        g = self.g
        n = lambda name: prefix + name[len("/mask"):]  # noqa: E731  (node names under this mask's prefix)
        past_len = g.op("Shape", [past_name(0, "key")], name=n("/mask/past_len"), start=2, end=3)  # (1,)
        new_len = g.op("Shape", [INPUT_IDS], name=n("/mask/new_len"), start=1, end=2)
        total = g.op("Add", [past_len, new_len], name=n("/mask/total"))
        zero, one = g.const_i64(n("/mask/zero"), [0]), g.const_i64(n("/mask/one"), [1])
        sq = lambda v, n: g.op("Squeeze", [v], name=n)
        q_pos = g.op("Range", [sq(past_len, n("/mask/p0")), sq(total, n("/mask/s0")), sq(one, n("/mask/o0"))], name=n("/mask/q_range"))
        k_pos = g.op("Range", [sq(zero, n("/mask/z1")), sq(total, n("/mask/s1")), sq(one, n("/mask/o1"))], name=n("/mask/k_range"))
        q_col = g.op("Unsqueeze", [q_pos, g.const_i64(n("/mask/axis1"), [1])], name=n("/mask/q_col"))  # (T, 1)
        k_row = g.op("Unsqueeze", [k_pos, g.const_i64(n("/mask/axis0"), [0])], name=n("/mask/k_row"))  # (1, S)
        allowed = g.op("LessOrEqual", [k_row, q_col], name=n("/mask/causal"))  # (T, S)
        if window is not None:
            dist = g.op("Sub", [q_col, k_row], name=n("/mask/dist"))
            inside = g.op("Less", [dist, g.const_i64(n("/mask/window"), [window])], name=n("/mask/in_window"))
            allowed = g.op("And", [allowed, inside], name=n("/mask/windowed"))
        keep = g.op("Cast", [ATTENTION_MASK], name=n("/mask/keep"), to=TensorProto.BOOL)  # (B, S)
        keep = g.op("Unsqueeze", [keep, g.const_i64(n("/mask/axes12"), [1, 2])], name=n("/mask/keep4"))  # (B, 1, 1, S)
        mask = g.op("And", [allowed, keep], name=n("/mask/and"))  # (B, 1, T, S)
        any_key = g.op(
            "ReduceMax", [g.op("Cast", [mask], name=n("/mask/as_int"), to=TensorProto.INT32), g.const_i64(n("/mask/last"), [-1])],
            name=n("/mask/any"), keepdims=1,
        )  # fmt: skip
        empty = g.op("Not", [g.op("Cast", [any_key], name=n("/mask/any_bool"), to=TensorProto.BOOL)], name=n("/mask/empty"))
        diagonal = g.op("Equal", [k_row, q_col], name=n("/mask/diagonal"))
        return g.op("Or", [mask, g.op("And", [diagonal, empty], name=n("/mask/self"))], name=n("/mask/final"))

    # ----- the whole graph -----------------------------------------------------------
    def build(self) -> onnx.ModelProto:
        cfg, g = self.cfg, self.g
        x = g.op("Gather", [g.weight("embed_tokens.weight", self.tensors["embed_tokens.weight"]), INPUT_IDS], name="embed_tokens")
        if "embed_proj" in self.tensors:  # tied: (B, T, e) -> (B, T, d_emb)
            x = g.op("MatMul", [x, g.weight("embed_proj", self.tensors["embed_proj"])], name="embed_proj")
        if cfg.position_embedding == "learned":
            rows = g.op("Add", [POSITION_IDS, g.const_i64("embed_positions.offset", [cfg.position_offset])], name="/positions/offset")
            pos = g.op("Gather", [g.weight("embed_positions.weight", self.tensors["embed_positions.weight"]), rows], name="embed_positions")
            x = g.op("Add", [x, pos], name="/embeddings/add")
        if cfg.rope is not None:
            self.rope_caches()
        if self.target == "cuda":
            h = self.cuda_blocks(x)
        else:
            h = self.cpu_blocks(x)
        logits = self.tied_head(h) if cfg.tied_embeddings else self.linear(h, "lm_head")  # (B, T, vocab)
        if cfg.final_logit_softcap is not None:  # Gemma 2: cap * tanh(logits / cap)
            cap = g.weight("final_softcap", np.array(cfg.final_logit_softcap))
            logits = g.op("Mul", [g.op("Tanh", [g.op("Div", [logits, cap], name="/softcap/div")], name="/softcap/tanh"), cap],
                          name="/softcap/mul")  # fmt: skip
        g.op("Identity", [logits], name="logits", outputs=[LOGITS])
        return self.model()

    def cuda_blocks(self, x: str) -> str:
        """The blocks as the CUDA target lays them out: each residual add fused with the next norm; returns the final norm's output."""
        cfg, g = self.cfg, self.g
        first = cfg.layers[0].attn_in
        h = self.norm(x, first, "layers.0.attn_norm" if cfg.block_kind == "sequential" else "layers.0.norm")
        for i, w in enumerate(cfg.layers):
            p, last = f"layers.{i}.", i == cfg.num_layers - 1
            nxt = "final_norm" if last else (f"layers.{i + 1}.attn_norm" if cfg.block_kind == "sequential" else f"layers.{i + 1}.norm")
            next_width = cfg.head_in if last else cfg.layers[i + 1].attn_in
            if cfg.block_kind == "parallel":
                branches = g.op("Add", [self.attention(i, h, {}), self.mlp(i, h)], name=p + "branches")
                h, x = self.residual_and_norm(branches, self.shortcut(x, i, "attn_shortcut"), next_width, nxt, p + "residual")
            else:
                attn = self.attention(i, h, {})
                h, x = self.residual_and_norm(attn, self.shortcut(x, i, "attn_shortcut"), w.mlp_in, p + "mlp_norm", p + "attn_residual")
                h, x = self.residual_and_norm(self.mlp(i, h), self.shortcut(x, i, "mlp_shortcut"), next_width, nxt, p + "mlp_residual")
        return h

    def cpu_blocks(self, x: str) -> str:
        """The blocks with ai.onnx ops only (opset-23 Attention with a boolean mask); returns the final norm's output."""
        cfg, g = self.cfg, self.g
        masks = self.attention_masks()
        for i, w in enumerate(cfg.layers):
            g.annotate(x, ["batch_size", "sequence_length", w.attn_in])
            p = f"layers.{i}."
            if cfg.block_kind == "parallel":
                h = self.norm(x, w.attn_in, p + "norm")
                branches = g.op("Add", [self.attention(i, h, masks), self.mlp(i, h)], name=p + "branches")
                x = g.op("Add", [self.shortcut(x, i, "attn_shortcut"), branches], name=p + "residual")
            else:
                attn = self.attention(i, self.norm(x, w.attn_in, p + "attn_norm"), masks)
                x = g.op("Add", [self.shortcut(x, i, "attn_shortcut"), attn], name=p + "attn_residual")
                g.annotate(x, ["batch_size", "sequence_length", w.attn_out])
                mlp = self.mlp(i, self.norm(x, w.mlp_in, p + "mlp_norm"))
                x = g.op("Add", [self.shortcut(x, i, "mlp_shortcut"), mlp], name=p + "mlp_residual")
        g.annotate(x, ["batch_size", "sequence_length", cfg.head_in])
        return self.norm(x, cfg.head_in, "final_norm")

    def rope_caches(self) -> None:
        """rope.cos_cache and rope.sin_cache (positions, r/2), times LongRoPE's attention factor.

        LongRoPE has two sets: an If node picks the long one when the call's largest position
        reaches the original context (the reference's rule, transformers'), as onnxruntime-genai's
        builder switches its caches.
        """
        cfg, g = self.cfg, self.g
        positions = torch.arange(cfg.max_position_embeddings, dtype=torch.float64)[:, None]  # (P, 1)
        scale = rope_attention_factor(cfg.rope)
        original = longrope_original_context(cfg.rope)
        sets = {"": False} if original is None else {"_short": False, "_long": True}
        for suffix, long in sets.items():
            angles = positions * rope_inverse_frequencies(cfg.rope, long=long)  # (P, r/2)
            g.weight(f"rope.cos_cache{suffix}", angles.cos() * scale)
            g.weight(f"rope.sin_cache{suffix}", angles.sin() * scale)
        if cfg.local_rope is not None:  # Gemma 3's sliding layers
            angles = positions * rope_inverse_frequencies(cfg.local_rope)  # (P, r/2)
            g.weight("rope_local.cos_cache", angles.cos())
            g.weight("rope_local.sin_cache", angles.sin())
        if original is None:
            return
        largest = g.op("ReduceMax", [POSITION_IDS], name="/rope/largest_position", keepdims=0)  # scalar
        is_long = g.op("Greater", [largest, g.weight("/rope/last_short", np.array(original - 1, dtype=np.int64), dtype=np.int64)],
                       name="/rope/is_long")  # fmt: skip
        half = cfg.rope.dim // 2
        branch = lambda suffix: helper.make_graph(
            [helper.make_node("Identity", [f"rope.{kind}_cache{suffix}"], [f"/rope/{kind}{suffix}"]) for kind in ("cos", "sin")],
            f"rope{suffix}", [],
            [helper.make_tensor_value_info(f"/rope/{kind}{suffix}", g.elem_type, [cfg.max_position_embeddings, half]) for kind in ("cos", "sin")],
        )  # fmt: skip
        g.op("If", [is_long], name="/rope/select", outputs=["rope.cos_cache", "rope.sin_cache"],
             then_branch=branch("_long"), else_branch=branch("_short"))  # fmt: skip

    def tied_head(self, h: str) -> str:
        """logits = (h @ proj) E^T + b, with the one embedding initializer E (vocab, e) read by a Gemm (transB=1)."""
        cfg, g = self.cfg, self.g
        y = g.op("MatMul", [h, g.weight("lm_head.proj", self.tensors["lm_head.proj"])], name="lm_head/proj")  # (B, T, e)
        width = tied_width(cfg)  # e: D, or fewer when E itself was sliced (from the config: the checkpoint is read lazily)
        rows = g.op("Reshape", [y, g.const_i64("lm_head.rows", [-1, width])], name="lm_head/rows")  # (B*T, e)
        inputs = [rows, "embed_tokens.weight"]
        if "lm_head.bias" in self.tensors:
            inputs.append(g.weight("lm_head.bias", self.tensors["lm_head.bias"]))
        flat = g.op("Gemm", inputs, name="lm_head/Gemm", transB=1)  # (B*T, vocab)
        shape = g.op("Concat", [g.op("Shape", [INPUT_IDS], name="lm_head/bt"), g.const_i64("lm_head.vocab", [cfg.vocab_size])],
                     name="lm_head/shape", axis=0)  # fmt: skip
        return g.op("Reshape", [flat, shape], name="lm_head/logits")

    def model(self) -> onnx.ModelProto:
        cfg, g = self.cfg, self.g
        kv_shape = ["batch_size", cfg.num_kv_heads, "past_sequence_length", cfg.head_dim]
        present_shape = ["batch_size", cfg.num_kv_heads, "total_sequence_length", cfg.head_dim]
        inputs = [
            helper.make_tensor_value_info(INPUT_IDS, TensorProto.INT64, ["batch_size", "sequence_length"]),
            helper.make_tensor_value_info(ATTENTION_MASK, TensorProto.INT64, ["batch_size", "total_sequence_length"]),
            helper.make_tensor_value_info(POSITION_IDS, TensorProto.INT64, ["batch_size", "sequence_length"]),
        ]
        outputs = [helper.make_tensor_value_info(LOGITS, g.elem_type, ["batch_size", "sequence_length", cfg.vocab_size])]
        for i in range(cfg.num_layers):
            inputs += [helper.make_tensor_value_info(past_name(i, kind), g.elem_type, kv_shape) for kind in ("key", "value")]
            outputs += [helper.make_tensor_value_info(present_name(i, kind), g.elem_type, present_shape) for kind in ("key", "value")]
        graph = helper.make_graph(g.nodes, "slicegpt_decoder", inputs, outputs, g.initializers, value_info=g.value_info)
        opsets = [helper.make_opsetid("", OPSET)] + ([helper.make_opsetid("com.microsoft", 1)] if self.target == "cuda" else [])
        model = helper.make_model(graph, opset_imports=opsets, producer_name="slicegpt-export")
        model.ir_version = IR_VERSION
        helper.set_model_props(model, {"slicegpt": json.dumps(cfg.to_dict())})
        return model


def build_onnx_model(
    cfg: SlicedConfig, tensors: Mapping[str, torch.Tensor], *, precision: str = "fp32", external: BinaryIO | None = None, target: str = "cpu"
) -> onnx.ModelProto:
    """The decoder graph of a sliced model for `target` (see TARGETS): weights embedded, or (with `external`, the open
    EXTERNAL_DATA_FILE) each written there as it is made, so neither the checkpoint nor the graph's weights are ever
    whole in memory."""
    return DecoderGraph(cfg, tensors, precision, external, target).build()


def quantize_weights(model: onnx.ModelProto, bits: int) -> onnx.ModelProto:
    """Weight-only MatMulNBits quantization (symmetric, blocks of 32, fp32 activations) through ONNX Runtime's quantizer.

    The residual projections (shortcut MatMuls, and a tied model's embedding and head
    projections) stay fp32: their rounding error is added to the whole residual stream at every
    block (measured on SmolLM2 at 0.25, int8 with quantized shortcuts: +4.4% perplexity, with
    fp32 shortcuts: +0.8%; int4 with quantized shortcuts is unusable).  With int4 an untied
    head is quantized to 8 bits; a tied embedding matrix is read by a Gather and a Gemm, which
    the quantizer leaves in fp32.  Residual widths are zero-padded to the block first (exact).
    """
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    shortcuts = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.name.endswith(RESIDUAL_PATH_NODES)]
    head = ["lm_head/MatMul"] if bits < 8 else []

    def run(m: onnx.ModelProto, nbits: int, **selection: Any) -> onnx.ModelProto:
        config = DefaultWeightOnlyQuantConfig(block_size=QUANT_BLOCK_SIZE, is_symmetric=True, bits=nbits, accuracy_level=1)
        quantizer = MatMulNBitsQuantizer(m, bits=nbits, block_size=QUANT_BLOCK_SIZE, is_symmetric=True, accuracy_level=1,
                                         algo_config=config, **selection)  # fmt: skip
        quantizer.process()
        return quantizer.model.model

    model = run(model, bits, nodes_to_exclude=shortcuts + head)
    return run(model, 8, nodes_to_exclude=shortcuts) if head else model  # only the head is a float MatMul left to quantize


def genai_config(cfg: SlicedConfig, base: dict[str, Any], precision: str, target: str = "cpu") -> dict[str, Any]:
    """onnxruntime-genai's genai_config.json for the generic decoder-only model type (the CUDA target asks for CUDA)."""
    eos = base.get("eos_token_id")
    providers = [{"cuda": {}}] if target == "cuda" else []
    return {
        "model": {
            "bos_token_id": base.get("bos_token_id"),
            "context_length": cfg.max_position_embeddings,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": providers},
                "filename": MODEL_FILE,
                "head_size": cfg.head_dim,
                "hidden_size": cfg.hidden_size,
                "inputs": {
                    "input_ids": INPUT_IDS,
                    "attention_mask": ATTENTION_MASK,
                    "position_ids": POSITION_IDS,
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {"logits": LOGITS, "present_key_names": "present.%d.key", "present_value_names": "present.%d.value"},
                "num_attention_heads": cfg.num_heads,
                "num_hidden_layers": cfg.num_layers,
                "num_key_value_heads": cfg.num_kv_heads,
            },
            "eos_token_id": eos,
            "pad_token_id": base.get("pad_token_id") if base.get("pad_token_id") is not None else (eos[0] if isinstance(eos, list) else eos),
            "type": "decoder",
            "vocab_size": cfg.vocab_size,
        },
        "search": {
            "diversity_penalty": 0.0, "do_sample": False, "early_stopping": True, "length_penalty": 1.0,
            "max_length": cfg.max_position_embeddings, "min_length": 0, "no_repeat_ngram_size": 0, "num_beams": 1,
            "num_return_sequences": 1, "past_present_share_buffer": False, "repetition_penalty": 1.0,
            "temperature": 1.0, "top_k": 1, "top_p": 1.0,
        },  # fmt: skip
    }


def save_onnx(model: onnx.ModelProto, directory: Path) -> None:
    """model.onnx, with the weights in model.onnx.data when they exceed EXTERNAL_DATA_THRESHOLD."""
    size = sum(t.ByteSize() for t in model.graph.initializer)
    external = size > EXTERNAL_DATA_THRESHOLD
    onnx.save_model(
        model, str(directory / MODEL_FILE), save_as_external_data=external, all_tensors_to_one_file=True,
        location=EXTERNAL_DATA_FILE, size_threshold=1024,
    )  # fmt: skip


def export_onnx(
    *, checkpoint: Path, out: Path, precision: str = "fp32", quantize: str | None = None, execution_provider: str = "cpu", overwrite: bool = False
) -> Path:
    """Export a sliced checkpoint folder to an ONNX folder (graph, genai_config.json, config.json, tokenizer).

    `execution_provider` "cuda" builds the graph from the ops ONNX Runtime's CUDA provider runs with grouped KV heads
    (see TARGETS); it runs on the CPU provider too (each of those ops has a CPU kernel), which is how it is tested.
    """
    if quantize is not None and quantize not in QUANTIZATIONS:
        raise SliceGPTError(f"unknown quantization {quantize!r} (choose from {', '.join(QUANTIZATIONS)})")
    if quantize is not None and precision != "fp32":
        raise SliceGPTError("--quantize applies to fp32 graphs (MatMulNBits keeps fp32 activations on CPU)")
    cfg, base = read_config(checkpoint)
    check_target(cfg, execution_provider)
    tensors: Mapping[str, torch.Tensor] = lazy_tensors(checkpoint)  # read one at a time while the graph is built
    if quantize is not None:
        cfg, tensors = pad_residual_widths(cfg, tensors, QUANT_BLOCK_SIZE)
    with atomic_directory(Path(out), overwrite=overwrite) as tmp:
        logger.info("building the ONNX graph (%d layers, %s)", cfg.num_layers, precision)
        if quantize is not None:  # ONNX Runtime's quantizer rewrites an in-memory graph
            model = quantize_weights(build_onnx_model(cfg, tensors, precision=precision, target=execution_provider), QUANTIZATIONS[quantize])
            logger.info("quantized MatMul weights to %s", quantize)
            save_onnx(model, tmp)
        else:
            with open(tmp / EXTERNAL_DATA_FILE, "wb") as data:
                model = build_onnx_model(cfg, tensors, precision=precision, external=data, target=execution_provider)
            onnx.save_model(model, str(tmp / MODEL_FILE))  # the weights are in EXTERNAL_DATA_FILE already
        (tmp / "genai_config.json").write_text(json.dumps(genai_config(cfg, base, precision, execution_provider), indent=2) + "\n")
        (tmp / CONFIG_NAME).write_text(json.dumps({**base, "head_dim": cfg.head_dim}, indent=2) + "\n")
        for name in TOKENIZER_FILES:
            if (Path(checkpoint) / name).is_file():
                shutil.copyfile(Path(checkpoint) / name, tmp / name)
    return Path(out)
