"""Text: local files and folders, Hugging Face datasets, tokenized once and cut into token windows."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from slicegpt_export.errors import SliceGPTError
from slicegpt_export.sources.builtin_text import builtin_text

logger = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".jsonl", ".parquet")


def read_text_file(path: Path) -> str:
    """The text of a .txt file, or the `text` fields of a .jsonl or .parquet file joined by blank lines."""
    try:
        if path.suffix == ".txt":
            return path.read_text(encoding="utf-8")
        if path.suffix == ".jsonl":
            rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
            return "\n\n".join(str(r["text"]) for r in rows)
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            return "\n\n".join(str(t) for t in pq.read_table(path, columns=["text"]).column("text").to_pylist())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise SliceGPTError(f"cannot read calibration file {path}: {exc}") from exc
    except Exception as exc:  # pyarrow's own error types
        raise SliceGPTError(f"cannot read calibration file {path}: {type(exc).__name__}: {exc}") from exc
    raise SliceGPTError(f"calibration file {path} is not one of {', '.join(TEXT_SUFFIXES)}")


def read_local_text(path: Path) -> str:
    """A file's text, or the texts of every supported file of a folder (sorted by name) joined by blank lines."""
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES and p.is_file())
        if not files:
            raise SliceGPTError(f"calibration folder {path} holds no {', '.join(TEXT_SUFFIXES)} files")
        return "\n\n".join(read_text_file(p) for p in files)
    if not path.is_file():
        raise SliceGPTError(f"calibration file {path} does not exist")
    return read_text_file(path)


def read_hub_dataset(name: str) -> str:
    """The train split's `text` column of a Hugging Face dataset given as NAME or NAME:CONFIG (needs `datasets`)."""
    try:
        import datasets
    except ImportError as exc:
        raise SliceGPTError(f"calibration dataset {name!r} needs the `datasets` package (pip install datasets)") from exc
    dataset, _, config = name.partition(":")
    try:
        data = datasets.load_dataset(dataset, config or None, split="train")
    except Exception as exc:  # network and missing-dataset errors end the same way
        raise SliceGPTError(f"cannot load calibration dataset {name!r}: {type(exc).__name__}: {exc}") from exc
    return "\n\n".join(data["text"])


def tokenize_text(text: str, tokenizer: Any, *, special_tokens: bool = True) -> torch.Tensor:
    """The whole text tokenized once, as the protocol does (with the tokenizer's own special tokens unless told); (N,) int64."""
    if tokenizer is None:
        raise SliceGPTError("the source model has no tokenizer, so calibration text cannot be tokenized")
    logging.getLogger("transformers.tokenization_utils_base").setLevel(logging.ERROR)  # "sequence too long" is expected
    return torch.tensor(tokenizer(text, add_special_tokens=special_tokens)["input_ids"], dtype=torch.long)


def window_bos(tokenizer: Any, bos_windows: bool) -> int | None:
    """The BOS id that starts every window of a model trained to always see it (Gemma), else None."""
    if not bos_windows:
        return None
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        raise SliceGPTError("this model starts every window with BOS, but its tokenizer has no bos_token_id")
    return int(bos)


def with_bos(windows: torch.Tensor, bos: int | None) -> torch.Tensor:
    """(n, T - 1) text windows behind a BOS column -> (n, T); unchanged when bos is None."""
    if bos is None:
        return windows
    return torch.cat([torch.full((windows.shape[0], 1), bos, dtype=windows.dtype), windows], dim=1)


def sample_windows(ids: torch.Tensor, *, samples: int, seqlen: int, seed: int, bos: int | None = None) -> torch.Tensor:
    """`samples` windows of `seqlen` tokens from the 1-D `ids`, starting at randint(0, N - seqlen + 1).

    With a fresh generator seeded `seed` this draws exactly what `torch.manual_seed(seed);
    torch.randint(0, N - seqlen + 1, (samples,))` draws.  With `bos` each window is BOS then
    seqlen - 1 text tokens (drawn the same way for seqlen - 1).  Returns (samples, seqlen) int64.
    """
    text_len = seqlen - (bos is not None)
    n = ids.numel()
    if n < text_len:
        raise SliceGPTError(f"too little calibration text: {n} tokens, fewer than one sample of {text_len}")
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, n - text_len + 1, (samples,), generator=generator)
    return with_bos(torch.stack([ids[s : s + text_len] for s in starts.tolist()]), bos)


def evaluation_windows(ids: torch.Tensor, *, seqlen: int, windows: int | None, bos: int | None = None) -> torch.Tensor:
    """The first `windows` consecutive windows of `seqlen` tokens (all complete ones when None); (n, seqlen).

    With `bos` each window is BOS then the next seqlen - 1 text tokens.
    """
    text_len = seqlen - (bos is not None)
    available = ids.numel() // text_len
    if available == 0:
        raise SliceGPTError(f"evaluation text has {ids.numel()} tokens, fewer than one window of {text_len}")
    n = available if windows is None else min(windows, available)
    return with_bos(ids[: n * text_len].view(n, text_len), bos)


def text_windows(path: Path, tokenizer: Any, *, seqlen: int, windows: int | None, bos: int | None = None) -> torch.Tensor:
    """The first consecutive windows of a local text file or folder, or of a built-in text (e.g. python-stdlib), tokenized once.

    With `bos` (a model trained to always see BOS) the text is tokenized without special tokens and every window starts with BOS.
    """
    text = builtin_text(path)
    text = read_local_text(Path(path)) if text is None else text
    ids = tokenize_text(text, tokenizer, special_tokens=bos is None)
    return evaluation_windows(ids, seqlen=seqlen, windows=windows, bos=bos)
