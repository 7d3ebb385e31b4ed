"""MLP neuron pruning with a least-squares down projection: the MLP's intermediate width as a second budget dimension.

For an MLP y = W_down a with neuron activations a = act(W_gate h) * (W_up h) (F neurons, h the
normed block input), keep a subset S of k neurons and replace W_down by the W' (d_out x k) that
best reproduces the full output on the calibration tokens, as structured-pruning follow-ups to
SliceGPT do (MoDeGPT, ICLR 2025; ZipLM):

    W' = argmin_W || A_S W^T - A W_down^T ||^2 = W_down G[:, S] (G[S, S] + lambda I)^{-1}

with A (tokens x F) the activations and G = A^T A their Gram matrix (float64, padding excluded,
1% damping lambda as in the PCA).  Neurons are ranked by the output energy each carries alone,
G_jj ||W_down[:, j]||^2 ("energy"), or by backward elimination that refits as it goes ("obs", the default:
SmolLM2 at --target-params 0.75, MLP neurons only, 41.59 against 43.08); gate/up lose the rows of the dropped neurons.
"""

from __future__ import annotations

import torch
from torch import nn

from slicegpt_export.converter.pca import one_cpu_thread
from slicegpt_export.errors import SliceGPTError
from slicegpt_export.modeling import MLP

DAMPING = 0.01  # fraction of the mean diagonal of G added before solving


def neurons_to_keep(gram: torch.Tensor, down: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices (sorted) of the `keep` neurons with the largest output energy G_jj ||W_down[:, j]||^2."""
    energy = gram.diagonal() * down.double().pow(2).sum(0)  # (F,)
    return energy.topk(keep).indices.sort().values


def neurons_to_keep_obs(gram: torch.Tensor, down: torch.Tensor, keep: int, *, step: int = 8) -> torch.Tensor:
    """Indices (sorted) of `keep` neurons chosen by backward elimination with compensation (Optimal Brain Surgeon on
    whole neurons, as ZipLM and SparseGPT prune structures).  With H = G + lambda I, removing neuron j and refitting
    the others raises the least-squares error by ||w_j||^2 / [H^-1]_jj (w_j the j-th column of the current W_down).
    The `step` cheapest go together, and the rest are refitted for the set J removed:

        W <- W - W_J ([H^-1]_JJ)^-1 [H^-1]_J.        H^-1 <- H^-1 - [H^-1]_.J ([H^-1]_JJ)^-1 [H^-1]_J.
    """
    h = gram.clone()  # (F, F) float64
    h.diagonal().add_(DAMPING * h.diagonal().mean())
    alive = torch.ones(h.shape[0], dtype=torch.bool, device=h.device)
    with one_cpu_thread(h.device):  # the same choices with any thread count (data-parallel processes must agree)
        h_inv = torch.linalg.inv(h)  # (F, F)
        w = down.double().clone()  # (d_out, F)
        while (removing := min(step, int(alive.sum()) - keep)) > 0:
            d = h_inv.diagonal()  # (F,)
            cost = torch.where(alive, w.pow(2).sum(0) / d.clamp(min=torch.finfo(d.dtype).tiny), torch.inf)  # (F,)
            J = cost.topk(removing, largest=False).indices  # (b,)
            solve = torch.linalg.solve(h_inv[J][:, J], h_inv[J])  # (b, F) = ([H^-1]_JJ)^-1 [H^-1]_J.
            w.addmm_(w[:, J], solve, alpha=-1.0)
            h_inv.addmm_(h_inv[:, J], solve, alpha=-1.0)
            alive[J] = False
    return alive.nonzero().squeeze(1)


def compensated_down(gram: torch.Tensor, down: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """W' = W_down G[:, S] (G[S, S] + lambda I)^{-1}: the least-squares down projection from the kept neurons.  (d_out, k)"""
    g_ss = gram[kept][:, kept].clone()
    g_ss.diagonal().add_(DAMPING * g_ss.diagonal().mean())
    rhs = gram[kept] @ down.double().T  # (k, d_out) = G[S, :] W_down^T
    with one_cpu_thread(g_ss.device):  # LAPACK's threaded solve changes its last bits with the thread count
        return torch.linalg.solve(g_ss, rhs).T.to(down.dtype)


#: --ffn-selection: how the kept neurons are chosen
SELECTIONS = {"obs": neurons_to_keep_obs, "energy": neurons_to_keep}
DEFAULT_SELECTION = "obs"


def check_selection(selection: str) -> None:
    if selection not in SELECTIONS:
        raise SliceGPTError(f"unknown --ffn-selection {selection!r} (choose from {', '.join(SELECTIONS)})")


@torch.no_grad()
def prune_mlp(mlp: MLP, gram: torch.Tensor, keep: int, *, selection: str = DEFAULT_SELECTION) -> None:
    """Keep `keep` neurons of `mlp` in place, rows of gate/up and columns of down, down refitted by least squares."""
    kept = SELECTIONS[selection](gram, mlp.down_proj.weight, keep)
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
