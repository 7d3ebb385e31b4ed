"""Budgets: the widths that fit a stored-parameter target, and what a width plan costs.

A *plan* is one width per residual signal that gets a basis (see slicing.signal_names): the
embedding output, then each rotated stage output; the last signal feeds the head.  Its cost
is counted in closed form, tensor by tensor, exactly as the sliced checkpoint will store it:
every matrix, a tied embedding once, shortcuts and projections included, identity shortcuts
not at all (tests check the count against written checkpoints).

Allocators choose the plan for a budget B = R x (dense stored parameters):

* ``uniform``: one width d for every signal (the head keeps D unless the head is sliced), the
  largest multiple of round_to that fits;
* ``spectrum``: per-signal widths from the PCA spectra of the dense model: starting from full
  width, repeatedly narrow the signal whose next cut of round_to directions discards the least
  variance (as a fraction of that signal's total) per stored parameter saved, until the plan
  fits.  SliceGPT's Table 6 found such allocation can hurt (Llama-2) or help (OPT); on SmolLM2
  it hurts badly (bench/results/pareto.md): outlier directions make middle layers look cheap;
* ``sensitivity``: the same greedy narrowing, scored by the measured rise of the calibration
  loss when each signal alone is sliced (converter/sensitivity.py).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

import torch

from slicegpt_export.checkpoint import LayerWidths, SlicedConfig
from slicegpt_export.errors import SliceGPTError

logger = logging.getLogger(__name__)

ALLOCATIONS = ("uniform", "spectrum", "sensitivity")


@dataclasses.dataclass
class Cost:
    parameters: int  # stored parameters (biases and norms included)
    macs: int  # weight multiply-accumulates per token


def layer_widths(cfg: SlicedConfig, widths: list[int], rotation: str, intermediates: list[int] | None = None) -> list[LayerWidths]:
    """Per-block widths of a plan.  `widths`: [embedding, then one per rotated stage]; `intermediates`: MLP neurons per block."""
    out = residual_widths(cfg, widths, rotation)
    if intermediates is not None:
        out = [dataclasses.replace(w, intermediate=n) for w, n in zip(out, intermediates)]
    return out


def residual_widths(cfg: SlicedConfig, widths: list[int], rotation: str) -> list[LayerWidths]:
    if rotation == "none":
        D = cfg.hidden_size
        return [LayerWidths(D, D, D, D) for _ in range(cfg.num_layers)]
    if rotation == "global":
        d, head = widths
        last = LayerWidths(d, head, d, head) if cfg.block_kind == "parallel" else LayerWidths(d, d, d, head)
        return [LayerWidths(d, d, d, d) for _ in range(cfg.num_layers - 1)] + [last]
    out, prev, k = [], widths[0], 1
    for _ in range(cfg.num_layers):
        if cfg.block_kind == "parallel":
            out.append(LayerWidths(prev, widths[k], prev, widths[k]))
            prev, k = widths[k], k + 1
        elif rotation == "stage":
            out.append(LayerWidths(prev, widths[k], widths[k], widths[k + 1]))
            prev, k = widths[k + 1], k + 2
        else:  # one basis per block: attention writes back into the basis it read
            out.append(LayerWidths(prev, prev, prev, widths[k]))
            prev, k = widths[k], k + 1
    if k != len(widths):
        raise ValueError(f"{len(widths)} widths for a plan of {k} signals")
    return out


def signal_count(cfg: SlicedConfig, rotation: str) -> int:
    if rotation == "none":
        return 1  # the embedding's, read by every block and the head
    if rotation == "global":
        return 2  # the stream, the head's input
    per_block = 2 if (cfg.block_kind == "sequential" and rotation == "stage") else 1
    return 1 + per_block * cfg.num_layers


def stored_shortcuts(cfg: SlicedConfig, widths: list[int], rotation: str) -> list[tuple[bool, bool]]:
    """(attention, MLP) shortcut stored, per block: a shortcut that is the identity is not."""
    n, sequential = cfg.num_layers, cfg.block_kind == "sequential"
    if rotation == "none":
        return [(False, False)] * n
    if rotation == "global":
        last = widths[-1] != widths[0]  # only a wider head needs [I 0]
        return [(not sequential and last and i == n - 1, sequential and last and i == n - 1) for i in range(n)]
    attn = not sequential or rotation == "stage"
    return [(attn, sequential)] * n


def plan_cost(cfg: SlicedConfig, widths: list[int], rotation: str, intermediates: list[int] | None = None) -> Cost:
    """Stored parameters and weight MACs per token of the checkpoint a plan produces."""
    V, D = cfg.vocab_size, cfg.hidden_size
    q_out, kv_out = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    bias = cfg.bias
    n_in = 2 if cfg.gated_mlp else 1  # gate and up read the MLP input
    d0, head_in = widths[0], widths[-1]
    params = macs = 0
    if cfg.tied_embeddings:
        e = cfg.tied_width or D  # columns of the one matrix E
        params += V * e + e * d0 + head_in * e  # E once, embed_proj, lm_head.proj
        macs += e * d0 + V * e + head_in * e  # embed_proj, the head's product with E, lm_head.proj
    else:
        params += V * d0 + V * head_in
        macs += V * head_in
    params += V if bias["head"] else 0
    if cfg.position_embedding == "learned":
        params += (cfg.max_position_embeddings + cfg.position_offset) * d0
    for w, (attn_stored, mlp_stored) in zip(layer_widths(cfg, widths, rotation, intermediates), stored_shortcuts(cfg, widths, rotation)):
        F = w.intermediate or cfg.intermediate_size
        attn_rows, mlp_rows = (D, D) if cfg.post_norms else (w.attn_out, w.mlp_out)  # post-norm branches write D wide
        m = w.attn_in * (q_out + 2 * kv_out) + q_out * attn_rows  # q, k, v, o
        m += n_in * w.mlp_in * F + F * mlp_rows  # gate, up, down
        m += D * (w.attn_out + w.mlp_out) if cfg.post_norms else 0  # post_proj per stage
        m += w.attn_in * w.attn_out if attn_stored else 0
        m += w.mlp_in * w.mlp_out if mlp_stored else 0
        macs += m
        params += m
        params += (q_out + 2 * kv_out) if bias["qkv"] else 0
        params += 2 * cfg.head_dim if cfg.qk_norm else 0  # q_norm, k_norm
        params += attn_rows if bias["attn_out"] else 0
        params += (n_in * F + mlp_rows) if bias["mlp"] else 0
    return Cost(params, macs)


def kept_count(total: int, keep_fraction: float, multiple: int = 32) -> int:
    """int(keep_fraction * total) rounded down to a multiple of `multiple` (block-quantization friendly), at least `multiple`."""
    k = int(keep_fraction * total + 1e-9)  # a fraction k / total gives k back
    return min(total, max(multiple, k - k % multiple))


def mlp_only_plan(cfg: SlicedConfig, budget: int, *, multiple: int = 32) -> int:
    """The most MLP neurons per block (a multiple of `multiple`, as kept_count rounds) with which the model
    at full width (rotation none: no PCA, no shortcut) fits `budget`."""
    F, n = cfg.intermediate_size, cfg.num_layers
    for k in range(F - F % multiple, 0, -multiple):
        if plan_cost(cfg, [cfg.hidden_size], "none", [k] * n).parameters <= budget:
            return k
    cost = plan_cost(cfg, [cfg.hidden_size], "none", [multiple] * n).parameters
    raise SliceGPTError(f"pruning MLP neurons alone cannot fit {budget:,} stored parameters ({cost:,} with {multiple} per block): "
                        "narrow the residual width too (--rotation block)")  # fmt: skip


def uniform_plan(
    cfg: SlicedConfig, rotation: str, budget: int, *, round_to: int, slice_head: bool, intermediates: list[int] | None = None
) -> list[int]:
    """The widest uniform plan within `budget`: every signal d (the head D unless `slice_head`)."""
    n, D = signal_count(cfg, rotation), cfg.hidden_size
    for d in range(D - D % round_to, 0, -round_to):
        widths = [d] * (n - 1) + [d if slice_head else D]
        if plan_cost(cfg, widths, rotation, intermediates).parameters <= budget:
            return widths
    raise SliceGPTError(f"no uniform width fits {budget:,} stored parameters (at width {round_to}: "
                        f"{plan_cost(cfg, [round_to] * n, rotation, intermediates).parameters:,})")  # fmt: skip


def discarded_fraction(eigenvalues: torch.Tensor) -> torch.Tensor:
    """r(d) = sum_{i >= d} lambda_i / sum lambda_i for d = 0..D: the variance a width-d slice drops.  (D + 1,)"""
    lam = eigenvalues.double().clamp(min=0)
    tail = torch.cat((lam.flip(0).cumsum(0).flip(0), lam.new_zeros(1)))
    return tail / lam.sum()


def spectrum_plan(
    cfg: SlicedConfig, spectra: list[torch.Tensor], rotation: str, budget: int, *, round_to: int, slice_head: bool,
    intermediates: list[int] | None = None,
) -> list[int]:
    """Per-signal widths within `budget`, narrowing greedily where the least variance is lost per parameter saved."""
    n = signal_count(cfg, rotation)
    if rotation == "global":
        raise SliceGPTError("one basis for every signal has one width: use --allocation uniform with --rotation global")
    if len(spectra) != n:
        raise ValueError(f"{len(spectra)} spectra for {n} signals")
    loss = [discarded_fraction(s) for s in spectra]
    movable = range(n) if slice_head else range(n - 1)
    return greedy_plan(cfg, rotation, budget, movable=movable, round_to=round_to, intermediates=intermediates,
                       rise=lambda k, old, new: (loss[k][new] - loss[k][old]).item())  # fmt: skip


def greedy_plan(
    cfg: SlicedConfig, rotation: str, budget: int, *, movable: range, round_to: int, intermediates: list[int] | None,
    rise: Callable[[int, int, int], float],
) -> list[int]:  # fmt: skip
    """From full width, narrow one signal by one `round_to` step at a time until the plan fits `budget`.

    Each step narrows the movable signal k whose loss rise `rise(k, old, new)` per stored parameter
    saved is least (a negative rise counts as none).
    """
    widths = [cfg.hidden_size] * signal_count(cfg, rotation)
    cost = plan_cost(cfg, widths, rotation, intermediates).parameters
    while cost > budget:
        best, best_score, best_cost = None, float("inf"), cost
        for k in movable:
            d = widths[k] - (widths[k] % round_to or round_to)
            if d < round_to:
                continue
            trial = widths[:k] + [d] + widths[k + 1 :]
            trial_cost = plan_cost(cfg, trial, rotation, intermediates).parameters
            score = max(rise(k, widths[k], d), 0.0) / max(cost - trial_cost, 1)
            if score < best_score:
                best, best_score, best_cost = (k, d), score, trial_cost
        if best is None:
            raise SliceGPTError(f"no plan fits {budget:,} stored parameters")
        widths[best[0]], cost = best[1], best_cost
    return widths
