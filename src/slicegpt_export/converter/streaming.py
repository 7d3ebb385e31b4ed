"""Layer-streamed conversion: the source is read, fused, rotated, sliced and written one block at a time.

Host memory holds the embeddings, the head, the block being sliced (with block rotation also the
next one, whose attention previews the mid-block signal) and the calibration activations, which
live on the slicing device (on a GPU run, GPU memory).  The source's other blocks stay on disk
until their turn (:class:`~slicegpt_export.tensorio.LazyTensors`), and each sliced block goes to
the output shards at once (:class:`~slicegpt_export.tensorio.ShardWriter`), then is dropped.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, MutableMapping

import torch

from slicegpt_export.converter.adapters import FamilyAdapter
from slicegpt_export.converter.fusion import fusable_norm_names, fuse_layer_norms, post_norm_projections
from slicegpt_export.errors import SliceGPTError
from slicegpt_export.modeling import DecoderLayer, SlicedModel
from slicegpt_export.tensorio import return_freed_memory

logger = logging.getLogger(__name__)

#: receives a sliced block's tensors under their checkpoint names
LayerSink = Callable[[dict[str, torch.Tensor]], None]


def layer_prefixes(adapter: FamilyAdapter, idx: int) -> tuple[str, ...]:
    """Source-name prefixes of block `idx` (e.g. ``model.layers.3.``), from the adapter's name patterns."""
    return tuple({pattern.split("{i}")[0] + f"{idx}." for pattern in adapter.layer_tensor_names().values()})


def take_layer_tensors(adapter: FamilyAdapter, source: MutableMapping[str, torch.Tensor], idx: int, num_layers: int) -> dict[str, torch.Tensor]:
    """Block `idx`'s source tensors, taken out of `source` (read from disk now) and renamed to canonical names."""
    prefixes = layer_prefixes(adapter, idx)
    raw = {name: source.pop(name) for name in [n for n in source if n.startswith(prefixes)]}
    adapter.prepare_source_tensors(raw, num_layers)
    return take_renamed(raw, {c.format(i=idx): s.format(i=idx) for c, s in adapter.layer_tensor_names().items()})


def take_renamed(source: MutableMapping[str, torch.Tensor], names: dict[str, str]) -> dict[str, torch.Tensor]:
    """The tensors `names` maps to (canonical -> source name), taken out of `source`; one line naming what is missing."""
    missing = [s for s in names.values() if s not in source]
    if missing:
        raise SliceGPTError(f"source model lacks tensors {missing[:3]}{' ...' if len(missing) > 3 else ''}")
    return {c: source.pop(s) for c, s in names.items()}


class StreamedLayers:
    """A :class:`~slicegpt_export.converter.slicing.LayerFeed` over a source read one block at a time.

    ``layer(i)`` reads block i from `source`, casts it to `dtype` on `device`, folds its norms
    (fusion.fuse_layer_norms) and puts it into `model` in place of its meta placeholder;
    ``release(i)`` hands the sliced block's tensors to `sink` (None: drop them, e.g. on the
    processes of a data-parallel run that do not write) and turns it back into meta tensors.
    """

    def __init__(
        self,
        model: SlicedModel,
        source: MutableMapping[str, torch.Tensor],
        adapter: FamilyAdapter,
        *,
        dtype: torch.dtype,
        device: torch.device,
        sink: LayerSink | None,
    ) -> None:
        self.model, self.source, self.adapter = model, source, adapter
        self.dtype, self.device, self.sink = dtype, device, sink
        self.live: set[int] = set()

    def layer(self, idx: int) -> DecoderLayer:
        if idx not in self.live:
            cfg = self.model.config
            tensors = {n: t.to(device=self.device, dtype=self.dtype) for n, t in take_layer_tensors(self.adapter, self.source, idx, cfg.num_layers).items()}
            norms = {n: tensors.pop(n) for n in fusable_norm_names(tensors)}
            tensors.update(post_norm_projections(norms, cfg.num_layers))
            self.model.load_layer(idx, tensors)
            fuse_layer_norms(self.model.layers[idx], idx, norms, norm_kind=self.adapter.norm_kind)
            self.live.add(idx)
        return self.model.layers[idx]

    def release(self, idx: int) -> None:
        if self.sink is not None:
            self.sink(self.model.layer_weights(idx))
        self.model.layers[idx].to("meta")
        self.live.discard(idx)
        return_freed_memory()
