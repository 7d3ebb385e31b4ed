"""The PyTorch reference of a sliced checkpoint, whole in memory or run layer-streamed from its shards.

Streamed (validation of models larger than host memory): every evaluation window is embedded at
once; then each block is read from the shards, moved to the device, applied to all windows and
dropped, so memory holds the embeddings, the head, one block and the activations (n x T x d on the
device), never the model.  Logits are taken per batch at the end, one batch at a time.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import torch
from tqdm.auto import tqdm

from slicegpt_export.checkpoint import SlicedConfig, build_checked, lazy_tensors, load_sliced, read_config
from slicegpt_export.modeling import AttentionContext, DecoderLayer, SlicedModel
from slicegpt_export.tensorio import return_freed_memory
from slicegpt_export.validation.perplexity import perplexity, perplexity_of, reference_logits_fn

logger = logging.getLogger(__name__)


class Reference(Protocol):
    """What validation asks of the reference, whole or streamed."""

    @property
    def config(self) -> SlicedConfig: ...

    def logits(self, windows: torch.Tensor, *, batch_size: int = 8, progress: bool = False) -> Iterator[torch.Tensor]: ...

    def perplexity(self, windows: torch.Tensor, *, batch_size: int = 8, progress: bool = False, label: str | None = None) -> float: ...


def open_reference(checkpoint: Path, *, device: torch.device, stream: bool) -> Reference:
    """The checkpoint's reference computing in float32 on `device` (a bf16/fp16 checkpoint too): layer-streamed or whole."""
    return StreamedReference(checkpoint, device=device) if stream else ResidentReference(checkpoint, device=device)


class ResidentReference:
    """A sliced checkpoint loaded whole, float32 on `device`."""

    def __init__(self, checkpoint: Path, *, device: torch.device) -> None:
        self.device = device
        self.model: SlicedModel = load_sliced(checkpoint, device=device, dtype=torch.float32)

    @property
    def config(self) -> SlicedConfig:
        return self.model.config

    @torch.no_grad()
    def logits(self, windows: torch.Tensor, *, batch_size: int = 8, progress: bool = False) -> Iterator[torch.Tensor]:
        """Logits (B, T, vocab) per batch of `windows` (n, T), float32 on the device."""
        logits = reference_logits_fn(self.model, self.device)
        for ids in tqdm(windows.split(batch_size), desc="reference", unit="batch", disable=not progress):
            yield logits(ids).float()

    def perplexity(self, windows: torch.Tensor, *, batch_size: int = 8, progress: bool = False, label: str | None = None) -> float:
        """exp(mean NLL) over positions 1..T-1 of every window (validation.perplexity)."""
        return perplexity(reference_logits_fn(self.model, self.device), windows, batch_size=batch_size, progress=progress, label=label)


class StreamedReference:
    """A sliced checkpoint whose blocks stay in their shards until each is needed (float32 on `device`)."""

    def __init__(self, checkpoint: Path, *, device: torch.device) -> None:
        cfg, _ = read_config(Path(checkpoint))
        self.device = device
        self.tensors = lazy_tensors(Path(checkpoint), dtype=torch.float32)
        planned = self.tensors.meta()
        outside = [n for n in planned if not n.startswith("layers.")]
        planned.update(self.tensors.read(outside))  # embeddings, head and their projections: read now
        self.model: SlicedModel = build_checked(cfg, planned)  # blocks are meta placeholders until their turn
        self.model.embed_tokens.to(device)
        self.model.lm_head.to(device)
        if self.model.embed_positions is not None:
            self.model.embed_positions.to(device)
        for name in ("embed_proj", "inv_freq", "inv_freq_long", "local_inv_freq"):
            if getattr(self.model, name) is not None:
                setattr(self.model, name, getattr(self.model, name).to(device))

    @property
    def config(self) -> SlicedConfig:
        return self.model.config

    def block(self, idx: int) -> DecoderLayer:
        """Block `idx` read from the shards, on the device."""
        prefix = f"layers.{idx}."
        self.model.load_layer(idx, self.tensors.read([n for n in self.tensors if n.startswith(prefix)]))
        return self.model.layers[idx].to(self.device)

    @torch.no_grad()
    def logits(self, windows: torch.Tensor, *, batch_size: int = 8, progress: bool = False) -> Iterator[torch.Tensor]:
        """Logits (B, T, vocab) per batch of `windows` (n, T), float32 on the device, once every block has run on all windows."""
        model, dev = self.model, self.device
        xs: list[torch.Tensor] = []
        contexts: list[AttentionContext] = []
        for ids in windows.split(batch_size):
            ctx, positions = model.attention_context(None, ids.shape[1], None, dev, torch.float32)
            contexts.append(ctx)
            xs.append(model.embed(ids.to(dev), positions))  # (B, T, d_0)
        for i in tqdm(range(model.config.num_layers), desc="reference (streamed)", unit="layer", disable=not progress):
            layer = self.block(i)
            xs = [layer(x, ctx) for x, ctx in zip(xs, contexts)]  # (B, T, d_out)
            layer.to("meta")
            return_freed_memory()
        for x in xs:
            yield model.head(x).float()  # (B, T, vocab)

    def perplexity(self, windows: torch.Tensor, *, batch_size: int = 8, progress: bool = False, label: str | None = None) -> float:
        """exp(mean NLL) over positions 1..T-1 of every window, as validation.perplexity computes it."""
        if progress and label:
            logger.info("perplexity: %s (streamed)", label)
        return perplexity_of(zip(windows.split(batch_size), self.logits(windows, batch_size=batch_size, progress=progress)))
