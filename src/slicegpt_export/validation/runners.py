"""Perplexity of a sliced checkpoint (the reference), of a dense source model, or of a `slicegpt` GGUF file."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from slicegpt_export.checkpoint import CONFIG_NAME, SECTION
from slicegpt_export.device import resolve_device
from slicegpt_export.errors import SliceGPTError
from slicegpt_export.sources.models import dense_model, load_source
from slicegpt_export.sources.text import evaluation_windows, read_local_text, text_windows, window_bos
from slicegpt_export.sources.tokenizer import load_tokenizer
from slicegpt_export.validation.perplexity import perplexity, reference_logits_fn
from slicegpt_export.validation.streamed import open_reference


def is_sliced_checkpoint(path: Path) -> bool:
    config = Path(path) / CONFIG_NAME
    if not config.is_file():
        return False
    try:
        return SECTION in json.loads(config.read_text())
    except (OSError, json.JSONDecodeError):
        return False


@torch.no_grad()
def reference_perplexities(
    path: str | Path, *, texts: list[Path], seqlen: int, windows: int | None, batch_size: int, device: str = "auto", stream: bool = False
) -> dict[str, float]:
    """Perplexity on each text (keyed by the text as given) of a sliced checkpoint, or of a dense source model run by transformers.

    With `stream` a sliced checkpoint runs layer-streamed from its shards (validation.streamed).
    """
    dev = resolve_device(device)
    if is_sliced_checkpoint(Path(path)):
        reference = open_reference(Path(path), device=dev, stream=stream)
        tokenizer = load_tokenizer(Path(path))
        if tokenizer is None:
            raise SliceGPTError(f"{path} has no tokenizer to read the evaluation text with")
        bos = window_bos(tokenizer, reference.config.bos_windows)
        return {str(text): reference.perplexity(text_windows(text, tokenizer, seqlen=seqlen, windows=windows, bos=bos), batch_size=batch_size,
                                                progress=True) for text in texts}  # fmt: skip
    if stream:
        raise SliceGPTError(f"{path} is not a sliced checkpoint: only a checkpoint's reference runs layer-streamed")
    source = load_source(str(path))
    if source.tokenizer is None:
        raise SliceGPTError(f"{path} has no tokenizer to read the evaluation text with")
    model = dense_model(source).to(dev)
    return {
        str(text): perplexity(reference_logits_fn(model, dev), text_windows(text, source.tokenizer, seqlen=seqlen, windows=windows, bos=None),
                              batch_size=batch_size, progress=True)
        for text in texts
    }  # fmt: skip


def is_slicegpt_gguf(path: str | Path) -> bool:
    """Whether `path` is a GGUF file of this tool's `slicegpt` architecture (a stock one is read as a dense source)."""
    from slicegpt_export.gguf_spec import ARCH
    from slicegpt_export.validation.gguf_runner import file_architecture

    path = Path(path)
    if path.suffix != ".gguf" or not path.is_file():
        return False
    return file_architecture(path) == ARCH


@torch.no_grad()
def gguf_perplexities(
    path: str | Path, *, text: Path, seqlen: int, windows: int | None, batch_size: int, device: str = "auto"
) -> list[tuple[str, float]]:
    """Perplexity of a `slicegpt` GGUF file from the file alone: the file-only runner, then llama.cpp when it is built.

    The text is tokenized once by the file's own vocabulary; both runners read the same windows.
    """
    from slicegpt_export.validation.gguf_runner import open_gguf_model
    from slicegpt_export.validation.llama_cpp_runner import LlamaCppModel, llama_cpp_available

    path, dev = Path(path), resolve_device(device)
    model = open_gguf_model(path)
    tokens = model.tokenizer().encode(read_local_text(Path(text)), add_special_tokens=False).ids
    bos = model.meta.get("tokenizer.ggml.bos_token_id", int) if model.config.bos_windows else None  # Gemma: BOS starts every window
    ids = evaluation_windows(torch.tensor(tokens, dtype=torch.long), seqlen=min(seqlen, model.config.max_position_embeddings),
                             windows=windows, bos=bos)  # fmt: skip
    runner = model.model.to(dev)
    results = [("gguf runner", perplexity(reference_logits_fn(runner, dev), ids, batch_size=batch_size, progress=True,
                                          label=f"gguf runner {path.name}"))]  # fmt: skip
    del model, runner
    if llama_cpp_available():
        llm = LlamaCppModel(path, n_ctx=ids.shape[1])
        results.append(("llama.cpp", perplexity(llm.logits, ids, batch_size=1, progress=True, label=f"llama.cpp {path.name}")))
        llm.close()
    return results
