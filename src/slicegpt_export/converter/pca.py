"""PCA of residual signals (SliceGPT section 3.3): covariance in float64, damped, eigen-decomposed."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Protocol

import torch

DAMPING = 0.01  # fraction of the mean eigenvalue added to the diagonal


class Reduction(Protocol):
    """Combines a tensor over the processes of a data-parallel run (converter.distributed.DataParallel)."""

    def sum(self, t: torch.Tensor) -> torch.Tensor: ...

    def max(self, t: torch.Tensor) -> torch.Tensor: ...


class OneProcess:
    """The reduction of a single process: nothing to combine."""

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def max(self, t: torch.Tensor) -> torch.Tensor:
        return t


ONE_PROCESS = OneProcess()


def masked_rows(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The rows of a (B, T, D) signal that are real tokens (mask 1), as (N, D)."""
    rows = x.reshape(-1, x.shape[-1])
    return rows if mask is None else rows[mask.reshape(-1).bool()]


def exact_gram_sum(blocks: Callable[[], Iterable[torch.Tensor]], reduce: Reduction = ONE_PROCESS) -> torch.Tensor:
    """C = sum_k A_k^T A_k over the row blocks A_k (N_k, D) that `blocks()` yields, and over processes.  (D, D) float64.

    The same bits however the blocks are split between processes: float64 addition depends on its
    order, so each A_k^T A_k is put on one fixed-point grid and summed as int64, which is exact.  The
    grid 2^-s comes from a bound every process shares: |G_ij| <= max_i G_ii for a Gram matrix G, so
    the sum is below count * peak, peak the largest diagonal entry of any block (a max, exact) and
    count the number of blocks; s leaves the total under 2^61, and each entry's rounding is
    2^-s <= 2^-60 * count * peak (finer than float64 summation).  Two passes over the blocks: the
    diagonal first (cheap), then the products.
    """
    peak, count, width, device = 0.0, 0, None, None
    for a in blocks():
        peak = max(peak, a.double().pow(2).sum(0).max().item() if a.numel() else 0.0)
        count, width, device = count + 1, a.shape[-1], a.device
    peak_t = reduce.max(torch.tensor(peak, dtype=torch.float64, device=device))
    count_t = reduce.sum(torch.tensor(count, dtype=torch.int64, device=device))
    scale = grid_scale(peak_t.item(), int(count_t.item()))
    return reduce.sum(fixed_point_gram(blocks(), scale, width, device)).double() / scale


def grid_scale(peak: float, count: int) -> float:
    """2^s with count * peak * 2^s < 2^61: the fixed-point grid of exact_gram_sum (1.0 for an all-zero signal)."""
    if peak * count == 0.0:
        return 1.0
    _, exponent = math.frexp(peak * count)  # peak * count < 2^exponent
    return 2.0 ** (61 - exponent)


def fixed_point_gram(blocks: Iterable[torch.Tensor], scale: float, width: int, device: torch.device | None) -> torch.Tensor:
    """sum_k round(A_k^T A_k * scale) as int64 (D, D): integer addition, so any grouping of the blocks gives the same."""
    total = torch.zeros(width, width, dtype=torch.int64, device=device)
    for a in blocks:
        rows = a.double()
        total += (rows.T @ rows).mul_(scale).round_().to(torch.int64)  # (D, D)
    return total


def principal_components(cov: torch.Tensor, damping: float = DAMPING) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues of `cov` (descending) and orthogonal Q (columns = eigenvectors), decomposed with damping.

    The decomposition runs on cov + damping * mean(diag) * I for numerical stability; the shift
    leaves the eigenvectors unchanged and is subtracted from the returned eigenvalues.  Q is
    the paper's Q_l: rotating a signal X by Q orders its coordinates by variance, so keeping
    the first d columns keeps the d directions of largest variance.
    """
    shift = damping * cov.diagonal().mean()
    damped = cov.clone()
    damped.diagonal().add_(shift)
    with one_cpu_thread(damped.device):
        eigenvalues, eigenvectors = torch.linalg.eigh(damped)  # ascending
    order = torch.argsort(eigenvalues, descending=True)
    Q = eigenvectors[:, order]  # (D, D)
    return eigenvalues[order] - shift, Q * column_signs(Q)


@contextmanager
def one_cpu_thread(device: torch.device) -> Iterator[None]:
    """Run the block with one torch thread when `device` is the CPU (the previous count restored after).

    LAPACK's threaded eigensolver (and solver, converter.ffn) returns other bits with another
    thread count, and in a near-degenerate eigenpair a last-bit change rotates the eigenvectors
    far (relative weight changes of order 1): with one thread, Q_l is the same whatever threads
    or processes (torchrun gives each one thread) computed it.  CUDA's solvers do not depend on it.
    """
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def column_signs(Q: torch.Tensor) -> torch.Tensor:
    """+-1 per column making each column's largest-magnitude entry positive: an eigenvector's sign is arbitrary,
    and fixing it makes the rotation the same whichever way rounding went (e.g. covariances summed across processes)."""
    rows = Q.abs().argmax(dim=0)  # (D,)
    signs = torch.sign(Q[rows, torch.arange(Q.shape[1], device=Q.device)])
    return torch.where(signs == 0, torch.ones_like(signs), signs)  # (D,)
