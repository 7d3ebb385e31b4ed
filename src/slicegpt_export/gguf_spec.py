"""The `slicegpt` GGUF architecture, version 4: every metadata key and tensor name in one place.

docs/gguf-slicegpt.md is the prose version of this module; the writer and the runner use
only these constants.
"""

from __future__ import annotations

ARCH = "slicegpt"
SPEC_VERSION = 3  # 2: tied embeddings (token_embd read by the head through output_proj); 3: q/k norms, LongRoPE, Gemma
DELTA_SPEC_VERSION = 4  # 4: shortcuts stored as S - J (SHORTCUT_DELTA); written only by files that use it
READABLE_SPEC_VERSIONS = (2, 3, 4)  # a version 2 file has neither q/k norms nor LongRoPE


def key(name: str) -> str:
    return f"{ARCH}.{name}"


# ---- scalar hyperparameters (uint32 unless noted) -------------------------------------------
SPEC_VERSION_KEY = key("spec_version")
BASE_FAMILY = key("base_family")  # string: the Hugging Face model_type the model came from
BLOCK_COUNT = key("block_count")
EMBEDDING_LENGTH = key("embedding_length")  # original width D: every norm divides by it
CONTEXT_LENGTH = key("context_length")
FEED_FORWARD_LENGTH = key("feed_forward_length")  # uint32, or array[uint32] of block_count when MLPs were pruned
VOCAB_SIZE = key("vocab_size")
HEAD_COUNT = key("attention.head_count")
HEAD_COUNT_KV = key("attention.head_count_kv")
KEY_LENGTH = key("attention.key_length")  # head dim (also value_length)
VALUE_LENGTH = key("attention.value_length")
NORM_EPSILON = key("attention.layer_norm_rms_epsilon")  # float32
SLIDING_WINDOW = key("attention.sliding_window")  # optional
ROPE_FREQ_BASE = key("rope.freq_base")  # float32, rope only
ROPE_DIMENSION_COUNT = key("rope.dimension_count")  # rope only
ROPE_SCALING_TYPE = key("rope.scaling.type")  # string: none, linear or longrope (llama.cpp's names; llama.cpp reads it)
ROPE_SCALING_FACTOR = key("rope.scaling.factor")  # float32, linear
# LongRoPE (Phi-3.5, Phi-4-mini), as llama.cpp's own phi3 files carry it: these two keys plus ROPE_FACTORS_*
ROPE_SCALING_ATTN_FACTOR = key("rope.scaling.attn_factor")  # float32: cos and sin are multiplied by it
ROPE_SCALING_ORIG_CTX = key("rope.scaling.original_context_length")  # uint32: beyond it the long factors apply
ROPE_FACTORS_LONG = "rope_factors_long.weight"  # [r/2] f32: inv_freq_j = theta^(-2j/r) / factor_j
ROPE_FACTORS_SHORT = "rope_factors_short.weight"
# Llama 3 scaling: its own keys (llama.cpp would read rope.scaling.factor as linear scaling) plus ROPE_FREQS
ROPE_LLAMA3_FACTOR = key("rope.llama3.factor")  # float32
ROPE_LLAMA3_LOW_FREQ_FACTOR = key("rope.llama3.low_freq_factor")  # float32
ROPE_LLAMA3_HIGH_FREQ_FACTOR = key("rope.llama3.high_freq_factor")  # float32
ROPE_LLAMA3_ORIG_CTX = key("rope.llama3.original_context_length")  # uint32
ROPE_FREQS = "rope_freqs.weight"  # [r/2] f32 divisors of theta^(-2j/r), llama.cpp's form of Llama 3 scaling
BLOCK_KIND = key("block_kind")  # string: sequential or parallel
ACTIVATION = key("activation")  # string: silu, gelu, gelu_tanh, relu
GATED_MLP = key("gated_mlp")  # bool
BIAS_QKV = key("bias.qkv")  # bool
BIAS_ATTN_OUT = key("bias.attn_out")  # bool
BIAS_MLP = key("bias.mlp")  # bool
BIAS_HEAD = key("bias.head")  # bool
POSITION_EMBEDDING = key("position_embedding")  # string: rope or learned
POSITION_OFFSET = key("position_offset")  # learned positions: row = position + offset
SPARSITY = key("sparsity")  # float32, informative
TIED_EMBEDDINGS = key("tied_embeddings")  # bool: token_embd is [D, V], read through token_embd_proj and by the head
QK_NORM = key("attention.qk_norm")  # bool (version 3): blk.N.attn_q_norm / attn_k_norm weight a per-head RMSNorm
# ---- version 3, Gemma 2/3 (optional keys; llama.cpp's own names where it has them) ------------------------------
POST_NORMS = key("post_norms")  # bool: branch outputs are D wide, normed over D, then blk.N.*_post_proj
ATTENTION_SCALE = key("attention.scale")  # float32: softmax scale of q k^T (absent: 1 / sqrt(key_length))
ATTN_LOGIT_SOFTCAPPING = key("attn_logit_softcapping")  # float32: scores -> cap * tanh(scores / cap)
FINAL_LOGIT_SOFTCAPPING = key("final_logit_softcapping")  # float32: logits -> cap * tanh(logits / cap)
SLIDING_WINDOW_PATTERN = key("attention.sliding_window_pattern")  # array[bool] of block_count: which blocks use the window
ROPE_LAYERS = key("rope.layers")  # array[bool] of block_count, optional: which blocks rotate q and k (SmolLM3)
BOS_WINDOWS = key("bos_windows")  # bool, optional: trained to always see BOS; evaluation windows start with it (Gemma)
ROPE_FREQ_BASE_SWA = key("rope.freq_base_swa")  # float32: rope base of the sliding blocks (unscaled), when it differs
# ---- widths -----------------------------------------------------------------------------------
WIDTH_EMBEDDING = key("width.embedding")  # d_emb: the residual width entering block 0
WIDTH_TOKEN_EMBD = key("width.token_embd")  # columns of token_embd: d_emb untied; D (or fewer, E sliced) when tied
WIDTH_ATTN_IN = key("width.attn_in")  # array[uint32] of block_count
WIDTH_ATTN_OUT = key("width.attn_out")
WIDTH_MLP_IN = key("width.mlp_in")
WIDTH_MLP_OUT = key("width.mlp_out")
WIDTH_HEAD_IN = key("width.head_in")
SHORTCUT_DELTA = key("shortcut_delta")  # bool, version 4: every stored shortcut is S - J, J = [I 0; 0 0]

REQUIRED_KEYS = (
    SPEC_VERSION_KEY, BASE_FAMILY, BLOCK_COUNT, EMBEDDING_LENGTH, CONTEXT_LENGTH, FEED_FORWARD_LENGTH, VOCAB_SIZE,
    HEAD_COUNT, HEAD_COUNT_KV, KEY_LENGTH, VALUE_LENGTH, NORM_EPSILON, BLOCK_KIND, ACTIVATION, GATED_MLP,
    BIAS_QKV, BIAS_ATTN_OUT, BIAS_MLP, BIAS_HEAD, POSITION_EMBEDDING, POSITION_OFFSET, TIED_EMBEDDINGS, QK_NORM, POST_NORMS, WIDTH_EMBEDDING, WIDTH_TOKEN_EMBD,
    WIDTH_ATTN_IN, WIDTH_ATTN_OUT, WIDTH_MLP_IN, WIDTH_MLP_OUT, WIDTH_HEAD_IN,
)  # fmt: skip

# ---- tensors: checkpoint name -> GGUF name ({i} = block index) -------------------------------
TENSOR_NAMES = {
    "embed_tokens.weight": "token_embd.weight",
    "embed_positions.weight": "position_embd.weight",
    "layers.{i}.q_proj.weight": "blk.{i}.attn_q.weight",
    "layers.{i}.q_proj.bias": "blk.{i}.attn_q.bias",
    "layers.{i}.k_proj.weight": "blk.{i}.attn_k.weight",
    "layers.{i}.k_proj.bias": "blk.{i}.attn_k.bias",
    "layers.{i}.v_proj.weight": "blk.{i}.attn_v.weight",
    "layers.{i}.v_proj.bias": "blk.{i}.attn_v.bias",
    "layers.{i}.o_proj.weight": "blk.{i}.attn_output.weight",
    "layers.{i}.o_proj.bias": "blk.{i}.attn_output.bias",
    "layers.{i}.q_norm.weight": "blk.{i}.attn_q_norm.weight",
    "layers.{i}.k_norm.weight": "blk.{i}.attn_k_norm.weight",
    "layers.{i}.attn_shortcut": "blk.{i}.attn_shortcut.weight",
    "layers.{i}.gate_proj.weight": "blk.{i}.ffn_gate.weight",
    "layers.{i}.up_proj.weight": "blk.{i}.ffn_up.weight",
    "layers.{i}.up_proj.bias": "blk.{i}.ffn_up.bias",
    "layers.{i}.down_proj.weight": "blk.{i}.ffn_down.weight",
    "layers.{i}.down_proj.bias": "blk.{i}.ffn_down.bias",
    "layers.{i}.mlp_shortcut": "blk.{i}.ffn_shortcut.weight",
    "layers.{i}.attn_post_proj": "blk.{i}.attn_post_proj.weight",
    "layers.{i}.mlp_post_proj": "blk.{i}.ffn_post_proj.weight",
    "lm_head.weight": "output.weight",
    "lm_head.bias": "output.bias",
    "embed_proj": "token_embd_proj.weight",
    "lm_head.proj": "output_proj.weight",
}
#: matrices the checkpoint applies on the right (x -> x @ S) are stored transposed, as linear weights
#: (d_out rows of d_in): y = S^T x
RIGHT_MULTIPLIED = ("attn_shortcut", "mlp_shortcut", "embed_proj", "proj", "attn_post_proj", "mlp_post_proj")


def is_right_multiplied(checkpoint_name: str) -> bool:
    """Whether a checkpoint tensor is a right-multiplied matrix (stored transposed in GGUF)."""
    return checkpoint_name.rsplit(".", 1)[-1] in RIGHT_MULTIPLIED


def gguf_name(checkpoint_name: str) -> str:
    """GGUF tensor name of a checkpoint tensor (see TENSOR_NAMES)."""
    parts = checkpoint_name.split(".")
    if parts[0] == "layers":
        template = "layers.{i}." + ".".join(parts[2:])
        return TENSOR_NAMES[template].format(i=parts[1])
    return TENSOR_NAMES[checkpoint_name]


def checkpoint_name(gguf_tensor: str) -> str:
    """Inverse of gguf_name; KeyError for a name the spec does not define."""
    parts = gguf_tensor.split(".")
    if parts[0] == "blk":
        template = "blk.{i}." + ".".join(parts[2:])
        return INVERSE[template].format(i=int(parts[1]))
    return INVERSE[gguf_tensor]


INVERSE = {v: k for k, v in TENSOR_NAMES.items()}
