"""Exact ablation on the model's tail: equal to the naive one-run-per-neuron simulate_pruning, for both MLP kinds."""

from __future__ import annotations

import pytest
import torch

import neuronscope_tl as ns
from neuronscope_tl import ablation, hooks
from neuronscope_tl.texts import tokenize

from _reference import impact_reference, impact_tolerances
from conftest import FP32_EPS, fold_mean_into_bias, fp32_forward_error, load_hf, mlp_inputs, nll_tolerance, zero_output_weights

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Prices rose sharply on Monday, the agency said."]
PAIRS = [(2, 7), (0, 1), (1, 5), (2, 3), (0, 30), (2, 0), (1, 40)]  # uneven per layer, given out of layer order


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on a shared, loaded 2-core machine two OpenMP threads can make
    each tiny matmul 100x slower (barrier waits)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_tail_from_layer_zero_reproduces_the_model(tiny_model):
    ids = tokenize(tiny_model, TEXTS[:1])[0][None]
    store: dict = {}
    with torch.no_grad():
        with hooks.attached_hooks(tiny_model, [("blocks.0.hook_resid_pre", hooks.capture_hook(store, "r"))]):
            logits = tiny_model(ids)
        tail = ablation.model_tail(tiny_model)
        mine = tail.head(tail.norm(ablation.run_body(tail, store["r"], 0)))
    # the same HF modules, called directly instead of through the bridge: within two routes' measured fp32 error
    hf = load_hf(tiny_model.original_model.config._name_or_path)
    atol = 4 * max(fp32_forward_error(hf, [ids[0]]), 4 * FP32_EPS * float(logits.abs().max()))
    torch.testing.assert_close(mine, logits, atol=atol, rtol=0)


@pytest.mark.parametrize("mode", ["zero", "mean"])
def test_matches_float64_reference_and_naive_simulate_pruning(tiny_model, tiny_dirs, tiny_kind, mode):
    """Each neuron's loss change and KL from the tail against a plain HF model with the neuron removed from its
    weights (zeroed, or its calibration mean folded into the output bias), in float64; and against the naive
    one-simulation-per-neuron route, both within derived fp32 bounds."""
    before = hooks.hook_count(tiny_model)
    df = ablation.ablate_each(tiny_model, PAIRS, TEXTS, mode, calib_texts=TEXTS, stack=2)
    assert hooks.hook_count(tiny_model) == before
    assert list(zip(df["layer"], df["neuron"])) == PAIRS  # rows in the given order
    model_dir = tiny_dirs[tiny_kind]
    tokens = tokenize(tiny_model, TEXTS)
    hf = load_hf(model_dir)
    # the tail, stacked copies and the full model are different fp32 routes: twice the measured forward error
    eta = 2 * fp32_forward_error(hf, tokens)
    means = {l: mlp_inputs(hf, tokens, l).mean(0) for l in {l for l, _ in PAIRS}} if mode == "mean" else None
    for (layer, neuron), row in zip(PAIRS, df.itertuples()):
        if mode == "zero":
            change = lambda m, l=layer, n=neuron: zero_output_weights(m, l, [n])
        else:
            change = lambda m, l=layer, n=neuron: fold_mean_into_bias(m, l, [n], means[l][[n]].float())
        impact, loss, _, clean, pruned = impact_reference(model_dir, tokens, change)
        kl_tol, loss_tol = impact_tolerances(clean, pruned, tokens, eta)
        assert abs(row.kl - impact) <= kl_tol, (layer, neuron, row.kl, impact, kl_tol)
        assert abs(row.loss_change - loss) <= loss_tol, (layer, neuron, row.loss_change, loss, loss_tol)
        naive = ns.simulate_pruning(tiny_model, layer, [neuron], TEXTS, mode, calib_texts=TEXTS)
        kl_tol2, loss_tol2 = impact_tolerances(clean, pruned, tokens, eta, runs=2)
        assert abs(row.kl - naive.impact_score) <= kl_tol2 and abs(row.loss_change - naive.loss_change) <= loss_tol2
        orig_tol = float(torch.cat([nll_tolerance(c, t, eta, runs=2) for c, t in zip(clean, tokens)]).mean())
        assert abs(row.loss_original - naive.loss_original) <= orig_tol
    assert df["kl"].gt(0).all()  # every ablation changed something, so the checks above have teeth


@pytest.mark.default_model
def test_default_model_matches_naive(default_model):
    pairs = [(29, 5), (3, 100), (15, 1535)]
    df = ablation.ablate_each(default_model, pairs, TEXTS[:1])
    ids = tokenize(default_model, TEXTS[:1])[0]
    hf = default_model.original_model
    # the tail and the full forward are two fp32 routes through 30 blocks: each within the forward's fp32 error,
    # measured against a float64 copy of the weights; the bounds of conftest (runs=2) with that error doubled
    eta = 2 * fp32_forward_error(hf, [ids])
    for (layer, neuron), row in zip(pairs, df.itertuples()):
        naive = ns.simulate_pruning(default_model, layer, [neuron], TEXTS[:1])
        with torch.no_grad():
            clean = default_model(ids[None])[0]
            with hooks.attached_hooks(default_model, [(hooks.mlp_post_name(layer), hooks.ablation_hook([neuron]))]):
                pruned = default_model(ids[None])[0]
        kl_tol, loss_tol = impact_tolerances([clean], [pruned], [ids], eta, runs=2)
        assert abs(row.loss_change - naive.loss_change) <= loss_tol, (layer, neuron, row.loss_change, naive.loss_change, loss_tol)
        assert abs(row.kl - naive.impact_score) <= kl_tol, (layer, neuron, row.kl, naive.impact_score, kl_tol)


@pytest.mark.parametrize("tiny_kind", ["llama"])
def test_bad_input(tiny_model):
    with pytest.raises(ValueError, match="unknown ablation"):
        ablation.ablate_each(tiny_model, [(0, 1)], TEXTS, "half")
    with pytest.raises(ValueError, match="out of range"):
        ablation.ablate_each(tiny_model, [(0, 10_000)], TEXTS)
    with pytest.raises(ValueError, match="out of range"):
        ablation.ablate_each(tiny_model, [(7, 1)], TEXTS)
    with pytest.raises(ValueError, match="at least one"):
        ablation.ablate_each(tiny_model, [], TEXTS)
    with pytest.raises(ValueError, match="non-empty"):
        ablation.ablate_each(tiny_model, [(0, 1)], [])
    with pytest.raises(ValueError, match="stack"):
        ablation.ablate_each(tiny_model, [(0, 1)], TEXTS, stack=0)


@pytest.mark.parametrize("tiny_kind", ["gpt2"])
def test_exception_in_the_tail_leaves_no_hooks(tiny_model, monkeypatch):
    before = hooks.hook_count(tiny_model)

    def boom(*args, **kwargs):
        assert hooks.hook_count(tiny_model) > before
        raise RuntimeError("interrupted")

    monkeypatch.setattr(ablation, "run_body", boom)
    with pytest.raises(RuntimeError, match="interrupted"):
        ablation.ablate_each(tiny_model, PAIRS, TEXTS)
    assert hooks.hook_count(tiny_model) == before
    assert all(p.grad is None for p in tiny_model.parameters())
