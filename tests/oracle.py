"""Plain forwards of *unfused* Hugging Face models, in whatever dtype their weights have: the test oracle.

transformers computes norms and rotary tables in float32 even for a float64 model, so it
cannot witness a 1e-9 agreement; these follow the published equations directly.  Each is
checked against transformers itself in float32.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


class Oracle:
    def __init__(self, sd: dict[str, torch.Tensor], cfg: dict, ids: torch.Tensor) -> None:
        self.sd, self.cfg, self.ids = sd, cfg, ids
        self.B, self.T = ids.shape
        self.dtype = next(iter(sd.values())).dtype
        i, j = torch.arange(self.T)[:, None], torch.arange(self.T)[None]
        self.allowed = j <= i
        window = cfg.get("sliding_window") if cfg["model_type"] in ("mistral", "phi3") else None
        if window:
            self.allowed &= i - j < window
        self.causal = self.allowed
        self.windowed = self.causal & (i - j < (cfg.get("sliding_window") or self.T))  # Gemma's sliding layers

    def lin(self, x: torch.Tensor, name: str) -> torch.Tensor:
        y = x @ self.sd[name + ".weight"].T
        return y + self.sd[name + ".bias"] if name + ".bias" in self.sd else y

    def rms(self, x: torch.Tensor, name: str, eps: float) -> torch.Tensor:
        return self.sd[name + ".weight"] * (x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps))

    def layer_norm(self, x: torch.Tensor, name: str, eps: float) -> torch.Tensor:
        c = x - x.mean(-1, keepdim=True)
        return self.sd[name + ".weight"] * c / torch.sqrt((c * c).mean(-1, keepdim=True) + eps) + self.sd[name + ".bias"]

    def rope_tables(self, rot: int, theta: float, divisors: list[float] | None = None, scale: float = 1.0) -> None:
        pos = torch.arange(self.T, dtype=torch.float64)
        inv = 1.0 / theta ** (torch.arange(0, rot, 2, dtype=torch.float64) / rot)
        if divisors is not None:  # LongRoPE: inv_freq / factor_i
            inv = inv / torch.tensor(divisors, dtype=torch.float64)
        ang = torch.cat([pos[:, None] * inv] * 2, -1)  # (T, rot)
        self.cos, self.sin, self.rot = (ang.cos() * scale).to(self.dtype), (ang.sin() * scale).to(self.dtype), rot

    def rope(self, x: torch.Tensor) -> torch.Tensor:  # (B, h, T, hd): rotate_half on the first `rot` channels
        r, p = x[..., : self.rot], x[..., self.rot :]
        half = self.rot // 2
        r = r * self.cos + torch.cat([-r[..., half:], r[..., :half]], -1) * self.sin
        return torch.cat([r, p], -1)

    def head_dim(self, H: int) -> int:
        return self.cfg.get("head_dim") or self.cfg["hidden_size"] // H

    def attention(self, h: torch.Tensor, prefix: str, names: tuple[str, str, str, str], H: int, K: int, rope: bool) -> torch.Tensor:
        if rope and self.cfg.get("no_rope_layers") is not None:  # SmolLM3: 0 = this layer has no rope
            rope = bool(self.cfg["no_rope_layers"][int(prefix.split(".")[2])])
        B, T, hd = self.B, self.T, self.head_dim(H)
        if names[0].endswith("qkv_proj"):  # Phi-3: one fused matrix, rows q | k | v
            q, k, v = self.lin(h, prefix + names[0]).split([H * hd, K * hd, K * hd], -1)
        else:
            q, k, v = (self.lin(h, prefix + n) for n in names[:3])
        q, k, v = q.view(B, T, H, hd).transpose(1, 2), k.view(B, T, K, hd).transpose(1, 2), v.view(B, T, K, hd).transpose(1, 2)
        if prefix + "self_attn.q_norm.weight" in self.sd:  # Qwen3: per-head RMSNorm of queries and keys
            q = self.rms(q, prefix + "self_attn.q_norm", self.cfg["rms_norm_eps"])
            k = self.rms(k, prefix + "self_attn.k_norm", self.cfg["rms_norm_eps"])
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
    o.rope_tables(o.head_dim(H), rope_theta(cfg))
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


def phi3(o: Oracle) -> torch.Tensor:
    """Phi-3: fused qkv and gate_up (gate rows first), partial rotary with LongRoPE (short factors: T <= original)."""
    cfg, sd = o.cfg, o.sd
    H, K, eps = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["rms_norm_eps"]
    rope = cfg["rope_parameters"]
    original = cfg["original_max_position_embeddings"]
    factor = cfg["max_position_embeddings"] / original
    assert o.T <= original, "the oracle implements LongRoPE's short factors only"
    o.rope_tables(int(o.head_dim(H) * rope["partial_rotary_factor"]), rope["rope_theta"], rope["short_factor"],
                  math.sqrt(1 + math.log(factor) / math.log(original)))  # fmt: skip
    x = sd["model.embed_tokens.weight"][o.ids]
    for L in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{L}."
        x = x + o.attention(o.rms(x, p + "input_layernorm", eps), p, ("self_attn.qkv_proj", "", "", "self_attn.o_proj"), H, K, True)
        gate, up = o.lin(o.rms(x, p + "post_attention_layernorm", eps), p + "mlp.gate_up_proj").chunk(2, -1)
        x = x + o.lin(F.silu(gate) * up, p + "mlp.down_proj")
    return o.rms(x, "model.norm", eps) @ sd.get("lm_head.weight", sd["model.embed_tokens.weight"]).T


def gemma(o: Oracle) -> torch.Tensor:
    """Gemma 2 / 3: (1 + w) norms, sqrt(D) embeddings, post-norms, GeGLU, query_pre_attn_scalar, soft-capping (2),
    q/k norms and per-layer-type rope (3), sliding layers beside global ones."""
    cfg, sd = o.cfg, o.sd
    D, H, K, hd, eps = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"], cfg["rms_norm_eps"]
    B, T = o.B, o.T

    def norm(x: torch.Tensor, name: str) -> torch.Tensor:
        return (1 + sd[name + ".weight"]) * (x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps))

    def ropes(layer_type: str) -> tuple[torch.Tensor, torch.Tensor]:
        params = cfg["rope_parameters"].get(layer_type, cfg["rope_parameters"])
        o.rope_tables(hd, params["rope_theta"], [params.get("factor", 1.0)] * (hd // 2) if params.get("rope_type") == "linear" else None)
        return o.cos, o.sin

    x = sd["model.embed_tokens.weight"][o.ids] * D**0.5
    for L in range(cfg["num_hidden_layers"]):
        p, layer_type = f"model.layers.{L}.", cfg["layer_types"][L]
        o.cos, o.sin = ropes(layer_type)
        h = norm(x, p + "input_layernorm")
        q = o.lin(h, p + "self_attn.q_proj").view(B, T, H, hd).transpose(1, 2)
        k = o.lin(h, p + "self_attn.k_proj").view(B, T, K, hd).transpose(1, 2)
        v = o.lin(h, p + "self_attn.v_proj").view(B, T, K, hd).transpose(1, 2)
        if p + "self_attn.q_norm.weight" in sd:
            q, k = norm(q, p + "self_attn.q_norm"), norm(k, p + "self_attn.k_norm")
        q, k = o.rope(q), o.rope(k)
        k, v = k.repeat_interleave(H // K, 1), v.repeat_interleave(H // K, 1)
        scores = (q @ k.transpose(-1, -2)) * cfg["query_pre_attn_scalar"] ** -0.5
        if cfg.get("attn_logit_softcapping"):
            scores = cfg["attn_logit_softcapping"] * torch.tanh(scores / cfg["attn_logit_softcapping"])
        allowed = o.windowed if layer_type == "sliding_attention" else o.causal
        att = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
        y = o.lin((att @ v).transpose(1, 2).reshape(B, T, H * hd), p + "self_attn.o_proj")
        x = x + norm(y, p + "post_attention_layernorm")
        h = norm(x, p + "pre_feedforward_layernorm")
        y = o.lin(F.gelu(o.lin(h, p + "mlp.gate_proj"), approximate="tanh") * o.lin(h, p + "mlp.up_proj"), p + "mlp.down_proj")
        x = x + norm(y, p + "post_feedforward_layernorm")
    logits = norm(x, "model.norm") @ sd.get("lm_head.weight", sd["model.embed_tokens.weight"]).T
    cap = cfg.get("final_logit_softcapping")
    return cap * torch.tanh(logits / cap) if cap else logits


FORWARDS = {"gemma2": gemma, "gemma3_text": gemma, "llama": llama_like, "mistral": llama_like, "qwen2": llama_like, "qwen3": llama_like, "smollm3": llama_like, "opt": opt, "phi": phi, "phi3": phi3}


def oracle_logits(sd: dict[str, torch.Tensor], cfg: dict, ids: torch.Tensor) -> torch.Tensor:
    return FORWARDS[cfg["model_type"]](Oracle(sd, cfg, ids))
