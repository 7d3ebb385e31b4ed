"""Plain forwards of *unfused* Hugging Face models, in whatever dtype their weights have: the test oracle.

transformers computes norms and rotary tables in float32 even for a float64 model, so it
cannot witness a 1e-9 agreement; these follow the published equations directly.  Each is
checked against transformers itself in float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class Oracle:
    def __init__(self, sd: dict[str, torch.Tensor], cfg: dict, ids: torch.Tensor) -> None:
        self.sd, self.cfg, self.ids = sd, cfg, ids
        self.B, self.T = ids.shape
        self.dtype = next(iter(sd.values())).dtype
        i, j = torch.arange(self.T)[:, None], torch.arange(self.T)[None]
        self.allowed = j <= i
        window = cfg.get("sliding_window") if cfg["model_type"] == "mistral" else None
        if window:
            self.allowed &= i - j < window

    def lin(self, x: torch.Tensor, name: str) -> torch.Tensor:
        y = x @ self.sd[name + ".weight"].T
        return y + self.sd[name + ".bias"] if name + ".bias" in self.sd else y

    def rms(self, x: torch.Tensor, name: str, eps: float) -> torch.Tensor:
        return self.sd[name + ".weight"] * (x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps))

    def layer_norm(self, x: torch.Tensor, name: str, eps: float) -> torch.Tensor:
        c = x - x.mean(-1, keepdim=True)
        return self.sd[name + ".weight"] * c / torch.sqrt((c * c).mean(-1, keepdim=True) + eps) + self.sd[name + ".bias"]

    def rope_tables(self, rot: int, theta: float) -> None:
        pos = torch.arange(self.T, dtype=torch.float64)
        inv = 1.0 / theta ** (torch.arange(0, rot, 2, dtype=torch.float64) / rot)
        ang = torch.cat([pos[:, None] * inv] * 2, -1).to(self.dtype)  # (T, rot)
        self.cos, self.sin, self.rot = ang.cos(), ang.sin(), rot

    def rope(self, x: torch.Tensor) -> torch.Tensor:  # (B, h, T, hd): rotate_half on the first `rot` channels
        r, p = x[..., : self.rot], x[..., self.rot :]
        half = self.rot // 2
        r = r * self.cos + torch.cat([-r[..., half:], r[..., :half]], -1) * self.sin
        return torch.cat([r, p], -1)

    def attention(self, h: torch.Tensor, prefix: str, names: tuple[str, str, str, str], H: int, K: int, rope: bool) -> torch.Tensor:
        B, T = self.B, self.T
        hd = h.shape[-1] // H if "head_dim" not in self.cfg or not self.cfg.get("head_dim") else self.cfg["head_dim"]
        q = self.lin(h, prefix + names[0]).view(B, T, H, hd).transpose(1, 2)
        k = self.lin(h, prefix + names[1]).view(B, T, K, hd).transpose(1, 2)
        v = self.lin(h, prefix + names[2]).view(B, T, K, hd).transpose(1, 2)
        if rope:
            q, k = self.rope(q), self.rope(k)
        k, v = k.repeat_interleave(H // K, 1), v.repeat_interleave(H // K, 1)
        att = ((q @ k.transpose(-1, -2)) / hd**0.5).masked_fill(~self.allowed, float("-inf")).softmax(-1)
        return self.lin((att @ v).transpose(1, 2).reshape(B, T, H * hd), prefix + names[3])


def rope_theta(cfg: dict) -> float:
    return (cfg.get("rope_parameters") or {}).get("rope_theta", cfg.get("rope_theta", 10000.0))


def llama_like(o: Oracle) -> torch.Tensor:
    cfg, sd = o.cfg, o.sd
    D, H = cfg["hidden_size"], cfg["num_attention_heads"]
    K, eps = cfg.get("num_key_value_heads") or H, cfg["rms_norm_eps"]
    o.rope_tables(cfg.get("head_dim") or D // H, rope_theta(cfg))
    x = sd["model.embed_tokens.weight"][o.ids]
    for L in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{L}."
        x = x + o.attention(o.rms(x, p + "input_layernorm", eps), p, ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"), H, K, True)
        h = o.rms(x, p + "post_attention_layernorm", eps)
        x = x + o.lin(F.silu(o.lin(h, p + "mlp.gate_proj")) * o.lin(h, p + "mlp.up_proj"), p + "mlp.down_proj")
    return o.rms(x, "model.norm", eps) @ sd.get("lm_head.weight", sd["model.embed_tokens.weight"]).T


def opt(o: Oracle) -> torch.Tensor:
    cfg, sd = o.cfg, o.sd
    H = cfg["num_attention_heads"]
    x = sd["model.decoder.embed_tokens.weight"][o.ids] + sd["model.decoder.embed_positions.weight"][torch.arange(o.T) + 2]
    for L in range(cfg["num_hidden_layers"]):
        p = f"model.decoder.layers.{L}."
        x = x + o.attention(o.layer_norm(x, p + "self_attn_layer_norm", 1e-5), p, ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"), H, H, False)
        x = x + o.lin(F.relu(o.lin(o.layer_norm(x, p + "final_layer_norm", 1e-5), p + "fc1")), p + "fc2")
    return o.layer_norm(x, "model.decoder.final_layer_norm", 1e-5) @ sd.get("lm_head.weight", sd["model.decoder.embed_tokens.weight"]).T


def phi(o: Oracle) -> torch.Tensor:
    cfg, sd = o.cfg, o.sd
    D, H = cfg["hidden_size"], cfg["num_attention_heads"]
    eps = cfg["layer_norm_eps"]
    partial = (cfg.get("rope_parameters") or {}).get("partial_rotary_factor", cfg.get("partial_rotary_factor", 0.5))
    o.rope_tables(int(D // H * partial), rope_theta(cfg))
    x = sd["model.embed_tokens.weight"][o.ids]
    for L in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{L}."
        h = o.layer_norm(x, p + "input_layernorm", eps)
        attn = o.attention(h, p, ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.dense"), H, H, True)
        x = x + attn + o.lin(F.gelu(o.lin(h, p + "mlp.fc1"), approximate="tanh"), p + "mlp.fc2")
    return o.lin(o.layer_norm(x, "model.final_layernorm", eps), "lm_head")


FORWARDS = {"llama": llama_like, "mistral": llama_like, "qwen2": llama_like, "opt": opt, "phi": phi}


def oracle_logits(sd: dict[str, torch.Tensor], cfg: dict, ids: torch.Tensor) -> torch.Tensor:
    return FORWARDS[cfg["model_type"]](Oracle(sd, cfg, ids))
