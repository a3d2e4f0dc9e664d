"""Batch and cumulative analysis against plain Hugging Face models with the neurons removed from their weights,
with every reference metric computed in float64 and every tolerance derived from fp32 rounding (conftest)."""

import numpy as np
import pytest
import torch

import neuronscope_tl as ns
from neuronscope_tl.hooks import hook_count
from neuronscope_tl.texts import tokenize

from _reference import bridge_noise, impact_reference, impact_tolerances
from conftest import FP32_EPS, fold_mean_into_bias, hf_logits, load_hf, logit_noise, mlp_inputs, zero_output_weights

TEXTS = ["The council met on Tuesday to discuss the budget.", "Rain is expected across the coast tomorrow."]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def ties(clean, pruned, eta):
    """Positions whose top-1 can flip under rounding: the top two logits of either run are within 4 eta + ulps."""
    n = 0
    for logits in clean + pruned:
        top = logits.double().topk(2, dim=-1).values
        n += int(((top[:, 0] - top[:, 1]) <= 4 * eta + 4 * FP32_EPS * top[:, 0].abs()).sum())
    return n


def test_individual_impacts_equal_zeroed_weights_in_float64(tiny_model, tiny_dirs, tiny_kind):
    """Each candidate alone (batch_analysis, 2 texts per padded batch, and simulate_pruning, 1 text per pass) equals
    a plain HF model with that neuron's output weights zeroed, metrics computed in float64."""
    model_dir = tiny_dirs[tiny_kind]
    pairs = [(0, 4), (2, 9), (1, 1)]
    b = ns.batch_analysis(
        tiny_model, [{"layer_index": l, "neuron_index": n} for l, n in pairs], TEXTS, batch_size=2, progress=False
    )
    tokens = tokenize(tiny_model, TEXTS)
    n_positions = sum(len(t) for t in tokens)
    for (layer, neuron), row in zip(pairs, b.individual.itertuples()):
        impact, loss, top1, clean, pruned = impact_reference(
            model_dir, tokens, lambda hf: zero_output_weights(hf, layer, [neuron])
        )
        for batch_size, got in [(2, row), (1, ns.simulate_pruning(tiny_model, layer, [neuron], TEXTS, batch_size=1))]:
            eta = bridge_noise(tiny_model, model_dir, tokens, batch_size)
            kl_tol, loss_tol = impact_tolerances(clean, pruned, tokens, eta)
            assert abs(got.impact_score - impact) <= kl_tol, (layer, neuron, batch_size, got.impact_score, impact, kl_tol)
            assert abs(got.loss_change - loss) <= loss_tol, (layer, neuron, batch_size, got.loss_change, loss, loss_tol)
            assert abs(got.top1_agreement - top1) <= ties(clean, pruned, eta) / n_positions
        assert impact > 20 * kl_tol  # the comparison resolves the impact to within 5%, not just its magnitude
    assert (row.layer, row.neuron) == pairs[-1] and list(b.individual["label"]) == [f"L{l}N{n}" for l, n in pairs]
    assert hook_count(tiny_model) == 0


def test_every_cumulative_step_equals_zeroed_weights(tiny_model, tiny_dirs, tiny_kind):
    """Step k prunes candidates 0..k together: each step (the first included) against plain HF in float64."""
    model_dir = tiny_dirs[tiny_kind]
    pairs = [(0, 4), (2, 9), (0, 7), (1, 30)]
    b = ns.batch_analysis(tiny_model, pairs, TEXTS, progress=False)
    tokens = tokenize(tiny_model, TEXTS)
    eta = bridge_noise(tiny_model, model_dir, tokens, 1)
    assert list(b.cumulative.n_pruned) == [1, 2, 3, 4] and list(b.cumulative.step) == [1, 2, 3, 4]
    previous = None
    for k, row in enumerate(b.cumulative.itertuples(), start=1):

        def prune_first_k(hf, k=k):
            for layer, neuron in pairs[:k]:
                zero_output_weights(hf, layer, [neuron])
            return hf

        impact, loss, _, clean, pruned = impact_reference(model_dir, tokens, prune_first_k)
        kl_tol, loss_tol = impact_tolerances(clean, pruned, tokens, eta)
        assert abs(row.impact_score - impact) <= kl_tol, (k, row.impact_score, impact, kl_tol)
        assert abs(row.loss_change - loss) <= loss_tol, (k, row.loss_change, loss, loss_tol)
        assert (row.layer, row.neuron) == pairs[k - 1]
        if previous is not None:
            assert abs(impact - previous) > 2 * kl_tol  # each step changes the measured impact resolvably
        previous = impact


def test_recommendations_follow_verdicts(tiny_model):
    pairs = [(l, n) for l in range(3) for n in (0, 5)]
    first = ns.batch_analysis(tiny_model, pairs, TEXTS, progress=False)
    # thresholds between the measured impacts, so that every verdict occurs
    low, high = np.quantile(first.individual["impact_score"], [0.34, 0.67])
    th = ns.ImpactThresholds(safe_below=float(low), risky_from=float(high))
    b = ns.batch_analysis(tiny_model, pairs, TEXTS, thresholds=th, progress=False)
    rec = b.recommendations

    def verdict(impact):
        return "safe" if impact < low else ("moderate" if impact < high else "high")

    assert [r.verdict for r in b.individual.itertuples()] == [verdict(r.impact_score) for r in b.individual.itertuples()]
    assert [r.verdict for r in b.cumulative.itertuples()] == [verdict(r.impact_score) for r in b.cumulative.itertuples()]
    assert {r.verdict for r in b.individual.itertuples()} == {"safe", "moderate", "high"}
    assert list(b.individual["safe_to_prune"]) == [verdict(r.impact_score) == "safe" for r in b.individual.itertuples()]
    for key, name in [("safe_to_prune", "safe"), ("moderate", "moderate"), ("risky_to_prune", "high")]:
        expected = [(int(r.layer), int(r.neuron)) for r in b.individual.itertuples() if verdict(r.impact_score) == name]
        assert [(x["layer_index"], x["neuron_index"]) for x in rec[key]] == expected
    prefix = 0
    while prefix < len(b.cumulative) and b.cumulative.impact_score.iloc[prefix] < th.safe_below:
        prefix += 1
    assert rec["max_safe_prefix"] == prefix
    assert sum(len(rec[k]) for k in ("safe_to_prune", "moderate", "risky_to_prune")) == len(pairs)


def test_mean_ablation_equals_bias_folded_weights(tiny_model, tiny_dirs, tiny_kind):
    """Mean ablation with given calibration texts: the means equal the calibration mean of the HF output projection's
    input, and the impact equals a plain HF model with those means folded into the output bias (float64)."""
    model_dir = tiny_dirs[tiny_kind]
    calib = ["Shares fell in early trade.", "The weather bureau issued a warning."]
    layer, neurons = 1, [2, 3]
    means64 = mlp_inputs(load_hf(model_dir), tokenize(tiny_model, calib), layer).mean(0)[neurons]
    values = ns.impact.ablation_values(tiny_model, [layer], "mean", calib)[layer][neurons]
    # an fp32 mean of a few dozen activations: rounding <= n * eps * max|a| (recursive summation), far below the
    # differences between neurons
    torch.testing.assert_close(values.double(), means64, rtol=0, atol=64 * FP32_EPS * float(means64.abs().max() + 1))
    r = ns.simulate_pruning(tiny_model, layer, neurons, TEXTS, ablation="mean", calib_texts=calib)
    tokens = tokenize(tiny_model, TEXTS)
    impact, loss, _, clean, pruned = impact_reference(
        model_dir, tokens, lambda hf: fold_mean_into_bias(hf, layer, neurons, means64.float())
    )
    eta = bridge_noise(tiny_model, model_dir, tokens, 1)
    kl_tol, loss_tol = impact_tolerances(clean, pruned, tokens, eta)
    assert abs(r.impact_score - impact) <= kl_tol and abs(r.loss_change - loss) <= loss_tol
    zero_impact = impact_reference(model_dir, tokens, lambda hf: zero_output_weights(hf, layer, neurons))[0]
    assert abs(zero_impact - impact) > 10 * kl_tol  # mean and zero ablation are told apart
    assert r.ablation == "mean" and hook_count(tiny_model) == 0


def test_residual_changes_equal_zeroed_weights(tiny_model, tiny_dirs, tiny_kind):
    """activation_changes: ||R_pruned - R_orig||_F / ||R_orig||_F of each block's output from the ablated one on,
    against the decoder-layer outputs of plain HF models (read with torch forward hooks), in float64."""
    layer, neurons = 1, [0, 1, 2]
    r = ns.simulate_pruning(tiny_model, layer, neurons, TEXTS[0])
    ids = tokenize(tiny_model, TEXTS[:1])[0]

    def block_outputs(hf):
        blocks = hf.transformer.h if hasattr(hf, "transformer") else hf.model.layers
        out = {}
        handles = [
            blk.register_forward_hook(lambda m, a, o, k=k: out.__setitem__(k, (o[0] if isinstance(o, tuple) else o)[0].double()))
            for k, blk in enumerate(blocks)
        ]
        hf_logits(hf, ids)
        for h in handles:
            h.remove()
        return out

    clean = block_outputs(load_hf(tiny_dirs[tiny_kind]))
    pruned = block_outputs(zero_output_weights(load_hf(tiny_dirs[tiny_kind]), layer, neurons))
    # the rounding the bridge's residuals carry against plain HF's, measured on the clean forward
    with torch.no_grad():
        _, cache = tiny_model.run_with_cache(ids[None], names_filter=lambda name: name.endswith("hook_resid_post"))
    eta = max(logit_noise(cache[f"blocks.{l}.hook_resid_post"][0], clean[l]) for l in clean)
    assert [c["layer"] for c in r.activation_changes] == [1, 2]
    for c in r.activation_changes:
        r0, r1 = clean[c["layer"]], pruned[c["layer"]]
        expected = float((r1 - r0).norm() / r0.norm())
        # Elements off by <= eta move ||R_pruned - R_orig|| by <= 2 eta sqrt(N) and ||R_orig|| by <= eta sqrt(N), so
        # the ratio c by <= (2 + c) eta sqrt(N) / ||R_orig||; the fp32 subtraction adds eps c. Doubled as a margin.
        spread = eta * r0.numel() ** 0.5 / float(r0.norm())
        tol = 2 * ((2 + expected) * spread + FP32_EPS * expected)
        assert abs(c["relative_change"] - expected) <= tol, (c, expected, tol)
        assert expected > 1000 * tol  # the ablation moved the residual stream far beyond rounding


def test_batching_does_not_change_results(tiny_model, tiny_dirs, tiny_kind):
    """One text per pass and three right-padded texts per pass give the same numbers within the fp32 rounding that
    padding (other matmul shapes) may change, measured and bounded as in conftest.kl_tolerance."""
    texts = TEXTS + ["Short."]
    a = ns.simulate_pruning(tiny_model, 0, [1, 2], texts, batch_size=1)
    b = ns.simulate_pruning(tiny_model, 0, [1, 2], texts, batch_size=3)
    tokens = tokenize(tiny_model, texts)
    _, _, _, clean, pruned = impact_reference(tiny_dirs[tiny_kind], tokens, lambda hf: zero_output_weights(hf, 0, [1, 2]))
    eta = max(
        bridge_noise(tiny_model, tiny_dirs[tiny_kind], tokens, 1), bridge_noise(tiny_model, tiny_dirs[tiny_kind], tokens, 3)
    )
    kl_tol, loss_tol = impact_tolerances(clean, pruned, tokens, eta, runs=2)
    assert abs(a.impact_score - b.impact_score) <= kl_tol
    assert abs(a.loss_change - b.loss_change) <= loss_tol
    assert a.n_tokens == b.n_tokens == sum(len(t) for t in tokens)
    assert a.impact_score > 20 * kl_tol
