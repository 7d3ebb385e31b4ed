"""Tensors to and from safetensors files one at a time, so host memory never holds a whole model.

* :class:`LazyTensors` -- a mapping over the tensors of safetensors files (one file or the shards of a
  Hugging Face index) that reads a tensor only when it is asked for and keeps nothing: each read
  opens its file and closes it again, so no shard stays mapped;
* :class:`ShardWriter` -- appends tensors as they are produced to safetensors shards under the
  Hugging Face index convention (``model.safetensors``, or ``model-0000k-of-0000n.safetensors``
  plus ``model.safetensors.index.json``).  Each tensor's bytes go to disk at once; a shard's
  header is written when the shard is full, in front of its data.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import logging
import os
import shutil
import struct
from collections.abc import Iterable, Iterator, MutableMapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from slicegpt_export.errors import SliceGPTError

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
#: largest shard written unless told (Hugging Face's save_pretrained default, "5GB")
DEFAULT_SHARD_BYTES = 5 * 10**9

SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                      torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
                      torch.bool: "BOOL"}  # fmt: skip
TORCH_DTYPES = {v: k for k, v in SAFETENSORS_DTYPES.items()}


def return_freed_memory() -> None:
    """Hand memory freed by the C allocator back to the system (glibc's malloc_trim; nothing elsewhere).

    Slicing frees a block's tensors and allocates the next block's, of the same sizes; glibc keeps
    much of what was freed in its heap, so without this the resident size creeps up block by block
    (measured: about 35 MiB per 2048-wide block) although nothing is held.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return
    trim(0)


def unreadable(path: Path, exc: Exception) -> SliceGPTError:
    return SliceGPTError(f"cannot read weights file {path}: {str(exc).splitlines()[0]}")


class LazyMapping(MutableMapping[str, torch.Tensor]):
    """Tensors on disk, read (and cast to `dtype` when given) only when asked for; subclasses say where they lie.

    Reading a tensor never caches it: ``pop`` hands it over, ``[]`` reads it again.  Tensors set
    with ``[]=`` (e.g. an adapter splitting a fused matrix) are held in memory beside the files.
    ``shape``, ``stored_dtype`` and ``meta`` answer from the files' headers without reading data.
    """

    def __init__(self, info: dict[str, tuple[torch.dtype, tuple[int, ...]]], *, dtype: torch.dtype | None) -> None:
        self.dtype = dtype
        self._info = info  # name -> (stored dtype, shape) of every tensor still on disk
        self._held: dict[str, torch.Tensor] = {}

    #: whether read_stored returns memory of its own (else a view of a mapped file, copied before it is handed out)
    owned = False

    def read_stored(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The stored tensors `names` (all on disk), as they are stored."""
        raise NotImplementedError

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._held[name].shape) if name in self._held else self._info[name][1]

    def stored_dtype(self, name: str) -> torch.dtype:
        return self._held[name].dtype if name in self._held else self._info[name][0]

    def meta(self) -> dict[str, torch.Tensor]:
        """Every tensor as an empty meta tensor of its shape and (cast) dtype: for planning without reading."""
        return {n: torch.empty(self.shape(n), dtype=self.dtype or self.stored_dtype(n), device="meta") for n in self}

    def read(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """Several tensors at once (nothing is removed from the mapping)."""
        names = list(names)
        missing = [n for n in names if n not in self]
        if missing:
            raise KeyError(missing[0])
        stored = self.read_stored([n for n in names if n not in self._held])
        out = {}
        for name in names:
            t = self._held[name] if name in self._held else stored[name]
            if self.dtype is not None and t.dtype != self.dtype:
                t = t.to(self.dtype)  # a copy
            elif name in stored and not self.owned:
                t = t.clone()
            out[name] = t
        return out

    def read_all(self) -> dict[str, torch.Tensor]:
        return self.read(list(self))

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.read([name])[name]

    def __setitem__(self, name: str, value: torch.Tensor) -> None:
        self._info.pop(name, None)
        self._held[name] = value

    def __delitem__(self, name: str) -> None:
        if name in self._held:
            del self._held[name]
        else:
            del self._info[name]

    def __contains__(self, name: object) -> bool:
        return name in self._held or name in self._info

    def __iter__(self) -> Iterator[str]:
        yield from sorted(self._info) + list(self._held)  # one order whatever the sharding

    def __len__(self) -> int:
        return len(self._info) + len(self._held)

    def clear(self) -> None:  # MutableMapping's own would read every tensor
        self._info.clear()
        self._held.clear()


class LazyTensors(LazyMapping):
    """The tensors of safetensors `files` (one file or the shards of an index); each read opens its file and closes it
    again, so no shard stays mapped and host memory holds only what the caller keeps."""

    def __init__(self, files: Iterable[Path], *, dtype: torch.dtype | None = None) -> None:
        self._where: dict[str, Path] = {}
        info: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
        for path in files:
            try:
                with safe_open(str(path), framework="pt") as f:
                    for name in f.keys():  # noqa: SIM118 -- a safetensors handle, not a dict
                        piece = f.get_slice(name)
                        self._where[name] = path
                        info[name] = (TORCH_DTYPES.get(piece.get_dtype(), torch.float32), tuple(piece.get_shape()))
            except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
                raise unreadable(path, exc) from exc
        super().__init__(info, dtype=dtype)

    def read_stored(self, names: list[str]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self._where[name], []).append(name)
        for path, group in by_file.items():
            try:
                with safe_open(str(path), framework="pt") as f:
                    for name in group:
                        out[name] = f.get_tensor(name)
            except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
                raise unreadable(path, exc) from exc
        return out


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a contiguous CPU tensor, without a copy."""
    flat = t.reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


class ShardWriter:
    """Safetensors shards written tensor by tensor into `directory` (Hugging Face's index convention).

    ``add`` casts a tensor to `dtype` (floating tensors only; None keeps each tensor's own),
    appends its bytes to the open shard's data file, and starts a new shard when the open one
    would pass `max_shard_bytes`.  ``close`` names the shards (one: ``model.safetensors``; more:
    ``model-0000k-of-0000n.safetensors`` with ``model.safetensors.index.json``) and returns the
    written tensors as meta tensors (name -> shape and dtype) for size accounting.  The caller
    writes into a temporary folder that is renamed once complete (atomic.atomic_directory).
    """

    def __init__(self, directory: Path, *, dtype: torch.dtype | None = None, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> None:
        if max_shard_bytes <= 0:
            raise SliceGPTError(f"the shard size must be positive, got {max_shard_bytes}")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.dtype, self.max_shard_bytes = dtype, max_shard_bytes
        self.shards: list[tuple[Path, list[str]]] = []  # finished shards: (temporary path, tensor names)
        self.written: dict[str, torch.Tensor] = {}  # name -> meta tensor
        self._header: dict[str, dict] = {}
        self._data: Path | None = None
        self._file = None
        self._size = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self.written:
            raise ValueError(f"tensor {name} written twice")
        dtype = self.dtype if self.dtype is not None and tensor.is_floating_point() else tensor.dtype
        t = tensor.detach().to(device="cpu", dtype=dtype).contiguous()
        nbytes = t.numel() * t.element_size()
        if self._file is not None and self._size + nbytes > self.max_shard_bytes:
            self._finish_shard()
        if self._file is None:
            self._data = self.directory / f".shard-{len(self.shards) + 1:05d}.data"
            self._file = open(self._data, "wb")  # noqa: SIM115 -- closed by _finish_shard
            self._size = 0
        self._file.write(tensor_bytes(t))
        self._header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(t.shape), "data_offsets": [self._size, self._size + nbytes]}
        self._size += nbytes
        self.written[name] = torch.empty(t.shape, dtype=dtype, device="meta")

    def add_all(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, t in tensors.items():
            self.add(name, t)

    def _finish_shard(self) -> None:
        """Header (8-byte length, JSON padded to 8 bytes) in front of the data written so far."""
        assert self._file is not None and self._data is not None
        self._file.close()
        header = json.dumps({"__metadata__": {"format": "pt"}, **self._header}, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)
        path = self.directory / f".shard-{len(self.shards) + 1:05d}.safetensors"
        with open(path, "wb") as out, open(self._data, "rb") as data:
            out.write(struct.pack("<Q", len(header)))
            out.write(header)
            shutil.copyfileobj(data, out, 16 << 20)
        os.unlink(self._data)
        self.shards.append((path, list(self._header)))
        self._header, self._file, self._data = {}, None, None

    def close(self) -> dict[str, torch.Tensor]:
        if self._file is not None:
            self._finish_shard()
        if not self.shards:
            raise ValueError("no tensors were written")
        if len(self.shards) == 1:
            self.shards[0][0].rename(self.directory / WEIGHTS_NAME)
            return self.written
        n = len(self.shards)
        weight_map = {}
        for k, (path, names) in enumerate(self.shards, start=1):
            final = f"model-{k:05d}-of-{n:05d}.safetensors"
            path.rename(self.directory / final)
            weight_map.update(dict.fromkeys(names, final))
        total = sum(t.numel() * t.element_size() for t in self.written.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (self.directory / WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        logger.info("wrote %d tensors in %d shards", len(self.written), n)
        return self.written
