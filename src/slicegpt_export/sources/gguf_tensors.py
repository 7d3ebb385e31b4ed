"""A GGUF file's tensors under Hugging Face names, each dequantized when it is read.

transformers' ``load_gguf_checkpoint`` dequantizes every tensor of a file at once; this does the
same per tensor, with the same pieces (gguf-py's ``dequantize``, transformers' name map and its
per-architecture tensor processor, e.g. Llama's q/k permutation undone), so a block's tensors
are dequantized when the converter reaches that block.  After each read the file's mapped pages
are released (``madvise(MADV_DONTNEED)``), so the file does not accumulate in resident memory.
"""

from __future__ import annotations

import logging
import mmap
from pathlib import Path
from typing import Any

import numpy as np
import torch

from slicegpt_export.errors import SliceGPTError
from slicegpt_export.tensorio import LazyMapping

logger = logging.getLogger(__name__)


class GGUFTensors(LazyMapping):
    """The tensors of GGUF file `path` for the transformers model `skeleton` (meta) of `config`, dequantized on reading.

    Stored dtype: float32 (what dequantization gives), or `dtype` when given.
    """

    def __init__(self, path: Path, *, config: dict[str, Any], skeleton: torch.nn.Module, dtype: torch.dtype | None = None) -> None:
        from gguf import GGUFReader
        from transformers.modeling_gguf_pytorch_utils import (
            TENSOR_PROCESSORS,
            TensorProcessor,
            get_gguf_hf_weights_map,
            read_field,
        )

        self.reader = GGUFReader(str(path))
        architecture = read_field(self.reader, "general.architecture")[0]
        self.processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=config)
        self.key_map = get_gguf_hf_weights_map(skeleton, self.processor)
        self.config = config
        self._index: dict[str, int] = {}
        info: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
        for k, t in enumerate(self.reader.tensors):
            if t.name in self.key_map:
                name = self.key_map[t.name]
                self._index[name] = k
                info[name] = (torch.float32, tuple(int(d) for d in reversed(t.shape.tolist())))  # GGUF lists dims innermost first
        super().__init__(info, dtype=dtype)

    owned = True  # dequantized into new arrays

    def read_stored(self, names: list[str]) -> dict[str, torch.Tensor]:
        from gguf.quants import dequantize

        out = {}
        for name in names:
            t = self.reader.tensors[self._index[name]]
            result = self.processor.process(weights=dequantize(t.data, t.tensor_type), name=t.name, tensor_key_mapping=self.key_map,
                                            parsed_parameters={"config": self.config, "tensors": {}})  # fmt: skip
            if self.key_map.get(result.name) != name:
                raise SliceGPTError(f"GGUF tensor {t.name} maps to {result.name}, not {name}: read this file whole (--in-memory)")
            out[name] = torch.from_numpy(np.array(result.weights, dtype=np.float32, copy=True))  # (out, in) as transformers has it
        self.release_pages()
        return out

    def release_pages(self) -> None:
        """Drop the file's pages from this process's resident memory (they stay in the page cache)."""
        mapped = getattr(self.reader.data, "_mmap", None)
        if isinstance(mapped, mmap.mmap) and hasattr(mmap, "MADV_DONTNEED"):
            mapped.madvise(mmap.MADV_DONTNEED)
