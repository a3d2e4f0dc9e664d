"""Batch and cumulative analysis against single simulations and zeroed raw weights."""

import numpy as np
import pytest
import torch

import neuronscope_tl as ns
from neuronscope_tl.hooks import hook_count

from conftest import zero_output_weights

TEXTS = ["The council met on Tuesday to discuss the budget.", "Rain is expected across the coast tomorrow."]


def test_individual_equals_simulate(tiny_model):
    cands = [{"layer_index": 0, "neuron_index": 4}, {"layer_index": 2, "neuron_index": 9}, {"layer_index": 1, "neuron_index": 1}]
    b = ns.batch_analysis(tiny_model, cands, TEXTS, batch_size=2, progress=False)
    for c, row in zip(cands, b.individual.itertuples()):
        r = ns.simulate_pruning(tiny_model, c["layer_index"], [c["neuron_index"]], TEXTS)
        assert row.impact_score == pytest.approx(r.impact_score, rel=1e-5, abs=1e-9)
        assert row.loss_change == pytest.approx(r.loss_change, abs=1e-6)
    assert b.cumulative.impact_score.iloc[0] == pytest.approx(b.individual.impact_score.iloc[0])
    assert hook_count(tiny_model) == 0


def test_cumulative_step_equals_zeroed_weights(tiny_model, fresh_hf):
    pairs = [(0, 4), (2, 9), (0, 7)]
    b = ns.batch_analysis(tiny_model, pairs, TEXTS[:1], progress=False)
    toks = tiny_model.to_tokens(TEXTS[0])
    with torch.no_grad():
        p = torch.softmax(fresh_hf(toks).logits[0].double(), -1).numpy()
        for layer, neuron in pairs:
            zero_output_weights(fresh_hf, layer, [neuron])
        q = torch.softmax(fresh_hf(toks).logits[0].double(), -1).numpy()
    kl = (p * (np.log(p) - np.log(q))).sum(-1).mean()
    assert b.cumulative.impact_score.iloc[-1] == pytest.approx(kl, rel=1e-4, abs=1e-7)
    assert list(b.cumulative.n_pruned) == [1, 2, 3]


def test_recommendations_follow_verdicts(tiny_model):
    pairs = [(l, n) for l in range(3) for n in (0, 5)]
    th = ns.ImpactThresholds(safe_below=1e-3, risky_from=1e-2)
    b = ns.batch_analysis(tiny_model, pairs, TEXTS, thresholds=th, progress=False)
    rec = b.recommendations
    for key, verdict in [("safe_to_prune", "safe"), ("moderate", "moderate"), ("risky_to_prune", "high")]:
        expected = [(int(r.layer), int(r.neuron)) for r in b.individual.itertuples() if r.verdict == verdict]
        assert [(x["layer_index"], x["neuron_index"]) for x in rec[key]] == expected
    prefix = 0
    while prefix < len(b.cumulative) and b.cumulative.impact_score.iloc[prefix] < th.safe_below:
        prefix += 1
    assert rec["max_safe_prefix"] == prefix
    assert sum(len(rec[k]) for k in ("safe_to_prune", "moderate", "risky_to_prune")) == len(pairs)


def test_mean_ablation_uses_calibration_means(tiny_model):
    calib = ["Shares fell in early trade.", "The weather bureau issued a warning."]
    means = ns.stream_activations(tiny_model, calib, layers=[1], progress=False).mean[0].float()
    r = ns.simulate_pruning(tiny_model, 1, [2, 3], TEXTS, ablation="mean", calib_texts=calib)
    from neuronscope_tl.hooks import ablation_hook, attached_hooks, mlp_post_name

    toks = tiny_model.to_tokens(TEXTS[0])
    with torch.no_grad():
        clean = tiny_model(toks)
        with attached_hooks(tiny_model, [(mlp_post_name(1), ablation_hook([2, 3], means[[2, 3]]))]):
            pruned = tiny_model(toks)
    one = ns.simulate_pruning(tiny_model, 1, [2, 3], TEXTS[0], ablation="mean", calib_texts=calib)
    assert one.impact_score == pytest.approx(float(ns.token_kl(clean, pruned).mean()), rel=1e-5)
    assert r.ablation == "mean" and r.impact_score > 0


def test_residual_changes_match_cache(tiny_model):
    from neuronscope_tl.hooks import ablation_hook, attached_hooks, mlp_post_name

    r = ns.simulate_pruning(tiny_model, 1, [0, 1, 2], TEXTS[0])
    toks = tiny_model.to_tokens(TEXTS[0])
    names = lambda n: n.endswith("hook_resid_post")
    _, clean = tiny_model.run_with_cache(toks, names_filter=names)
    with attached_hooks(tiny_model, [(mlp_post_name(1), ablation_hook([0, 1, 2]))]):
        _, pruned = tiny_model.run_with_cache(toks, names_filter=names)
    assert [c["layer"] for c in r.activation_changes] == [1, 2]
    for c in r.activation_changes:
        key = f"blocks.{c['layer']}.hook_resid_post"
        expected = (pruned[key] - clean[key]).norm() / clean[key].norm()
        assert c["relative_change"] == pytest.approx(float(expected), rel=1e-4)


def test_batching_does_not_change_results(tiny_model):
    a = ns.simulate_pruning(tiny_model, 0, [1, 2], TEXTS + ["Short."], batch_size=1)
    b = ns.simulate_pruning(tiny_model, 0, [1, 2], TEXTS + ["Short."], batch_size=3)
    assert a.impact_score == pytest.approx(b.impact_score, rel=1e-4)  # fp32 batched-matmul rounding
    assert a.loss_change == pytest.approx(b.loss_change, abs=1e-6)
    assert a.n_tokens == b.n_tokens
