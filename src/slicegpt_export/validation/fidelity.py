"""Quality beyond the calibration domain: how closely the sliced model follows the dense one where it is used.

* **Fidelity**: the dense model answers the held-out chat prompts (never used for
  calibration or recovery; :func:`slicegpt_export.sources.prompts.heldout_prompts`), and on
  every answer token the sliced model's next-token distribution is compared with the dense
  one: mean KL(p_dense || p_sliced) and top-1 agreement (both models read the same text).
* **Answers side by side**: greedy continuations of a few prompts by both models.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from slicegpt_export.modeling import ReferenceOutput, generate
from slicegpt_export.sources.generation import GenerationSettings, generate_cached
from slicegpt_export.sources.prompts import ChatPrompt, chat_ids, heldout_prompts, stop_token

logger = logging.getLogger(__name__)

FIDELITY_ANSWER_TOKENS = 256
FIDELITY_TEMPERATURE = 0.0  # greedy: the answer the dense model gives when used deterministically
FIDELITY_SEED = 0
ANSWER_TOKENS = 24  # greedy tokens shown per prompt in the report
PLAIN_PROMPTS = ("The capital of France is", "The largest planet in the solar system is", "def fibonacci(n):")
CHAT_PROMPTS_SHOWN = 3  # the first held-out chat prompts also shown side by side


class TransformersLM(nn.Module):
    """A transformers causal LM called like modeling.SlicedModel (transformers 5 renamed `past_key_values` to `cache`)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        from transformers.modeling_outputs import CausalLMOutputWithPast

        self.cache_name = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, past_key_values: Any = None,
                use_cache: bool = False) -> ReferenceOutput:  # fmt: skip
        cache = {self.cache_name: past_key_values} if past_key_values is not None else {}
        out = self.model(input_ids, attention_mask=attention_mask, use_cache=use_cache or past_key_values is not None, **cache)
        return ReferenceOutput(out.logits, getattr(out, self.cache_name, None))


@dataclasses.dataclass
class Fidelity:
    kl_divergence: float  # mean KL(dense || sliced) per answer token, nats
    top1_agreement: float  # fraction of answer tokens where both models' most likely next token is the same
    tokens: int
    prompts: int

    def to_dict(self) -> dict[str, float | int]:
        return dataclasses.asdict(self)


def dense_answers(
    dense: nn.Module, tokenizer: Any, prompts: list[ChatPrompt], *, cache_dir: Path | None, progress: bool
) -> tuple[list[list[int]], list[int]]:
    """Each prompt formatted with the chat template followed by the dense model's greedy answer (cached), and the prompt lengths."""
    ids = [chat_ids(tokenizer, p) for p in prompts]
    stop = stop_token(tokenizer)
    settings = GenerationSettings(max_new_tokens=FIDELITY_ANSWER_TOKENS, temperature=FIDELITY_TEMPERATURE, seed=FIDELITY_SEED,
                                  stop_token_id=stop, pad_token_id=stop if stop is not None else 0)  # fmt: skip
    answers = generate_cached(dense, ids, settings, cache_dir=cache_dir, desc="fidelity: dense answers", progress=progress)
    return [p + a for p, a in zip(ids, answers)], [len(p) for p in ids]


@torch.no_grad()
def fidelity(
    dense: nn.Module, sliced: nn.Module, tokenizer: Any, *, cache_dir: Path | None = None, progress: bool = True
) -> Fidelity:
    """KL(dense || sliced) and top-1 agreement on the answer tokens of the dense model's answers to the held-out prompts."""
    prompts = heldout_prompts()
    conversations, prompt_lengths = dense_answers(dense, tokenizer, prompts, cache_dir=cache_dir, progress=progress)
    total_kl, agree, count = 0.0, 0, 0
    for ids, start in tqdm(list(zip(conversations, prompt_lengths)), desc="fidelity: comparing", unit="text", disable=not progress):
        x = torch.tensor([ids])  # (1, T)
        answer = slice(start - 1, len(ids) - 1)  # positions that predict the answer tokens
        p = F.log_softmax(dense(x).logits[0, answer].float(), dim=-1)  # (A, V)
        q = F.log_softmax(sliced(x).logits[0, answer].float(), dim=-1)
        total_kl += F.kl_div(q, p, log_target=True, reduction="sum").item()
        agree += (p.argmax(-1) == q.argmax(-1)).sum().item()
        count += p.shape[0]
    return Fidelity(max(total_kl / max(count, 1), 0.0), agree / max(count, 1), count, len(prompts))


def shown_prompts(tokenizer: Any) -> list[tuple[str, list[int]]]:
    """(label, token ids) of the prompts answered side by side: plain continuations, then held-out chat prompts."""
    rows = [(text, tokenizer(text, add_special_tokens=False)["input_ids"]) for text in PLAIN_PROMPTS]
    if getattr(tokenizer, "chat_template", None):
        rows += [(f"[chat] {p.turns[-1]}", chat_ids(tokenizer, p)) for p in heldout_prompts()[:CHAT_PROMPTS_SHOWN]]
    return rows


@torch.no_grad()
def greedy_answers(dense: nn.Module, sliced: nn.Module, tokenizer: Any, *, max_new_tokens: int = ANSWER_TOKENS) -> list[dict[str, str]]:
    """Greedy continuations of :func:`shown_prompts` by both models: [{"prompt", "dense", "sliced"}]."""
    stop = stop_token(tokenizer)
    rows = []
    for label, ids in shown_prompts(tokenizer):
        x = torch.tensor([ids])
        texts = {}
        for name, model in (("dense", dense), ("sliced", sliced)):
            new = generate(model, x, max_new_tokens=max_new_tokens, stop_token_id=stop)[0, len(ids) :].tolist()
            texts[name] = tokenizer.decode(new, skip_special_tokens=True)
        rows.append({"prompt": label, **texts})
    return rows


def quality_beyond_calibration(checkpoint: Path, *, cache_dir: Path | None = None, progress: bool = True) -> dict[str, Any] | None:
    """Fidelity and greedy answers of a sliced checkpoint against its dense source; None when the source is not at hand."""
    from slicegpt_export.checkpoint import load_sliced, read_config
    from slicegpt_export.sources.models import dense_model, load_source
    from slicegpt_export.sources.tokenizer import load_tokenizer

    cfg, _ = read_config(checkpoint)
    tokenizer = load_tokenizer(Path(checkpoint))
    if not cfg.source_model or not Path(cfg.source_model).exists() or tokenizer is None:
        logger.info("no fidelity measurement: the dense source %r or the tokenizer is not at hand", cfg.source_model)
        return None
    dense = TransformersLM(dense_model(load_source(cfg.source_model)))
    sliced = load_sliced(checkpoint)
    quality: dict[str, Any] = {"answers": greedy_answers(dense, sliced, tokenizer)}
    if getattr(tokenizer, "chat_template", None):
        quality["fidelity"] = fidelity(dense, sliced, tokenizer, cache_dir=cache_dir, progress=progress).to_dict()
    return quality
