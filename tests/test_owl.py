"""Outlier-weighted layer sparsity (``scope='owl'``): the counts against a numpy computation of the OWL rule, the
selection within each layer, and sequential calibration's counts against statistics read from hooks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import neuronscope_tl as ns
from neuronscope_tl import scores, selection, sequential, surgery
from neuronscope_tl.hooks import hook_count

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def owl_reference(score: np.ndarray, sparsity: float, factor: float, spread: float) -> np.ndarray:
    """Layer sparsities of OWL (Yin et al. 2024) as written in its reference code, in numpy: outlier ratio per layer,
    min-max scaled to [0, 2 * spread], shifted to mean 1 - sparsity, as a sparsity."""
    ratio = np.array([np.mean(row > factor * row.mean()) for row in score])
    keep = (ratio - ratio.min()) * (1 / (ratio.max() - ratio.min()) * spread * 2)
    keep = keep - keep.mean() + (1 - sparsity)
    return 1 - keep


@pytest.mark.parametrize("sparsity", [0.1, 0.3, 0.5])
def test_counts_follow_the_owl_rule(sparsity):
    rng = np.random.default_rng(0)
    n_layers, d = 12, 400
    score = rng.lognormal(0, rng.uniform(0.5, 1.6, size=(n_layers, 1)), size=(n_layers, d))
    counts = np.array(selection.owl_layer_counts(torch.tensor(score), sparsity, factor=3.0, spread=0.08))
    target = owl_reference(score, sparsity, 3.0, 0.08) * d
    assert np.abs(counts - target).max() < 1 + 1e-9
    assert counts.sum() == round(sparsity * d * n_layers)
    assert np.ptp(target) > 0.1 * d  # the layers really differ here
    ratio = np.array([np.mean(row > 3.0 * row.mean()) for row in score])
    order = np.argsort(ratio, kind="stable")
    assert np.all(np.diff(counts[order]) <= 1)  # more outliers: fewer neurons removed (up to rounding)


def test_equal_outlier_ratios_give_uniform_counts_and_bad_input_is_refused():
    assert selection.owl_layer_counts(torch.ones(4, 10), 0.3) == [3, 3, 3, 3]
    assert selection.owl_layer_counts(torch.ones(4, 10), 0.0) == [0, 0, 0, 0]
    assert sorted(selection.owl_layer_counts(torch.ones(4, 10), 0.25)) == [2, 2, 3, 3]  # 2.5 each: 10 in all
    for spread in (0.5, -0.1, float("nan"), True):
        with pytest.raises(ValueError, match=r"\[0, 0.5\)"):
            selection.owl_layer_counts(torch.ones(4, 10), 0.3, spread=spread)
    for factor in (0, float("inf"), float("nan"), True):
        with pytest.raises(ValueError, match="factor"):
            selection.owl_layer_counts(torch.ones(4, 10), 0.3, factor=factor)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        selection.owl_layer_counts(torch.ones(4, 10), 1.0)


@pytest.mark.parametrize("method", ["wanda", "obs"])
def test_owl_scope_selects_each_layers_count_by_the_method(tiny_model, method):
    cal = selection.calibrate(tiny_model, list(ns.lee_articles()[:30]), 1024)
    counts = selection.owl_layer_counts(selection.owl_outlier_scores(cal), 0.4)
    chosen = selection.select_neurons(tiny_model, cal, method, 0.4, "owl", "zero")
    assert [len(chosen.get(l, [])) for l in range(cal.shape[0])] == counts
    for layer, neurons in chosen.items():
        assert neurons == scores.get(method).select_layer(tiny_model, cal, layer, counts[layer], "zero")


def test_sequential_owl_counts_come_from_dense_hook_statistics(tiny_model):
    """The per-layer counts of sequential calibration under scope 'owl' equal the OWL rule applied to structured
    Wanda computed from activations captured with a plain run_with_cache on the dense model."""
    texts = list(ns.lee_articles()[:40])
    w = sequential.calibration_windows(tiny_model, {"a": texts[:20], "b": texts[20:]}, 1024, 32)
    res = sequential.sequential_spec(tiny_model, w, "wanda", 0.4, "zero", refit=None, scope="owl")
    info = ns.mlp_info(tiny_model)
    sq = torch.zeros(info.n_layers, info.d_mlp, dtype=torch.float64)
    with torch.no_grad():
        _, cache = tiny_model.run_with_cache(w.tokens, names_filter=lambda n: n.endswith("mlp.hook_post"))
    for l in range(info.n_layers):
        sq[l] = cache[f"blocks.{l}.mlp.hook_post"].double().pow(2).mean((0, 1))
    wanda = surgery.output_matrix(tiny_model).double().norm(dim=2) * sq.sqrt()
    counts = selection.owl_layer_counts(wanda, 0.4)
    assert [len(res.spec.neurons.get(l, [])) for l in range(info.n_layers)] == counts
    assert len(set(counts)) > 1 and hook_count(tiny_model) == 0
    with pytest.raises(ValueError, match="per_layer' or 'owl"):
        sequential.sequential_spec(tiny_model, w, "wanda", 0.4, "zero", refit=None, scope="global")
