"""A GGUF file run by llama.cpp itself, through llama-cpp-python built with integrations/llama.cpp.

`scripts/build_llama_cpp.sh` builds the bindings with the `slicegpt` architecture; a stock
llama-cpp-python refuses `slicegpt` files (unknown model architecture).  The KV cache is kept in
f32 here (llama.cpp's default is f16) so that an f32 file is compared with the reference at f32.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from slicegpt_export.errors import SliceGPTError

logger = logging.getLogger(__name__)

GGML_TYPE_F32 = 0
SLICEGPT_BUILD_TAG = "+slicegpt."


def import_llama_cpp() -> Any:
    """The llama_cpp module when it was built with the slicegpt architecture; a one-line error otherwise."""
    try:
        import llama_cpp
    except ImportError as exc:
        raise SliceGPTError("llama-cpp-python is not installed: run scripts/build_llama_cpp.sh") from exc
    if SLICEGPT_BUILD_TAG not in llama_cpp.__version__:
        raise SliceGPTError(f"llama-cpp-python {llama_cpp.__version__} is a stock build without the slicegpt "
                            "architecture: run scripts/build_llama_cpp.sh")  # fmt: skip
    return llama_cpp


def llama_cpp_available() -> bool:
    """Whether llama.cpp with the slicegpt architecture can run GGUF files here (the reason is logged when not)."""
    try:
        import_llama_cpp()
    except SliceGPTError as exc:
        logger.info("GGUF files are not run in llama.cpp: %s", exc)
        return False
    return True


class LlamaCppModel:
    """One llama.cpp context over a GGUF file: full-sequence logits and greedy generation."""

    def __init__(self, path: str | Path, *, n_ctx: int = 512, n_threads: int | None = None) -> None:
        llama_cpp = import_llama_cpp()
        self.path = Path(path)
        if not self.path.is_file():
            raise SliceGPTError(f"{self.path}: no such GGUF file")
        try:
            self.llm = llama_cpp.Llama(
                model_path=str(self.path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=True,
                n_threads=n_threads or os.cpu_count(), type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32, verbose=False,
            )  # fmt: skip
        except ValueError as exc:  # llama.cpp logs its reason and the bindings raise "Failed to load model"
            raise SliceGPTError(f"{self.path}: llama.cpp could not load the file ({exc})") from exc
        self.n_ctx = n_ctx
        self.vocab = llama_cpp.llama_model_get_vocab(self.llm.model)
        self.is_eog = llama_cpp.llama_vocab_is_eog

    def sequence_logits(self, ids: list[int]) -> np.ndarray:
        """Logits for every position of one sequence from an empty cache.  (T, vocab) float32."""
        if len(ids) > self.n_ctx:
            raise SliceGPTError(f"{len(ids)} tokens exceed the context of {self.n_ctx}")
        self.llm.reset()
        self.llm.eval(ids)
        return np.array(self.llm.scores[: len(ids)], dtype=np.float32)

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T) token ids -> (B, T, vocab) logits, one sequence at a time."""
        return torch.stack([torch.from_numpy(self.sequence_logits(row.tolist())) for row in input_ids])

    def greedy(self, prompt: list[int], max_new_tokens: int, *, stop_at_end: bool = False) -> list[int]:
        """Argmax continuation through llama.cpp's own sampler and KV cache, the prompt evaluated afresh.

        With `stop_at_end` it ends before an end-of-generation token (end of text, end of turn), as
        llama-server and llama-cli do.  The explicit reset matters: `generate` alone keeps the longest
        prefix shared with the previous call and evaluates only the rest, one token where the prompt
        repeats, whose logits can differ in the last bits from a batched prompt's and flip a near-tie.
        """
        out: list[int] = []
        self.llm.reset()
        for token in self.llm.generate(prompt, top_k=1, temp=0.0, reset=True):
            if stop_at_end and self.is_eog(self.vocab, int(token)):
                break
            out.append(int(token))
            if len(out) == max_new_tokens:
                break
        return out

    def decode_tokens_per_second(self, prompt: list[int], new_tokens: int) -> float:
        """Tokens per second of one-token decode steps after a prefill of `prompt` (greedy, single sequence)."""
        self.llm.reset()
        self.llm.eval(prompt)
        token = int(np.argmax(self.llm.scores[len(prompt) - 1]))
        start = time.perf_counter()
        for _ in range(new_tokens):
            self.llm.eval([token])
            token = int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))
        return new_tokens / (time.perf_counter() - start)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.llm.close()
