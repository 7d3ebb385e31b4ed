"""Data-parallel calibration on torch.distributed: each process runs the current block on its share of the
calibration windows, and every covariance (and MLP Gram matrix) is all-reduced before it is decomposed.

Launched by ``torchrun --nproc-per-node N slicegpt-export slice ...`` (or ``slice --nproc N``, which
starts the same).  Every process reads and slices the same blocks and reaches the same bases, since
the sums it decomposes are the same; process 0 alone writes the checkpoint.  gloo carries the
sums on CPU, NCCL on CUDA.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from collections.abc import Iterator

import torch
import torch.distributed as dist

from slicegpt_export.errors import SliceGPTError

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class DataParallel:
    """This process's place in a data-parallel run and the device its sums travel on."""

    rank: int
    world_size: int
    device: torch.device  # where this process computes (its own GPU under NCCL)

    @property
    def writes(self) -> bool:
        return self.rank == 0

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """The sum of `t` over all processes (each process gets it), on `t`'s device (a pca.Reduction)."""
        return self.all_reduce(t, dist.ReduceOp.SUM)

    def max(self, t: torch.Tensor) -> torch.Tensor:
        """The largest `t` over all processes."""
        return self.all_reduce(t, dist.ReduceOp.MAX)

    def all_reduce(self, t: torch.Tensor, op: dist.ReduceOp) -> torch.Tensor:
        carrier = t.clone() if (t.device.type == "cuda") == (self.device.type == "cuda") else t.to(self.device)
        dist.all_reduce(carrier, op=op)
        return carrier.to(t.device)

    def share(self, ids: torch.Tensor) -> torch.Tensor:
        """This process's contiguous share of the calibration windows (n, T) -> (about n / world_size, T)."""
        if ids.shape[0] < self.world_size:
            raise SliceGPTError(f"{ids.shape[0]} calibration windows cannot be split across {self.world_size} processes")
        return ids.tensor_split(self.world_size)[self.rank]


def launched_world_size() -> int:
    """WORLD_SIZE as torchrun sets it (1 outside torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def process_device(device: torch.device) -> torch.device:
    """Under torchrun on CUDA each process takes the GPU of its LOCAL_RANK; elsewhere the device as given."""
    if device.type != "cuda" or launched_world_size() <= 1:
        return device
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if local >= torch.cuda.device_count():
        raise SliceGPTError(f"process {local} has no GPU of its own ({torch.cuda.device_count()} visible)")
    return torch.device("cuda", local)


@contextlib.contextmanager
def data_parallel(device: torch.device) -> Iterator[DataParallel | None]:
    """A process group for the block when launched by torchrun with more than one process (else None).

    NCCL when `device` is CUDA, gloo otherwise; the group is destroyed on leaving the block.
    """
    world = launched_world_size()
    if world <= 1:
        yield None
        return
    device = process_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend)
    try:
        logger.info("data-parallel calibration: process %d of %d (%s)", dist.get_rank(), world, backend)
        yield DataParallel(dist.get_rank(), world, device)
    finally:
        dist.destroy_process_group()
