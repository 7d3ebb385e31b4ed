"""The reference model run layer-streamed from a checkpoint's shards: validation of models larger than host memory.

Every evaluation window is embedded at once; then each block is read from the shards, moved to the
device, applied to all windows and dropped, so memory holds the embeddings, the head, one block and
the activations (B x T x d on the device), never the model.  Logits are taken per batch at the end.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from slicegpt_export.checkpoint import SlicedConfig, build_checked, lazy_tensors, read_config
from slicegpt_export.modeling import AttentionContext, DecoderLayer, SlicedModel
from slicegpt_export.tensorio import return_freed_memory

logger = logging.getLogger(__name__)


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
    def logits(self, windows: torch.Tensor, *, batch_size: int = 8, progress: bool = False) -> list[torch.Tensor]:
        """Logits (B, T, vocab) per batch of `windows` (n, T), float32 on the host."""
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
        return [model.head(x).float().cpu() for x in xs]

    def perplexity(self, windows: torch.Tensor, *, batch_size: int = 8, progress: bool = False) -> float:
        """exp(mean NLL) over positions 1..T-1 of every window, as validation.perplexity computes it."""
        total, count = 0.0, 0
        for ids, logits in zip(windows.split(batch_size), self.logits(windows, batch_size=batch_size, progress=progress)):
            total += F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="sum").item()
            count += ids[:, 1:].numel()
        return math.exp(total / count)
