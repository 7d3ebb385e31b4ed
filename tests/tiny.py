"""Tiny random Hugging Face models and a byte-level tokenizer, built from configs for exactness tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

VOCAB = 256

#: LongRoPE of the tiny Phi-3: rotary dim 16 * 0.75 = 12, so 6 factors of each kind
PHI3_LONGROPE = {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.75,
                 "short_factor": [1.0, 1.1, 1.3, 1.7, 2.2, 3.0], "long_factor": [1.0, 1.5, 2.5, 4.0, 6.0, 9.0]}  # fmt: skip
#: model_type -> (config class name, config kwargs); one entry per supported family variant
TINY_CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", dict(num_key_value_heads=2, tie_word_embeddings=False)),
    "llama-tied": ("LlamaConfig", dict(num_key_value_heads=2, tie_word_embeddings=True)),
    "mistral": ("MistralConfig", dict(num_key_value_heads=2, sliding_window=12)),
    "qwen2": ("Qwen2Config", dict(num_key_value_heads=2, tie_word_embeddings=True)),
    "opt": ("OPTConfig", dict(ffn_dim=96, dropout=0.0)),
    "phi": ("PhiConfig", dict(partial_rotary_factor=0.5)),
    # q/k norms, head_dim independent of D (16)
    "qwen3": ("Qwen3Config", dict(num_key_value_heads=2, head_dim=24, tie_word_embeddings=True)),
    # Phi-4-mini's shape: fused qkv / gate_up, partial rotary, LongRoPE (short factors within the 256 original
    # positions, attention factor sqrt(1 + ln 4 / ln 256) from 1024 / 256), tied head; plus a sliding window.
    # 256: llama.cpp rounds its context up to a multiple of 256 and picks the long factors beyond the original context
    "phi3": ("Phi3Config", dict(num_key_value_heads=2, tie_word_embeddings=True, sliding_window=12, pad_token_id=VOCAB - 1,
                                max_position_embeddings=1024, original_max_position_embeddings=256, rope_parameters=PHI3_LONGROPE)),
    # NoPE on every second layer (SmolLM3's default: every fourth)
    "smollm3": ("SmolLM3Config", dict(num_key_value_heads=2, no_rope_layer_interval=2, pad_token_id=VOCAB - 1)),
    # post-norms, (1 + w) norms, sqrt(D) embeddings, GeGLU, head_dim 24, query_pre_attn_scalar; a sliding layer then a
    # global one; soft-capping low enough to bite on a random model
    "gemma2": ("Gemma2Config", dict(num_key_value_heads=2, head_dim=24, query_pre_attn_scalar=20, sliding_window=12,
                                    attn_logit_softcapping=2.0, final_logit_softcapping=5.0)),
    # Gemma 3: q/k norms, global layers with their own (linearly scaled) rope, sliding layers with a local base; a softer
    # softmax scale than Gemma 2's tiny model (with 20, transformers' own float32 logits stray 1.2e-5 from float64)
    "gemma3_text": ("Gemma3TextConfig", dict(num_key_value_heads=2, head_dim=24, query_pre_attn_scalar=96, sliding_window=12,
                                             layer_types=["sliding_attention", "full_attention"], rope_parameters={
                                                 "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 50000.0},
                                                 "sliding_attention": {"rope_type": "default", "rope_theta": 1000.0}})),
}
#: further variants some tests use on top of the family list
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama-rope-llama3": ("LlamaConfig", dict(num_key_value_heads=2, tie_word_embeddings=False, rope_parameters={
        "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16})),
}  # fmt: skip
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=256,
    initializer_range=0.1,  # peaked logits: with transformers' 0.02 the top-1 of a random model is a near-tie
)


def tiny_hf_model(name: str, *, dtype: torch.dtype = torch.float32, seed: int = 0):
    """A random HF causal LM whose norms have random (non-unit) scales and biases, so fusion has work to do."""
    import transformers

    cls_name, extra = (TINY_CONFIGS | VARIANTS)[name]
    config = getattr(transformers, cls_name)(**{**COMMON, **extra})
    if cls_name == "OPTConfig":  # OPT names its MLP width ffn_dim and has no intermediate_size
        config.word_embed_proj_dim = config.hidden_size
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname:
                p.copy_(torch.rand_like(p) + 0.5 if pname.endswith("weight") else torch.randn_like(p) * 0.1)
            elif pname.endswith("bias"):
                p.copy_(torch.randn_like(p) * 0.1)
    return model.to(dtype)


def byte_tokenizer():
    """A byte-level BPE tokenizer with no merges: 256 tokens, one per byte; begin/end of text is id 255."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(pre_tokenizers.ByteLevel.alphabet())}
    vocab = {tok: i for i, tok in enumerate(sorted(vocab))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    last = max(vocab, key=vocab.get)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=last, eos_token=last)


#: a ChatML template, the shape of SmolLM2's and Qwen2's
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def chat_tokenizer():
    """A byte-level BPE tokenizer with ChatML special tokens and template, in the tiny models' 256 ids: one token
    per byte but 0xFE and 0xFF (never part of UTF-8 text) as ids 0-253, then <|im_start|> (254, BOS) and
    <|im_end|> (255, EOS)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(sorted(set(pre_tokenizers.ByteLevel.alphabet()) - {"\xfe", "\xff"}))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>", chat_template=CHAT_TEMPLATE
    )


#: a chat template for the byte tokenizer (role tags in angle brackets; the answer ends with the end-of-text byte 255)
BYTE_CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def save_tiny_model(name: str, folder: Path, *, seed: int = 0, train_on: Path | None = None, chat: bool = False) -> Path:
    """Write a tiny model (safetensors + config.json + byte tokenizer) as a Hugging Face folder.

    With `train_on` (a text file) the model first gets 300 training steps on its bytes; with
    `chat` the tokenizer gets :data:`BYTE_CHAT_TEMPLATE`.
    """
    model = tiny_hf_model(name, seed=seed)
    if train_on is not None:
        train(model, byte_ids(train_on)[:200_000], 300)
    model.save_pretrained(folder)
    tokenizer = byte_tokenizer()
    if chat:
        tokenizer.chat_template = BYTE_CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    return folder


#: slicings the runtime suites cover besides plain sparsities: budgets with every structural option
#: (one shortcut per block or none, per-layer widths, pruned MLPs alone or with them, a sliced tied embedding matrix)
SLICINGS: dict[str, dict[str, Any]] = {
    "budget": {"target_params": 0.8, "rotation": "block", "allocation": "spectrum", "ffn_keep": 0.7},
    "budget-tied": {"target_params": 0.8, "rotation": "block", "allocation": "spectrum", "ffn_keep": 0.7, "embed_keep": 0.75},
    "budget-global": {"target_params": 0.8, "rotation": "global", "ffn_keep": 0.7},
    "budget-none": {"target_params": 0.85, "rotation": "none"},  # MLP neurons only, as many as fit
}
#: (family, slicing) pairs beside each family's sparsities 0 and 0.25 in the ONNX, GGUF and llama.cpp suites
BUDGET_CASES = [("llama-tied", "budget-tied"), ("llama-tied", "budget-none"), ("opt", "budget-global"), ("phi", "budget"), ("qwen2", "budget")]


def slice_options(slicing: float | str) -> dict[str, Any]:
    return {"sparsity": slicing} if isinstance(slicing, float) else SLICINGS[slicing]


def write_sliced_checkpoint(name: str, slicing: float | str, folder: Path, *, train_on: Path | None = None) -> Path:
    """Slice a tiny model (a sparsity, or a name from SLICINGS) on random calibration tokens; save it with the byte tokenizer.

    With `train_on` (a text file) the model first gets 300 training steps on its bytes.  The
    end-of-text id is set to VOCAB - 1, which greedy decoding of these models does not reach
    in the tests, so generation runs its full length in every runtime.
    """
    from slicegpt_export.checkpoint import save_checkpoint
    from slicegpt_export.converter.convert import slice_source
    from slicegpt_export.sources.models import SourceModel

    hf = tiny_hf_model(name)
    if train_on is not None:
        train(hf, byte_ids(train_on)[:200_000], 300)
    hf.config.eos_token_id = hf.config.bos_token_id = VOCAB - 1
    sd = {k: v.clone() for k, v in hf.state_dict().items()}
    if hf.config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    calib = torch.randint(0, VOCAB, (8, 32), generator=torch.Generator().manual_seed(1))
    model, cfg = slice_source(SourceModel(hf.config.to_dict(), sd, None, name), calib, **slice_options(slicing))
    # named "tiny", not after the family: llama.cpp applies Phi-3's vocabulary fixes to a file whose name says phi3,
    # and the byte vocabulary lacks the tokens they touch
    cfg.source_model = "tiny"
    save_checkpoint(folder, tensors=model.named_weights(), config=cfg, base_config=hf.config.to_dict())
    byte_tokenizer().save_pretrained(folder)
    return folder


SEQLEN = 64  # training and evaluation windows of the trained tiny models


def byte_ids(path: Path) -> torch.Tensor:
    """A text file as byte tokens (the byte tokenizer's ids)."""
    return torch.tensor(list(path.read_bytes()), dtype=torch.long)


def train(model, ids: torch.Tensor, steps: int) -> None:
    """A few hundred AdamW steps on random 64-byte windows: enough for a real, peaked next-token signal."""
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    with torch.enable_grad():
        for _ in range(steps):
            starts = torch.randint(0, ids.numel() - SEQLEN, (16,), generator=gen)
            batch = torch.stack([ids[s : s + SEQLEN] for s in starts.tolist()])
            loss = model(batch, labels=batch).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
