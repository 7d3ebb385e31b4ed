"""Budgets, one-shortcut-per-block rotation, tied embeddings and exact zero-padding on tiny models."""

from __future__ import annotations

import pytest
import torch
from oracle import oracle_logits
from test_families import calibration, prompt, source_of
from tiny import TINY_CONFIGS, byte_tokenizer, tiny_hf_model

from slicegpt_export.checkpoint import LayerWidths, build_checked, parameter_count, weight_macs_per_token
from slicegpt_export.converter.budget import discarded_fraction, kept_count, layer_widths, plan_cost, spectrum_plan
from slicegpt_export.converter.convert import fused_model, slice_fused, slice_source
from slicegpt_export.errors import SliceGPTError
from slicegpt_export.exporters.padding import pad_residual_widths

FAMILIES = list(TINY_CONFIGS)


def plan_of(cfg) -> list[int]:
    """The per-signal widths a sliced config records (inverse of budget.layer_widths)."""
    rotation = cfg.slicing["rotation"]
    if rotation == "none":
        return [cfg.embedding_width]
    if rotation == "global":
        return [cfg.embedding_width, cfg.head_in]
    widths = [cfg.embedding_width]
    for w in cfg.layers:
        if cfg.block_kind == "sequential" and rotation == "stage":
            widths += [w.attn_out, w.mlp_out]
        else:
            widths.append(w.mlp_out)
    return widths


@pytest.mark.parametrize(
    ("rotation", "allocation"), [("stage", "spectrum"), ("block", "spectrum"), ("block", "sensitivity"), ("global", "uniform")]
)
@pytest.mark.parametrize("family", FAMILIES)
def test_plan_cost_counts_what_the_checkpoint_stores(family, rotation, allocation):
    hf = tiny_hf_model(family)
    model, cfg, _ = fused_model(source_of(hf))
    dense = cfg.size["dense_parameters"]
    slice_fused(model, cfg, calibration(), target_params=0.8, rotation=rotation, allocation=allocation, ffn_keep=1.0)
    tensors = model.named_weights()
    widths = plan_of(cfg)
    assert layer_widths(cfg, widths, rotation) == cfg.layers
    cost = plan_cost(cfg, widths, rotation)
    assert cost.parameters == parameter_count(tensors) <= 0.8 * dense
    assert cost.macs == weight_macs_per_token(tensors, tied_embeddings=cfg.tied_embeddings)


@pytest.mark.parametrize("family", FAMILIES)
def test_block_rotation_is_exact_and_stores_one_shortcut_per_block(family):
    hf = tiny_hf_model(family, dtype=torch.float64)
    ids = prompt()
    expected = oracle_logits(hf.state_dict(), hf.config.to_dict(), ids)
    model, cfg = slice_source(source_of(hf), calibration(), sparsity=0.0, rotation="block")
    assert (model(ids).logits - expected).abs().max().item() <= 1e-9
    tensors = model.named_weights()
    for i in range(cfg.num_layers):
        if cfg.block_kind == "sequential":
            assert f"layers.{i}.attn_shortcut" not in tensors and f"layers.{i}.mlp_shortcut" in tensors
        else:
            assert f"layers.{i}.attn_shortcut" in tensors


@pytest.mark.parametrize("family", ["llama-tied", "qwen2", "phi"])
def test_mlp_only_budget_keeps_every_width_and_as_many_neurons_as_fit(family):
    hf = tiny_hf_model(family)
    model, cfg, _ = fused_model(source_of(hf))
    target = 0.85
    slice_fused(model, cfg, calibration(), target_params=target, rotation="none")
    tensors = model.named_weights()
    dense, D, n = cfg.size["dense_parameters"], cfg.hidden_size, cfg.num_layers
    kept = cfg.layers[0].intermediate
    assert all(w == LayerWidths(D, D, D, D, kept) for w in cfg.layers) and kept % 32 == 0
    assert not [name for name in tensors if name.endswith("_shortcut")]
    cost = plan_cost(cfg, [D], "none", [kept] * n)
    assert cost.parameters == parameter_count(tensors) <= target * dense
    assert cost.macs == weight_macs_per_token(tensors, tied_embeddings=cfg.tied_embeddings)
    # 32 more neurons per block would overshoot: the most that fit
    assert plan_cost(cfg, [D], "none", [kept + 32] * n).parameters > target * dense


def test_mlp_only_budget_refuses_what_the_mlps_cannot_meet_and_any_narrowing():
    hf = tiny_hf_model("llama")
    for options, message in (({"target_params": 0.5}, "MLP neurons alone cannot fit"), ({"sparsity": 0.25}, "keeps every residual width"),
                             ({"target_params": 0.9, "allocation": "spectrum"}, "nothing to allocate")):  # fmt: skip
        model, cfg, _ = fused_model(source_of(hf))
        with pytest.raises(SliceGPTError, match=message):
            slice_fused(model, cfg, calibration(), rotation="none", **options)


@pytest.mark.parametrize(("rotation", "slice_head"), [("global", True), ("none", False)])
@pytest.mark.parametrize("family", FAMILIES)
def test_global_rotation_and_none_are_exact_and_store_no_shortcut(family, rotation, slice_head):
    hf = tiny_hf_model(family, dtype=torch.float64)
    ids = prompt()
    expected = oracle_logits(hf.state_dict(), hf.config.to_dict(), ids)
    model, cfg = slice_source(source_of(hf), calibration(), sparsity=0.0, rotation=rotation, slice_head=slice_head)
    assert (model(ids).logits - expected).abs().max().item() <= 1e-9
    assert not [n for n in model.named_weights() if n.endswith("_shortcut")]
    assert cfg.embedding_width == cfg.head_in == cfg.hidden_size


def test_tied_source_stays_tied_and_exact_at_sparsity_zero():
    hf = tiny_hf_model("llama-tied")
    ids = prompt()
    model, cfg = slice_source(source_of(hf), calibration(), sparsity=0.0)
    assert cfg.tied_embeddings and "lm_head.weight" not in model.named_weights()
    assert (model(ids).logits - hf(ids).logits).abs().max().item() <= 1e-5
    # stored: the dense count (the matrix once) without the 2n + 1 norm scales (folded away), plus the two
    # D x D projections beside the embedding and the shortcuts
    D, n = cfg.hidden_size, cfg.num_layers
    norms, projections, shortcuts = (2 * n + 1) * D, 2 * D * D, 2 * n * D * D
    assert parameter_count(model.named_weights()) == cfg.size["dense_parameters"] - norms + projections + shortcuts


@pytest.mark.parametrize("target", [0.9, 0.75, 0.6])
def test_budget_is_met_closely(target):
    hf = tiny_hf_model("llama-tied")
    model, cfg, _ = fused_model(source_of(hf))
    slice_fused(model, cfg, calibration(), target_params=target)
    stored = parameter_count(model.named_weights())
    dense = cfg.size["dense_parameters"]
    assert stored <= target * dense
    widths, rotation = plan_of(cfg), cfg.slicing["rotation"]
    if rotation == "none":  # the MLPs alone meet it: 32 more neurons per block would overshoot
        more = [w.intermediate + 32 for w in cfg.layers]
        assert plan_cost(cfg, widths, rotation, more).parameters > target * dense
        return
    # one more round_to step of every width would overshoot: the uniform plan is the widest that fits
    assert rotation == "block" and [w.intermediate for w in cfg.layers] == [kept_count(cfg.intermediate_size, 0.6)] * cfg.num_layers
    wider = [w + cfg.round_to for w in widths[:-1]] + widths[-1:]
    assert plan_cost(cfg, wider, rotation, [w.intermediate for w in cfg.layers]).parameters > target * dense


def test_budget_and_sparsity_are_exclusive():
    hf = tiny_hf_model("llama")
    model, cfg, _ = fused_model(source_of(hf))
    with pytest.raises(SliceGPTError, match="either --sparsity"):
        slice_fused(model, cfg, calibration(), sparsity=0.25, target_params=0.75)
    with pytest.raises(SliceGPTError, match=r"--target-params must be in \(0, 1\)"):
        slice_fused(model, cfg, calibration(), target_params=1.5)


def test_discarded_fraction_known_answer():
    r = discarded_fraction(torch.tensor([4.0, 3.0, 2.0, 1.0]))
    assert torch.allclose(r, torch.tensor([1.0, 0.6, 0.3, 0.1, 0.0], dtype=torch.float64))


def test_spectrum_allocation_cuts_the_signal_that_loses_least():
    hf = tiny_hf_model("llama")
    _, cfg, _ = fused_model(source_of(hf))
    D = cfg.hidden_size
    steep = torch.logspace(0, -8, D)  # almost all variance in the first directions
    flat = torch.ones(D)  # every direction matters equally
    spectra = [flat, steep, flat]  # embedding, block 0 output, block 1 output (the head's input)
    budget = plan_cost(cfg, [D, D, D], "block").parameters * 9 // 10
    widths = spectrum_plan(cfg, spectra, "block", budget, round_to=8, slice_head=False)
    assert widths[2] == D and widths[1] < widths[0]  # the head keeps D; the steep signal pays
    assert plan_cost(cfg, widths, "block").parameters <= budget


@pytest.mark.parametrize("basis", ["pca", "incoherent", "aligned"])
@pytest.mark.parametrize("family", FAMILIES)
def test_zero_padding_and_the_rotated_bases_are_exact(family, basis):
    hf = tiny_hf_model(family)
    model, cfg = slice_source(source_of(hf), calibration(), sparsity=0.25, rotation="block")  # width 48
    padded_cfg, padded = pad_residual_widths(cfg, model.named_weights(), 32, basis=basis)
    assert padded_cfg.embedding_width == 64 and {w.attn_in for w in padded_cfg.layers} == {64}
    ids = prompt()
    got = build_checked(padded_cfg, padded)(ids).logits
    # padding adds exact zeros; a rotation rounds every rotated weight to float32 once more
    assert (got - model(ids).logits).abs().max().item() <= (1e-5 if basis == "pca" else 5e-5)


@pytest.mark.parametrize("rotation", ["stage", "block"])
def test_the_aligned_basis_brings_every_shortcut_close_to_the_identity(rotation):
    model, cfg = slice_source(source_of(tiny_hf_model("llama")), calibration(), sparsity=0.25, rotation=rotation)
    shortcuts = {n: t for n, t in model.named_weights().items() if n.endswith("_shortcut")}
    assert shortcuts
    # ||S' - J|| / ||S'||: how much of each shortcut is left to quantize when J is applied exactly.  A random tiny
    # model's subspaces differ far more from block to block than a trained model's (SmolLM2: 0.07-0.08 aligned)
    rel = {}
    for basis in ("incoherent", "aligned"):
        _, padded = pad_residual_widths(cfg, model.named_weights(), 32, basis=basis)
        rel[basis] = torch.tensor([(padded.shortcut_delta(n).norm() / padded[n].norm()).item() for n in shortcuts])
    assert (rel["aligned"] <= rel["incoherent"] / 2).all() and rel["aligned"].max() < 0.8, rel


def test_the_incoherent_basis_spreads_an_outlier_coordinate_over_every_block():
    from slicegpt_export.exporters.padding import incoherent_rotation

    R = incoherent_rotation(512)  # (512, 512)
    assert torch.allclose(R @ R.T, torch.eye(512, dtype=torch.float64), atol=1e-12)
    x = torch.zeros(512, dtype=torch.float64)
    x[0], x[1:] = 100.0, 0.1  # a PCA basis: the outlier feature in coordinate 0
    blocks = (R @ x).view(16, 32)  # q8_0 blocks of the rotated activation
    # each block's largest entry is a small multiple of the block's rms: no block is one feature and 31 zeros
    assert (blocks.abs().amax(1) / blocks.pow(2).mean(1).sqrt()).max().item() < 3.0


@pytest.mark.parametrize("family", ["llama-tied", "phi"])
def test_pruned_mlps_are_recorded_counted_and_run_from_gguf(family, tmp_path):
    from slicegpt_export.checkpoint import save_checkpoint
    from slicegpt_export.exporters.gguf import export_gguf
    from slicegpt_export.validation.gguf_runner import GGUFModel

    hf = tiny_hf_model(family)
    model, cfg, _ = fused_model(source_of(hf))
    slice_fused(model, cfg, calibration(), target_params=0.8, ffn_keep=0.7)  # a given --ffn-keep: block rotation
    keep = 64  # 0.7 x 96 neurons, rounded down to a multiple of 32
    assert [w.intermediate for w in cfg.layers] == [keep] * cfg.num_layers
    tensors = model.named_weights()
    assert tensors["layers.0.up_proj.weight"].shape[0] == tensors["layers.0.down_proj.weight"].shape[1] == keep
    assert plan_cost(cfg, plan_of(cfg), cfg.slicing["rotation"], [keep] * cfg.num_layers).parameters == parameter_count(tensors)
    save_checkpoint(tmp_path / "ckpt", tensors=tensors, config=cfg, base_config=hf.config.to_dict())
    byte_tokenizer().save_pretrained(tmp_path / "ckpt")
    gguf_model = GGUFModel(export_gguf(checkpoint=tmp_path / "ckpt", out=tmp_path / "f32", gguf_type="f32"))
    assert [w.intermediate for w in gguf_model.config.layers] == [keep] * cfg.num_layers
    ids = prompt()
    assert (gguf_model.logits(ids) - model(ids).logits).abs().max().item() <= 1e-4


def refit_error(acts: torch.Tensor, down: torch.Tensor, kept: torch.Tensor) -> float:
    """||A_S W'^T - A W_down^T|| / ||A W_down^T||: the relative error of the least-squares refit on the kept neurons."""
    from slicegpt_export.converter.ffn import compensated_down

    target = acts @ down.T  # (tokens, d_out)
    return ((acts[:, kept] @ compensated_down(acts.T @ acts, down, kept).T - target).norm() / target.norm()).item()


@pytest.mark.parametrize("selection", ["obs", "energy"])
def test_least_squares_down_projection_beats_plain_dropping(selection):
    from slicegpt_export.converter.ffn import SELECTIONS, compensated_down

    gen = torch.Generator().manual_seed(0)
    basis = torch.randn(96, 24, generator=gen, dtype=torch.float64)  # activations of 96 neurons live in 24 dimensions
    acts = torch.randn(2000, 24, generator=gen, dtype=torch.float64) @ basis.T  # (tokens, F): correlated neurons
    down = torch.randn(16, 96, generator=gen, dtype=torch.float64)
    gram = acts.T @ acts
    kept = SELECTIONS[selection](gram, down, 48)
    assert kept.shape == (48,) and torch.equal(kept, kept.unique())
    target = acts @ down.T
    refit = acts[:, kept] @ compensated_down(gram, down, kept).T
    dropped = acts[:, kept] @ down[:, kept].T
    # 48 correlated neurons span the 24 dimensions: least squares recovers the output almost exactly
    assert (refit - target).norm() / target.norm() < 0.02 < (dropped - target).norm() / target.norm()


def test_elimination_keeps_what_the_others_cannot_rebuild():
    """Two copies of a loud neuron and a quiet one, keep two: ranking by energy keeps both copies and loses the quiet
    neuron's output; elimination with refitting drops one copy (the other takes its weight) and is exact up to the damping."""
    from slicegpt_export.converter.ffn import neurons_to_keep, neurons_to_keep_obs

    gen = torch.Generator().manual_seed(2)
    loud, quiet = 3 * torch.randn(500, 1, generator=gen, dtype=torch.float64), torch.randn(500, 1, generator=gen, dtype=torch.float64)
    acts = torch.cat((loud, loud, quiet), 1)  # (tokens, 3)
    down = torch.randn(8, 3, generator=gen, dtype=torch.float64)
    gram = acts.T @ acts
    assert neurons_to_keep(gram, down, 2).tolist() == [0, 1]
    assert refit_error(acts, down, neurons_to_keep(gram, down, 2)) > 0.05
    assert neurons_to_keep_obs(gram, down, 2)[-1].item() == 2
    assert refit_error(acts, down, neurons_to_keep_obs(gram, down, 2)) < 0.02  # the 1% damping's bias only


def test_elimination_beats_the_energy_ranking_on_correlated_neurons():
    from slicegpt_export.converter.ffn import neurons_to_keep, neurons_to_keep_obs

    gen = torch.Generator().manual_seed(3)
    mixing = torch.randn(128, 128, generator=gen, dtype=torch.float64) / 8  # (F, F): shared directions
    acts = torch.randn(3000, 128, generator=gen, dtype=torch.float64) @ (mixing + torch.eye(128, dtype=torch.float64))
    down = torch.randn(32, 128, generator=gen, dtype=torch.float64)
    gram = acts.T @ acts
    for keep in (96, 64, 32):
        assert refit_error(acts, down, neurons_to_keep_obs(gram, down, keep)) < 0.98 * refit_error(acts, down, neurons_to_keep(gram, down, keep))


def test_neuron_elimination_chooses_alike_with_any_thread_count():
    from slicegpt_export.converter.ffn import neurons_to_keep_obs

    gen = torch.Generator().manual_seed(4)
    acts = torch.randn(1600, 1536, generator=gen, dtype=torch.float64)
    gram, down = acts.T @ acts, torch.randn(576, 1536, generator=gen, dtype=torch.float64)  # (F, F), (D, F)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        two = neurons_to_keep_obs(gram, down, 864)
        torch.set_num_threads(1)
        one = neurons_to_keep_obs(gram, down, 864)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


def test_least_squares_down_projection_is_the_same_bits_with_any_thread_count():
    """LAPACK's threaded solve changes its last bits with 1 vs 2 threads at this size; the refit must not (data-parallel runs)."""
    from slicegpt_export.converter.ffn import compensated_down

    gen = torch.Generator().manual_seed(1)
    acts = torch.randn(1600, 1536, generator=gen, dtype=torch.float64)
    gram, down = acts.T @ acts, torch.randn(576, 1536, generator=gen, dtype=torch.float64)  # (F, F), (D, F)
    kept = torch.arange(0, 1536, 1)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        two = compensated_down(gram, down, kept)
        torch.set_num_threads(1)
        one = compensated_down(gram, down, kept)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


def test_sensitivity_curves_interpolate_and_steer_the_plan():
    from slicegpt_export.converter.sensitivity import interpolated, sensitivity_plan

    curve = {64: 0.0, 48: 0.1, 32: 0.4}
    assert interpolated(curve, 56) == pytest.approx(0.05) and interpolated(curve, 40) == pytest.approx(0.25)
    assert interpolated(curve, 64) == 0.0 and interpolated(curve, 16) > 0.4  # keeps rising past the narrowest probe
    hf = tiny_hf_model("llama")
    _, cfg, _ = fused_model(source_of(hf))
    D = cfg.hidden_size
    fragile, robust = {D: 0.0, 48: 1.0, 32: 3.0}, {D: 0.0, 48: 0.01, 32: 0.03}
    budget = plan_cost(cfg, [D, D, D], "block").parameters * 9 // 10
    widths = sensitivity_plan(cfg, [fragile, robust], "block", budget, round_to=8, slice_head=False)
    assert widths[0] == D and widths[1] < D and widths[2] == D  # the measured-robust signal pays, the head keeps D
    assert plan_cost(cfg, widths, "block").parameters <= budget
