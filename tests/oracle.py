"""A plain float64 forward of an *unfused* Llama-family Hugging Face model: the test oracle.

transformers computes RMSNorm and rotary tables in float32 even for a float64 model, so it
cannot witness a 1e-9 agreement; this oracle follows the published equations in whatever
dtype its weights have.  It is checked against transformers itself in float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def llama_like_logits(sd: dict[str, torch.Tensor], cfg: dict, ids: torch.Tensor) -> torch.Tensor:
    D, H = cfg["hidden_size"], cfg["num_attention_heads"]
    K = cfg.get("num_key_value_heads") or H
    hd = cfg.get("head_dim") or D // H
    eps = cfg["rms_norm_eps"]
    theta = (cfg.get("rope_parameters") or {}).get("rope_theta", cfg.get("rope_theta", 10000.0))
    window = cfg.get("sliding_window") if cfg["model_type"] == "mistral" else None
    dtype = sd["model.embed_tokens.weight"].dtype
    B, T = ids.shape

    def norm(x, w):
        return w * (x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps))

    def lin(x, name):
        y = x @ sd[name + ".weight"].T
        return y + sd[name + ".bias"] if name + ".bias" in sd else y

    pos = torch.arange(T, dtype=torch.float64)
    inv = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    ang = torch.cat([pos[:, None] * inv] * 2, -1).to(dtype)  # (T, hd)
    cos, sin = ang.cos(), ang.sin()

    def rope(x):  # (B, h, T, hd)
        x1, x2 = x[..., : hd // 2], x[..., hd // 2 :]
        return x * cos + torch.cat([-x2, x1], -1) * sin

    i, j = torch.arange(T)[:, None], torch.arange(T)[None]
    allowed = j <= i
    if window:
        allowed &= i - j < window
    x = sd["model.embed_tokens.weight"][ids]
    for L in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{L}."
        h = norm(x, sd[p + "input_layernorm.weight"])
        q = rope(lin(h, p + "self_attn.q_proj").view(B, T, H, hd).transpose(1, 2))
        k = rope(lin(h, p + "self_attn.k_proj").view(B, T, K, hd).transpose(1, 2)).repeat_interleave(H // K, 1)
        v = lin(h, p + "self_attn.v_proj").view(B, T, K, hd).transpose(1, 2).repeat_interleave(H // K, 1)
        att = (q @ k.transpose(-1, -2)) / hd**0.5
        att = att.masked_fill(~allowed, float("-inf")).softmax(-1)
        x = x + lin((att @ v).transpose(1, 2).reshape(B, T, H * hd), p + "self_attn.o_proj")
        h = norm(x, sd[p + "post_attention_layernorm.weight"])
        x = x + lin(F.silu(lin(h, p + "mlp.gate_proj")) * lin(h, p + "mlp.up_proj"), p + "mlp.down_proj")
    head = sd.get("lm_head.weight", sd["model.embed_tokens.weight"])
    return norm(x, sd["model.norm.weight"]) @ head.T
