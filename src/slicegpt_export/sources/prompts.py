"""The project's chat prompts: what the dense model is asked for the ``self-chat`` calibration and for fidelity.

``data/chat_prompts.jsonl`` holds 420 prompts written for this project (instructions,
questions, explanations, short code, reasoning, creative writing, advice and multi-turn
dialogue), one JSON object per line: ``{"category": ..., "turns": [user, assistant, ..., user]}``.
One prompt in every :data:`HELDOUT_EVERY` (by position in the file, so every category is
represented) is held out: never used for calibration or recovery training, only to measure
how closely a sliced model follows the dense one.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any

from slicegpt_export.errors import SliceGPTError

PROMPTS_FILE = Path(__file__).parent / "data" / "chat_prompts.jsonl"
HELDOUT_EVERY = 8  # prompt i is held out when i % HELDOUT_EVERY == HELDOUT_EVERY - 1


@dataclasses.dataclass(frozen=True)
class ChatPrompt:
    category: str
    turns: tuple[str, ...]  # user, assistant, user, ...: an odd number, ending with the user's turn

    def messages(self) -> list[dict[str, str]]:
        """The conversation in the chat-template form [{"role": ..., "content": ...}, ...]."""
        return [{"role": "user" if k % 2 == 0 else "assistant", "content": text} for k, text in enumerate(self.turns)]


@cache
def all_prompts() -> tuple[ChatPrompt, ...]:
    rows = [json.loads(line) for line in PROMPTS_FILE.read_text(encoding="utf-8").splitlines() if line.strip()]
    return tuple(ChatPrompt(r["category"], tuple(r["turns"])) for r in rows)


def calibration_prompts() -> list[ChatPrompt]:
    """The prompts calibration and recovery may use (7 in 8)."""
    return [p for i, p in enumerate(all_prompts()) if i % HELDOUT_EVERY != HELDOUT_EVERY - 1]


def heldout_prompts() -> list[ChatPrompt]:
    """The prompts kept for the fidelity measurement (1 in 8)."""
    return [p for i, p in enumerate(all_prompts()) if i % HELDOUT_EVERY == HELDOUT_EVERY - 1]


def chat_ids(tokenizer: Any, prompt: ChatPrompt) -> list[int]:
    """The prompt formatted with the tokenizer's chat template, ending with the assistant's turn opening."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise SliceGPTError("chat prompts need a tokenizer with a chat template, and this model's tokenizer has none")
    out = tokenizer.apply_chat_template(prompt.messages(), add_generation_prompt=True, tokenize=True)
    return list(out["input_ids"] if isinstance(out, Mapping) else out)


def stop_token(tokenizer: Any) -> int | None:
    """The token that ends an answer: the tokenizer's end-of-sequence token."""
    return getattr(tokenizer, "eos_token_id", None)
