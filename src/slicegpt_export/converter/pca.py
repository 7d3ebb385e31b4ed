"""PCA of residual signals (SliceGPT section 3.3): covariance in float64, damped, eigen-decomposed."""

from __future__ import annotations

import torch

DAMPING = 0.01  # fraction of the mean eigenvalue added to the diagonal


class CovarianceAccumulator:
    """Accumulates C = sum_i X_i^T X_i over calibration batches, padding rows excluded.  C is (D, D) float64."""

    def __init__(self, width: int, device: torch.device) -> None:
        self.cov = torch.zeros(width, width, dtype=torch.float64, device=device)
        self.count = 0

    def add(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """x: (B, T, D) signal; mask: (B, T) with 1 for real tokens, or None when all are real."""
        rows = x.reshape(-1, x.shape[-1])  # (B*T, D)
        if mask is not None:
            rows = rows[mask.reshape(-1).bool()]
        rows = rows.double()
        self.cov.addmm_(rows.T, rows)
        self.count += rows.shape[0]


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
    eigenvalues, eigenvectors = torch.linalg.eigh(damped)  # ascending
    order = torch.argsort(eigenvalues, descending=True)
    Q = eigenvectors[:, order]  # (D, D)
    return eigenvalues[order] - shift, Q * column_signs(Q)


def column_signs(Q: torch.Tensor) -> torch.Tensor:
    """+-1 per column making each column's largest-magnitude entry positive: an eigenvector's sign is arbitrary,
    and fixing it makes the rotation the same whichever way rounding went (e.g. covariances summed across processes)."""
    rows = Q.abs().argmax(dim=0)  # (D,)
    signs = torch.sign(Q[rows, torch.arange(Q.shape[1], device=Q.device)])
    return torch.where(signs == 0, torch.ones_like(signs), signs)  # (D,)
