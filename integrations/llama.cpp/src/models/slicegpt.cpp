// SliceGPT (Ashkboos et al., ICLR 2024): a decoder whose residual stream changes width from
// block to block and carries a projection ("shortcut") matrix around every residual update.
// File format: docs/gguf-slicegpt.md of slicegpt-export (spec version 4; versions 2 and 3 are read too).
#include "models.h"

#include <cmath>

static constexpr uint32_t SLICEGPT_SPEC_VERSION = 4;
static constexpr uint32_t SLICEGPT_OLDEST_SPEC_VERSION = 2;  // 2: no q/k norms, no LongRoPE

// the slicegpt.* keys are read straight from the GGUF metadata, each checked for its type
static int64_t slicegpt_find_key(const llama_model_loader & ml, const char * name, gguf_type type) {
    const std::string key = std::string("slicegpt.") + name;
    const int64_t id = gguf_find_key(ml.metadata, key.c_str());
    if (id < 0) {
        throw std::runtime_error(format("slicegpt: key not found in model: %s", key.c_str()));
    }
    if (gguf_get_kv_type(ml.metadata, id) != type) {
        throw std::runtime_error(format("slicegpt: key %s has type %s, expected %s", key.c_str(),
                                        gguf_type_name(gguf_get_kv_type(ml.metadata, id)), gguf_type_name(type)));
    }
    return id;
}

static uint32_t slicegpt_get_u32(const llama_model_loader & ml, const char * name) {
    return gguf_get_val_u32(ml.metadata, slicegpt_find_key(ml, name, GGUF_TYPE_UINT32));
}

static bool slicegpt_get_bool(const llama_model_loader & ml, const char * name) {
    return gguf_get_val_bool(ml.metadata, slicegpt_find_key(ml, name, GGUF_TYPE_BOOL));
}

// an optional f32 key: `fallback` when absent
static float slicegpt_get_f32_or(const llama_model_loader & ml, const char * name, float fallback) {
    const std::string key = std::string("slicegpt.") + name;
    return gguf_find_key(ml.metadata, key.c_str()) < 0 ? fallback : gguf_get_val_f32(ml.metadata, slicegpt_find_key(ml, name, GGUF_TYPE_FLOAT32));
}

static std::string slicegpt_get_str(const llama_model_loader & ml, const char * name) {
    return gguf_get_val_str(ml.metadata, slicegpt_find_key(ml, name, GGUF_TYPE_STRING));
}

static void slicegpt_get_widths(const llama_model_loader & ml, const char * name, std::array<uint32_t, LLAMA_MAX_LAYERS> & widths, uint32_t n_layer) {
    const int64_t id = slicegpt_find_key(ml, name, GGUF_TYPE_ARRAY);
    if (gguf_get_arr_type(ml.metadata, id) != GGUF_TYPE_UINT32 || gguf_get_arr_n(ml.metadata, id) != n_layer) {
        throw std::runtime_error(format("slicegpt: slicegpt.%s must be an array of %u uint32", name, n_layer));
    }
    const auto * values = static_cast<const uint32_t *>(gguf_get_arr_data(ml.metadata, id));
    std::copy(values, values + n_layer, widths.begin());
}

static llama_model_slicegpt::activation slicegpt_activation_from_string(const std::string & name) {
    if (name == "silu")      { return llama_model_slicegpt::ACT_SILU; }
    if (name == "gelu")      { return llama_model_slicegpt::ACT_GELU_ERF; }
    if (name == "gelu_tanh") { return llama_model_slicegpt::ACT_GELU_TANH; }
    if (name == "relu")      { return llama_model_slicegpt::ACT_RELU; }
    throw std::runtime_error(format("slicegpt: unsupported activation '%s'", name.c_str()));
}

void llama_model_slicegpt::load_arch_hparams(llama_model_loader & ml) {
    const uint32_t version = slicegpt_get_u32(ml, "spec_version");
    if (version < SLICEGPT_OLDEST_SPEC_VERSION || version > SLICEGPT_SPEC_VERSION) {
        throw std::runtime_error(format("slicegpt: spec version %u is not supported (this build reads versions %u to %u)",
                                        version, SLICEGPT_OLDEST_SPEC_VERSION, SLICEGPT_SPEC_VERSION));
    }
    ml.get_key(LLM_KV_ATTENTION_LAYERNORM_RMS_EPS, hparams.f_norm_rms_eps);
    // version 4: shortcuts stored as S - J (absent: false); an older file must not carry the key
    if (gguf_find_key(ml.metadata, "slicegpt.shortcut_delta") >= 0) {
        if (version < 4) {
            throw std::runtime_error("slicegpt: slicegpt.shortcut_delta needs spec version 4");
        }
        shortcut_delta = slicegpt_get_bool(ml, "shortcut_delta");
    }

    // the sliding window: a layer attends to the last n_swa positions (key within n_swa of the query); every layer
    // (Mistral) unless attention.sliding_window_pattern lists the sliding ones (Gemma, version 3)
    if (ml.get_key(LLM_KV_ATTENTION_SLIDING_WINDOW, hparams.n_swa, false) && hparams.n_swa < hparams.n_ctx_train) {
        hparams.swa_type = LLAMA_SWA_TYPE_STANDARD;
        load_swa_pattern(ml, 0);
    } else {
        hparams.n_swa = 0;
    }
    // sliding layers share the global rope unless rope.freq_base_swa gives them an unscaled one of their own (Gemma 3)
    hparams.rope_freq_base_train_swa  = hparams.rope_freq_base_train;
    hparams.rope_freq_scale_train_swa = hparams.rope_freq_scale_train;
    if (ml.get_key(LLM_KV_ROPE_FREQ_BASE_SWA, hparams.rope_freq_base_train_swa, false)) {
        hparams.rope_freq_scale_train_swa = 1.0f;
    }

    const uint32_t n_layer = hparams.n_layer();
    slicegpt_get_widths(ml, "width.attn_in",  width_attn_in,  n_layer);
    slicegpt_get_widths(ml, "width.attn_out", width_attn_out, n_layer);
    slicegpt_get_widths(ml, "width.mlp_in",   width_mlp_in,   n_layer);
    slicegpt_get_widths(ml, "width.mlp_out",  width_mlp_out,  n_layer);

    const std::string block_kind = slicegpt_get_str(ml, "block_kind");
    if (block_kind != "sequential" && block_kind != "parallel") {
        throw std::runtime_error(format("slicegpt: unsupported block kind '%s'", block_kind.c_str()));
    }
    parallel_blocks = block_kind == "parallel";

    const std::string position_embedding = slicegpt_get_str(ml, "position_embedding");
    if (position_embedding != "rope" && position_embedding != "learned") {
        throw std::runtime_error(format("slicegpt: unsupported position embedding '%s'", position_embedding.c_str()));
    }
    learned_positions = position_embedding == "learned";
    position_offset   = slicegpt_get_u32(ml, "position_offset");

    act        = slicegpt_activation_from_string(slicegpt_get_str(ml, "activation"));
    gated_mlp  = slicegpt_get_bool(ml, "gated_mlp");
    tied_embeddings = slicegpt_get_bool(ml, "tied_embeddings");
    bias_qkv   = slicegpt_get_bool(ml, "bias.qkv");
    bias_attn  = slicegpt_get_bool(ml, "bias.attn_out");
    bias_mlp   = slicegpt_get_bool(ml, "bias.mlp");
    bias_head  = slicegpt_get_bool(ml, "bias.head");
    qk_norm    = version >= 3 && slicegpt_get_bool(ml, "attention.qk_norm");
    post_norms = version >= 3 && slicegpt_get_bool(ml, "post_norms");
    attention_scale = slicegpt_get_f32_or(ml, "attention.scale", 1.0f / sqrtf(float(hparams.n_embd_head_k())));
    // Gemma 2's soft-capping: of the attention scores (llama.cpp's own attention code), of the logits (below)
    hparams.attn_soft_cap = ml.get_key(LLM_KV_ATTN_LOGIT_SOFTCAPPING, hparams.f_attn_logit_softcapping, false);
    final_softcap = slicegpt_get_f32_or(ml, "final_logit_softcapping", 0.0f);

    // which blocks rotate q and k (SmolLM3 leaves some without rope); absent: all of them
    rope_layers.fill(true);
    const int64_t rope_layers_id = gguf_find_key(ml.metadata, "slicegpt.rope.layers");
    if (rope_layers_id >= 0) {
        if (gguf_get_kv_type(ml.metadata, rope_layers_id) != GGUF_TYPE_ARRAY || gguf_get_arr_type(ml.metadata, rope_layers_id) != GGUF_TYPE_BOOL
                || gguf_get_arr_n(ml.metadata, rope_layers_id) != hparams.n_layer()) {
            throw std::runtime_error(format("slicegpt: slicegpt.rope.layers must be an array of %u bool", hparams.n_layer()));
        }
        const auto * flags = static_cast<const int8_t *>(gguf_get_arr_data(ml.metadata, rope_layers_id));
        for (uint32_t il = 0; il < hparams.n_layer(); ++il) {
            rope_layers[il] = flags[il] != 0;
        }
    }
    // LongRoPE needs no code here: llama.cpp's loader reads rope.scaling.attn_factor and
    // rope.scaling.original_context_length for every architecture, and the factors are tensors

    // the residual stream is narrower than D: llama.cpp's n_embd is the width of token_embd's rows (what
    // the input path reads: the embedding width, or when tied to the head D or the sliced matrix's width),
    // n_embd_out the head's input width, and D is kept for the norms
    n_embd_orig            = hparams.n_embd;
    width_embedding        = slicegpt_get_u32(ml, "width.embedding");
    hparams.n_embd         = slicegpt_get_u32(ml, "width.token_embd");  // D, or fewer when a tied matrix was sliced
    hparams.n_embd_out_impl = slicegpt_get_u32(ml, "width.head_in");

    if ((!tied_embeddings && hparams.n_embd != width_embedding) || hparams.n_embd > n_embd_orig) {
        throw std::runtime_error("slicegpt: width.token_embd must be width.embedding (untied) and at most embedding_length");
    }
    if (width_attn_in[0] != width_embedding || width_mlp_out[n_layer - 1] != hparams.n_embd_out_impl) {
        throw std::runtime_error("slicegpt: per-layer widths do not chain from the embedding to the head");
    }
    for (uint32_t il = 0; il < n_layer; ++il) {
        // sequential: the MLP reads what attention wrote; parallel: both read and write the same stream
        const bool inner = parallel_blocks
            ? width_mlp_in[il] == width_attn_in[il] && width_mlp_out[il] == width_attn_out[il]
            : width_mlp_in[il] == width_attn_out[il];
        const bool chained = il + 1 == n_layer || width_attn_in[il + 1] == width_mlp_out[il];
        if (!inner || !chained || width_attn_in[il] > n_embd_orig || width_mlp_out[il] > n_embd_orig) {
            throw std::runtime_error(format("slicegpt: inconsistent widths at block %u", il));
        }
    }
    type = LLM_TYPE_UNKNOWN;
}

void llama_model_slicegpt::load_arch_tensors(llama_model_loader &) {
    LLAMA_LOAD_LOCALS;

    const int64_t n_embd_q = n_embd_head_k * n_head;

    const int64_t d_emb = width_embedding;
    tok_embd = create_tensor(tn(LLM_TENSOR_TOKEN_EMBD, "weight"), {n_embd, n_vocab}, 0);
    if (learned_positions) {
        pos_embd = create_tensor(tn(LLM_TENSOR_POS_EMBD, "weight"), {d_emb, (int64_t) hparams.n_ctx_train + position_offset}, 0);
    }

    const int64_t n_embd_head_in = hparams.n_embd_out_impl;
    if (tied_embeddings) {
        // one [n_embd, n_vocab] matrix read by the input path and by the head, as llama.cpp's tied models do;
        // the rotations travel in two small matrices beside it (token_embd_proj absent = identity)
        tok_embd_proj = create_tensor(tn(LLM_TENSOR_TOKEN_EMBD_PROJ, "weight"), {n_embd, d_emb}, d_emb == n_embd ? TENSOR_NOT_REQUIRED : 0);
        output_proj   = create_tensor(tn(LLM_TENSOR_OUTPUT_PROJ, "weight"), {n_embd_head_in, n_embd}, 0);
        output        = create_tensor(tn(LLM_TENSOR_TOKEN_EMBD, "weight"), {n_embd, n_vocab}, TENSOR_DUPLICATED);
    } else {
        output = create_tensor(tn(LLM_TENSOR_OUTPUT, "weight"), {n_embd_head_in, n_vocab}, 0);
    }
    output_b = create_tensor(tn(LLM_TENSOR_OUTPUT, "bias"),   {n_vocab}, bias_head ? 0 : TENSOR_NOT_REQUIRED);

    const int bias_qkv_flags  = bias_qkv  ? 0 : TENSOR_NOT_REQUIRED;
    const int bias_attn_flags = bias_attn ? 0 : TENSOR_NOT_REQUIRED;
    const int bias_mlp_flags  = bias_mlp  ? 0 : TENSOR_NOT_REQUIRED;

    for (int i = 0; i < n_layer; ++i) {
        auto & layer = layers[i];
        const int64_t a_in = width_attn_in[i], a_out = width_attn_out[i];
        const int64_t m_in = width_mlp_in[i],  m_out = width_mlp_out[i];

        layer.wq   = create_tensor(tn(LLM_TENSOR_ATTN_Q,   "weight", i), {a_in, n_embd_q},     0);
        layer.wk   = create_tensor(tn(LLM_TENSOR_ATTN_K,   "weight", i), {a_in, n_embd_k_gqa}, 0);
        layer.wv   = create_tensor(tn(LLM_TENSOR_ATTN_V,   "weight", i), {a_in, n_embd_v_gqa}, 0);
        layer.wq_b = create_tensor(tn(LLM_TENSOR_ATTN_Q,   "bias",   i), {n_embd_q},     bias_qkv_flags);
        layer.wk_b = create_tensor(tn(LLM_TENSOR_ATTN_K,   "bias",   i), {n_embd_k_gqa}, bias_qkv_flags);
        layer.wv_b = create_tensor(tn(LLM_TENSOR_ATTN_V,   "bias",   i), {n_embd_v_gqa}, bias_qkv_flags);
        // a post-norm branch writes D wide; its post_proj [D, d_out] takes it into the residual
        const int64_t attn_rows = post_norms ? n_embd_orig : a_out;
        const int64_t mlp_rows  = post_norms ? n_embd_orig : m_out;
        layer.wo   = create_tensor(tn(LLM_TENSOR_ATTN_OUT, "weight", i), {n_embd_q, attn_rows}, 0);
        layer.wo_b = create_tensor(tn(LLM_TENSOR_ATTN_OUT, "bias",   i), {attn_rows}, bias_attn_flags);
        if (post_norms) {
            attn_post_proj[i] = create_tensor(tn(LLM_TENSOR_ATTN_POST_PROJ, "weight", i), {n_embd_orig, a_out}, 0);
            ffn_post_proj[i]  = create_tensor(tn(LLM_TENSOR_FFN_POST_PROJ,  "weight", i), {n_embd_orig, m_out}, 0);
        }
        if (qk_norm) {
            // act on head_dim after the projections: untouched by slicing, as in llama.cpp's qwen3
            layer.attn_q_norm = create_tensor(tn(LLM_TENSOR_ATTN_Q_NORM, "weight", i), {n_embd_head_k}, 0);
            layer.attn_k_norm = create_tensor(tn(LLM_TENSOR_ATTN_K_NORM, "weight", i), {n_embd_head_k}, 0);
        }

        // an absent shortcut is the identity, which only a block that keeps its width can have
        attn_shortcut[i] = create_tensor(tn(LLM_TENSOR_ATTN_SHORTCUT, "weight", i), {a_in, a_out}, a_in == a_out ? TENSOR_NOT_REQUIRED : 0);
        if (!parallel_blocks) {
            ffn_shortcut[i] = create_tensor(tn(LLM_TENSOR_FFN_SHORTCUT, "weight", i), {m_in, m_out}, m_in == m_out ? TENSOR_NOT_REQUIRED : 0);
        }

        // MLP neurons per block: feed_forward_length may be a per-layer array (pruned MLPs)
        const int64_t n_ff_l = hparams.n_ff(i);
        if (gated_mlp) {
            layer.ffn_gate = create_tensor(tn(LLM_TENSOR_FFN_GATE, "weight", i), {m_in, n_ff_l}, 0);
        }
        layer.ffn_up     = create_tensor(tn(LLM_TENSOR_FFN_UP,   "weight", i), {m_in, n_ff_l},  0);
        layer.ffn_up_b   = create_tensor(tn(LLM_TENSOR_FFN_UP,   "bias",   i), {n_ff_l},        bias_mlp_flags);
        layer.ffn_down   = create_tensor(tn(LLM_TENSOR_FFN_DOWN, "weight", i), {n_ff_l, mlp_rows}, 0);
        layer.ffn_down_b = create_tensor(tn(LLM_TENSOR_FFN_DOWN, "bias",   i), {mlp_rows},       bias_mlp_flags);

        if (!learned_positions) {
            // Llama 3 rope scaling: per-frequency divisors, as llama.cpp's own Llama files store them
            layer.rope_freqs = create_tensor(tn(LLM_TENSOR_ROPE_FREQS, "weight", i), {n_rot / 2}, TENSOR_NOT_REQUIRED | (i != 0 ? TENSOR_DUPLICATED : 0));
            // LongRoPE (Phi-3.5, Phi-4-mini): llama.cpp picks long or short by the context size, as for its phi3
            layer.rope_long  = create_tensor(tn(LLM_TENSOR_ROPE_FACTORS_LONG,  "weight", i), {n_rot / 2}, TENSOR_NOT_REQUIRED | (i != 0 ? TENSOR_DUPLICATED : 0));
            layer.rope_short = create_tensor(tn(LLM_TENSOR_ROPE_FACTORS_SHORT, "weight", i), {n_rot / 2}, TENSOR_NOT_REQUIRED | (i != 0 ? TENSOR_DUPLICATED : 0));
        }
    }
}

std::unique_ptr<llm_graph_context> llama_model_slicegpt::build_arch_graph(const llm_graph_params & params) const {
    return std::make_unique<graph>(*this, params);
}

// SliceGPT's RMSNorm over the original width D whatever the width d of x:
//   x / sqrt(sum(x^2) / D + eps) = sqrt(D/d) * rms_norm_d(x) with epsilon eps * D / d
ggml_tensor * llama_model_slicegpt::graph::build_norm_orig(ggml_tensor * x, int il) const {
    const float ratio = float(model.n_embd_orig) / float(x->ne[0]);
    ggml_tensor * cur = ggml_rms_norm(ctx0, x, hparams.f_norm_rms_eps * ratio);
    if (x->ne[0] != (int64_t) model.n_embd_orig) {
        cur = ggml_scale(ctx0, cur, sqrtf(ratio));
    }
    cb(cur, "norm", il);
    return cur;
}

// a post-norm stage's branch output y [D, n_tokens] into the residual: (diag(g) Q_out)^T (y / rms_D(y)) [d_out, n_tokens];
// y unchanged for other models (post_proj nullptr)
ggml_tensor * llama_model_slicegpt::graph::build_post_norm(ggml_tensor * post_proj, ggml_tensor * y, int il) const {
    if (post_proj == nullptr) {
        return y;
    }
    ggml_tensor * cur = build_lora_mm(post_proj, build_norm_orig(y, il));
    cb(cur, "post_norm", il);
    return cur;
}

// the residual path Q_l^T Q_{l+1} (sliced): [d_in, n_tokens] -> [d_out, n_tokens]; identity when absent.
// A version 4 file may store S - J (J = [I 0; 0 0]): then S x = J x + (S - J) x, J x being x's first d_out rows
// (zero-extended when d_out > d_in), so the quantized matrix holds only the correction.
ggml_tensor * llama_model_slicegpt::graph::build_shortcut(ggml_tensor * shortcut, ggml_tensor * x, int il) const {
    if (shortcut == nullptr) {
        return x;
    }
    ggml_tensor * cur = build_lora_mm(shortcut, x);  // [d_out, n_tokens]
    if (model.shortcut_delta) {
        const int64_t d_in = x->ne[0], d_out = cur->ne[0];
        ggml_tensor * jx = d_out <= d_in
            ? ggml_view_2d(ctx0, x, d_out, x->ne[1], x->nb[1], 0)  // the first d_out rows of x
            : ggml_pad(ctx0, x, d_out - d_in, 0, 0, 0);
        cur = ggml_add(ctx0, cur, jx);
    }
    cb(cur, "shortcut", il);
    return cur;
}

template <typename inp_attn_t>
ggml_tensor * llama_model_slicegpt::graph::build_self_attn(ggml_tensor * h, ggml_tensor * inp_pos, inp_attn_t * inp_attn, int il) const {
    const auto & layer = model.layers[il];
    const int64_t n_embd_head = hparams.n_embd_head_v();

    auto [Qcur, Kcur, Vcur] = build_qkv(layer, h, n_embd_head, n_head, n_head_kv, il);  // [hd, H|K, n_tokens]
    if (layer.attn_q_norm) {
        Qcur = build_norm(Qcur, layer.attn_q_norm, nullptr, LLM_NORM_RMS, il);
        Kcur = build_norm(Kcur, layer.attn_k_norm, nullptr, LLM_NORM_RMS, il);
        cb(Qcur, "Qcur_normed", il);
        cb(Kcur, "Kcur_normed", il);
    }
    if (!model.learned_positions && model.rope_layers[il]) {
        // rope_freqs (Llama 3), LongRoPE's long or short factors, or none
        ggml_tensor * rope_factors = model.get_rope_factors(cparams, il);
        // per layer: Gemma 3's sliding layers have a rope base of their own
        const float freq_base_l  = model.get_rope_freq_base(cparams, il);
        const float freq_scale_l = model.get_rope_freq_scale(cparams, il);
        Qcur = ggml_rope_ext(ctx0, Qcur, inp_pos, rope_factors, n_rot, rope_type, n_ctx_orig, freq_base_l, freq_scale_l,
                             ext_factor, attn_factor, beta_fast, beta_slow);
        Kcur = ggml_rope_ext(ctx0, Kcur, inp_pos, rope_factors, n_rot, rope_type, n_ctx_orig, freq_base_l, freq_scale_l,
                             ext_factor, attn_factor, beta_fast, beta_slow);
    }
    cb(Qcur, "Qcur", il);
    cb(Kcur, "Kcur", il);
    cb(Vcur, "Vcur", il);

    // llama.cpp soft-caps the raw q k^T before its kq_scale: with soft-capping (Gemma 2) q carries the scale instead
    float kq_scale = model.attention_scale;
    if (hparams.attn_soft_cap) {
        Qcur = ggml_scale(ctx0, Qcur, model.attention_scale);
        kq_scale = 1.0f;
    }
    ggml_tensor * cur = build_attn(inp_attn, layer.wo, layer.wo_b, nullptr, Qcur, Kcur, Vcur, nullptr, nullptr, nullptr,
                                   kq_scale, il);  // [a_out, n_tokens], or [D, n_tokens] before a post-norm
    cb(cur, "attn_out", il);
    return build_post_norm(model.attn_post_proj[il], cur, il);  // [a_out, n_tokens]
}

ggml_tensor * llama_model_slicegpt::graph::build_activation(ggml_tensor * x) const {
    switch (model.act) {
        case ACT_SILU:      return ggml_silu(ctx0, x);
        case ACT_GELU_ERF:  return ggml_gelu_erf(ctx0, x);
        case ACT_GELU_TANH: {
            // 0.5 x (1 + tanh(c (x + 0.044715 x^3))), c = sqrt(2/pi), computed in f32: ggml_gelu reads
            // a 16-bit table, whose rounding alone moves a small Phi's logits by ~1e-3
            const float c = 0.7978845608028654f;
            ggml_tensor * inner = ggml_mul(ctx0, x, ggml_scale_bias(ctx0, ggml_sqr(ctx0, x), 0.044715f * c, c));
            return ggml_mul(ctx0, x, ggml_scale_bias(ctx0, ggml_tanh(ctx0, inner), 0.5f, 0.5f));
        }
        case ACT_RELU:      return ggml_relu(ctx0, x);
    }
    GGML_ABORT("slicegpt: unknown activation");
}

// gated: W_down act(W_gate h) * (W_up h + b_up) + b_down; otherwise W_down act(W_up h + b_up) + b_down
ggml_tensor * llama_model_slicegpt::graph::build_mlp(ggml_tensor * h, int il) const {
    const auto & layer = model.layers[il];

    ggml_tensor * up = build_lora_mm(layer.ffn_up, h);  // [n_ff, n_tokens]
    if (layer.ffn_up_b) {
        up = ggml_add(ctx0, up, layer.ffn_up_b);
    }
    ggml_tensor * cur = model.gated_mlp
        ? ggml_mul(ctx0, build_activation(build_lora_mm(layer.ffn_gate, h)), up)
        : build_activation(up);
    cb(cur, "ffn_act", il);

    cur = build_lora_mm(layer.ffn_down, cur);  // [m_out, n_tokens], or [D, n_tokens] before a post-norm
    if (layer.ffn_down_b) {
        cur = ggml_add(ctx0, cur, layer.ffn_down_b);
    }
    cb(cur, "ffn_out", il);
    return build_post_norm(model.ffn_post_proj[il], cur, il);  // [m_out, n_tokens]
}

template <typename inp_attn_t>
ggml_tensor * llama_model_slicegpt::graph::build_blocks(ggml_tensor * inpL, ggml_tensor * inp_pos, inp_attn_t * inp_attn) const {
    ggml_tensor * inp_out_ids = build_inp_out_ids();

    for (int il = 0; il < n_layer; ++il) {
        ggml_tensor * residual = inpL;                        // [a_in, n_tokens]
        ggml_tensor * h = build_norm_orig(inpL, il);
        ggml_tensor * cur = build_self_attn(h, inp_pos, inp_attn, il);  // [a_out, n_tokens]

        if (il == n_layer - 1 && inp_out_ids) {
            cur      = ggml_get_rows(ctx0, cur,      inp_out_ids);
            residual = ggml_get_rows(ctx0, residual, inp_out_ids);
            h        = ggml_get_rows(ctx0, h,        inp_out_ids);
        }

        if (model.parallel_blocks) {
            // x = S_attn x + attn(h) + mlp(h)
            cur = ggml_add(ctx0, cur, build_mlp(h, il));
            cur = ggml_add(ctx0, cur, build_shortcut(model.attn_shortcut[il], residual, il));
        } else {
            // x = S_attn x + attn(norm(x));  x = S_ffn x + mlp(norm(x))
            ggml_tensor * ffn_inp = ggml_add(ctx0, cur, build_shortcut(model.attn_shortcut[il], residual, il));  // [m_in, n_tokens]
            cb(ffn_inp, "ffn_inp", il);
            cur = build_mlp(build_norm_orig(ffn_inp, il), il);
            cur = ggml_add(ctx0, cur, build_shortcut(model.ffn_shortcut[il], ffn_inp, il));  // [m_out, n_tokens]
        }
        cb(cur, "l_out", il);
        inpL = cur;
    }
    return inpL;
}

llama_model_slicegpt::graph::graph(const llama_model & model_in, const llm_graph_params & params) :
        llm_graph_context(params), model(static_cast<const llama_model_slicegpt &>(model_in)) {
    ggml_tensor * inpL = build_inp_embd(model.tok_embd);  // [d_emb, n_tokens], or [D, n_tokens] when tied
    ggml_tensor * inp_pos = build_inp_pos();

    if (model.tok_embd_proj) {
        inpL = ggml_mul_mat(ctx0, model.tok_embd_proj, inpL);  // [d_emb, n_tokens]
        cb(inpL, "inp_embd_proj", -1);
    }

    if (model.learned_positions) {
        // row = position + offset (OPT: 2)
        ggml_tensor * pos_rows = ggml_view_2d(ctx0, model.pos_embd, model.pos_embd->ne[0], model.pos_embd->ne[1] - model.position_offset,
                                              model.pos_embd->nb[1], model.position_offset * model.pos_embd->nb[1]);
        inpL = ggml_add(ctx0, inpL, ggml_get_rows(ctx0, pos_rows, inp_pos));
        cb(inpL, "inp_embd_pos", -1);
    }

    inpL = hparams.swa_type == LLAMA_SWA_TYPE_NONE
        ? build_blocks(inpL, inp_pos, build_attn_inp_kv())
        : build_blocks(inpL, inp_pos, build_attn_inp_kv_iswa());

    ggml_tensor * cur = build_norm_orig(inpL, -1);  // [d_head, n_tokens]
    cb(cur, "result_norm", -1);
    res->t_embd = cur;

    if (model.output_proj) {
        cur = build_lora_mm(model.output_proj, cur);  // [n_embd, n_tokens]: the tied head's rotation and norm scale
        cb(cur, "result_proj", -1);
    }
    cur = build_lora_mm(model.output, cur);  // [n_vocab, n_tokens]
    if (model.output_b) {
        cur = ggml_add(ctx0, cur, model.output_b);
    }
    if (model.final_softcap > 0.0f) {  // Gemma 2: cap * tanh(logits / cap)
        cur = ggml_scale(ctx0, ggml_tanh(ctx0, ggml_scale(ctx0, cur, 1.0f / model.final_softcap)), model.final_softcap);
    }
    cb(cur, "result_output", -1);
    res->t_logits = cur;

    ggml_build_forward_expand(gf, cur);
}
