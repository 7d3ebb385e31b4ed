"""Loading the tokenizer of a source model or a sliced checkpoint."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def load_tokenizer(folder: Path, gguf_file: str | None = None) -> Any | None:
    """The transformers tokenizer of a folder (or of a GGUF file in it), None when there is none."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), gguf_file=gguf_file)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        logger.warning("no usable tokenizer in %s (%s); text cannot be tokenized", folder, exc)
        return None
