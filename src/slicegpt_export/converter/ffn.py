"""MLP neuron pruning with a least-squares down projection: the MLP's intermediate width as a second budget dimension.

For an MLP y = W_down a with neuron activations a = act(W_gate h) * (W_up h) (F neurons, h the
normed block input), keep a subset S of k neurons and replace W_down by the W' (d_out x k) that
best reproduces the full output on the calibration tokens, as structured-pruning follow-ups to
SliceGPT do (MoDeGPT, ICLR 2025; ZipLM):

    W' = argmin_W || A_S W^T - A W_down^T ||^2 = W_down G[:, S] (G[S, S] + lambda I)^{-1}

with A (tokens x F) the activations and G = A^T A their Gram matrix (float64, padding excluded,
1% damping lambda as in the PCA).  Neurons are ranked by the output energy each carries alone,
G_jj ||W_down[:, j]||^2; gate/up lose the rows of the dropped neurons.
"""

from __future__ import annotations

import torch
from torch import nn

from slicegpt_export.converter.pca import one_cpu_thread
from slicegpt_export.modeling import MLP

DAMPING = 0.01  # fraction of the mean diagonal of G added before solving


def neurons_to_keep(gram: torch.Tensor, down: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices (sorted) of the `keep` neurons with the largest output energy G_jj ||W_down[:, j]||^2."""
    energy = gram.diagonal() * down.double().pow(2).sum(0)  # (F,)
    return energy.topk(keep).indices.sort().values


def compensated_down(gram: torch.Tensor, down: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """W' = W_down G[:, S] (G[S, S] + lambda I)^{-1}: the least-squares down projection from the kept neurons.  (d_out, k)"""
    g_ss = gram[kept][:, kept].clone()
    g_ss.diagonal().add_(DAMPING * g_ss.diagonal().mean())
    rhs = gram[kept] @ down.double().T  # (k, d_out) = G[S, :] W_down^T
    with one_cpu_thread(g_ss.device):  # LAPACK's threaded solve changes its last bits with the thread count
        return torch.linalg.solve(g_ss, rhs).T.to(down.dtype)


@torch.no_grad()
def prune_mlp(mlp: MLP, gram: torch.Tensor, keep: int) -> None:
    """Keep `keep` neurons of `mlp` in place, rows of gate/up and columns of down, down refitted by least squares."""
    kept = neurons_to_keep(gram, mlp.down_proj.weight, keep)
    new_down = compensated_down(gram, mlp.down_proj.weight, kept)
    for lin in (mlp.gate_proj, mlp.up_proj):
        if lin is not None:
            lin.weight = nn.Parameter(lin.weight[kept].contiguous(), requires_grad=False)
            if lin.bias is not None:
                lin.bias = nn.Parameter(lin.bias[kept].contiguous(), requires_grad=False)
    mlp.down_proj.weight = nn.Parameter(new_down.contiguous(), requires_grad=False)
    mlp.down_proj.in_features = mlp.up_proj.out_features = keep
    if mlp.gate_proj is not None:
        mlp.gate_proj.out_features = keep
