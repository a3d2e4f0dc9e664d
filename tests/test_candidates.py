"""Candidate evidence against activations captured from the plain HF model with PyTorch forward hooks."""

import numpy as np
import pytest
import torch

import neuronscope_tl as ns
from neuronscope_tl import candidates

from conftest import FP32_EPS, logit_noise, single_and_padded_activations, stat_tolerances

CALIB = ["The council met on Tuesday to discuss the budget.", "Rain is expected across the coast tomorrow.", "Shares fell."]


def hf_mlp_inputs(hf, kind, texts, tokens):
    """Per layer, the input of the MLP's output projection (down_proj / c_proj) on every token: [n_tokens, d_mlp]."""
    layers = hf.transformer.h if kind == "gpt2" else hf.model.layers
    proj = [l.mlp.c_proj if kind == "gpt2" else l.mlp.down_proj for l in layers]
    seen = {i: [] for i in range(len(proj))}
    handles = [p.register_forward_hook(lambda m, inp, out, i=i: seen[i].append(inp[0][0].double())) for i, p in enumerate(proj)]
    try:
        with torch.no_grad():
            for ids in tokens:
                hf(ids[None])
    finally:
        for h in handles:
            h.remove()
    w_out = [(p.weight.double() if kind == "gpt2" else p.weight.double().t()) for p in proj]  # [d_mlp, d_model]
    return [torch.cat(seen[i]).numpy() for i in range(len(proj))], [w.detach().numpy() for w in w_out]


def test_evidence_matches_hf_activations(tiny_model, fresh_hf, tiny_kind):
    tokens = [tiny_model.to_tokens(t)[0] for t in CALIB]
    acts, w_out = hf_mlp_inputs(fresh_hf, tiny_kind, CALIB, tokens)
    ev = candidates.activation_evidence(tiny_model, CALIB, calib_tokens=None, safe_percentile=30.0)
    bridge, _ = single_and_padded_activations(tiny_model, tokens, 1)
    for layer, (a, w) in enumerate(zip(acts, w_out)):
        rows = ev[ev.layer == layer].sort_values("neuron")
        rms = np.sqrt((a**2).mean(0))
        score = rms * np.linalg.norm(w, axis=1)
        # the bridge's fp32 activations differ from plain HF's by at most eta (measured, floored at 4 ulps); the RMS
        # then moves by <= eta (conftest.stat_tolerances), the score by ||w|| eta plus the fp32 norm's rounding
        eta = logit_noise(bridge[layer], torch.from_numpy(a))
        rms_tol = stat_tolerances(torch.from_numpy(a), eta, 0.01)["rms"]
        norm = np.linalg.norm(w, axis=1)
        assert (np.abs(rows.activation_rms.to_numpy() - rms) <= rms_tol).all()
        score_tol = norm * rms_tol + score * (w.shape[1] + 2) * FP32_EPS
        assert (np.abs(rows.activation_score.to_numpy() - score) <= score_tol).all()
        larger = np.array([(score > s * (1 + 1e-3)).sum() for s in score])
        larger_or_tied = np.array([(score > s * (1 - 1e-3)).sum() - 1 for s in score])
        safety = rows.safety_score.to_numpy() * (len(score) - 1)
        assert np.all(safety >= larger - 1e-9) and np.all(safety <= larger_or_tied + 1e-9)
        flagged = rows.is_pruning_candidate.to_numpy()
        cut = np.percentile(rows.activation_score.to_numpy(), 30.0)
        assert (flagged == (rows.activation_score.to_numpy() <= cut)).all()
        assert 0 < flagged.sum() < len(flagged)  # both flags occur
        # safety score is graded, not a rank transform of the weight: the flagged have the highest safety
        assert rows.safety_score[flagged].min() > rows.safety_score[~flagged].max() - 1e-12


def test_assessed_candidates_are_the_weight_ranking_with_evidence(tiny_model):
    ranked = ns.pruning_candidates(tiny_model, 25.0)
    assessed = ns.assess_candidates(tiny_model, 25.0, safe_percentile=50.0, calib_texts=CALIB, calib_tokens=None)
    assert list(zip(assessed.layer, assessed.neuron)) == list(zip(ranked.layer, ranked.neuron))
    np.testing.assert_array_equal(assessed.weight_score, ranked.mean_abs_weight)
    ev = ns.activation_evidence(tiny_model, CALIB, calib_tokens=None, safe_percentile=50.0).set_index(["layer", "neuron"])
    joined = ev.loc[list(zip(assessed.layer, assessed.neuron))]
    np.testing.assert_array_equal(assessed.is_pruning_candidate, joined.is_pruning_candidate)
    np.testing.assert_array_equal(assessed.safety_score, joined.safety_score)


def test_candidate_objects_and_documents(tiny_model):
    table = ns.assess_candidates(tiny_model, 50.0, calib_texts=CALIB, calib_tokens=None)
    objs = candidates.candidate_objects(table)
    assert len(objs) == len(table)
    for obj, row in zip(objs, table.itertuples()):
        assert (obj.layer_index, obj.neuron_index, obj.is_pruning_candidate) == (row.layer, row.neuron, row.is_pruning_candidate)
        assert obj.to_dict()["safety_score"] == row.safety_score and obj["rank_in_layer"] == row.rank_in_layer
    doc = candidates.candidates_document(table, 50.0)
    assert doc["total_candidates"] == len(table) and doc["safe_candidates"] == int(table.is_pruning_candidate.sum())
    assert "poor guide" in doc["limits"] and len(doc["candidates"]) == len(table)


def test_first_candidates_spread_over_layers(tiny_model):
    table = ns.assess_candidates(tiny_model, 50.0, calib_texts=CALIB, calib_tokens=None)
    first = candidates.first_candidates(table, 4)
    assert first.is_pruning_candidate.all()
    safe = table[table.is_pruning_candidate]
    layers_with_safe = sorted(safe.layer.unique())
    # one per layer before any layer gets a second, each the layer's lowest-weight flagged neuron
    head = first.head(len(layers_with_safe))
    assert sorted(head.layer) == layers_with_safe[: len(head)]
    for r in head.itertuples():
        assert r.rank_in_layer == safe[safe.layer == r.layer].rank_in_layer.min()


@pytest.mark.parametrize("bad", [0, 101, float("nan"), 2**64 * 1e300, 10**400, "25", True])
def test_bad_safe_percentile(tiny_model, bad):
    with pytest.raises(ValueError, match=r"safe_percentile must be in \(0, 100\]"):
        ns.assess_candidates(tiny_model, 10.0, safe_percentile=bad, calib_texts=CALIB)


def test_calibration_pass_is_shared_and_keyed_by_texts(tiny_model):
    a = ns.calibration_stats(tiny_model, CALIB, None)
    assert ns.calibration_stats(tiny_model, CALIB, None) is a
    b = ns.calibration_stats(tiny_model, CALIB[:1], None)
    assert b is not a and b.n_tokens < a.n_tokens
