"""Weight statistics against numpy on the raw HF weights."""

import json

import numpy as np
import pytest
import torch

import neuronscope_tl as ns
from neuronscope_tl import weights


def raw_mlp(hf, kind, layer):
    """(input-side matrices as [d_mlp, d_model] rows per neuron, output matrix [d_mlp, d_model], bias or None)."""
    if kind == "gpt2":
        mlp = hf.transformer.h[layer].mlp
        return [mlp.c_fc.weight.detach().numpy().T], mlp.c_proj.weight.detach().numpy(), mlp.c_fc.bias.detach().numpy()
    mlp = hf.model.layers[layer].mlp
    ins = [mlp.up_proj.weight.detach().numpy(), mlp.gate_proj.weight.detach().numpy()]
    return ins, mlp.down_proj.weight.detach().numpy().T, None


def test_sparsity_counts_match_numpy(tiny_dirs, tiny_kind):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_dirs[tiny_kind])
    with torch.no_grad():  # plant exact zeros, then save and reload through the library
        next(p for p in hf.parameters() if p.dim() == 2)[:3, :5] = 0.0
    d = tiny_dirs[tiny_kind] + "-zeros"
    hf.save_pretrained(d)
    ns.load_model(tiny_dirs[tiny_kind]).tokenizer.save_pretrained(d)
    model = ns.load_model(d)
    wa = ns.analyze_weights(model, near_zero_threshold=0.01)
    state = {k: v.numpy() for k, v in AutoModelForCausalLM.from_pretrained(d).state_dict().items()}
    unique = {}
    for k, v in state.items():
        unique[v.__array_interface__["data"][0]] = v  # tied weights share storage
    flat = np.concatenate([v.ravel() for v in unique.values()])
    assert wa.total_parameters == flat.size == sum(p.numel() for p in hf.parameters()) == model.n_params_total
    assert wa.zero_parameters == int((flat == 0).sum()) >= 15
    assert wa.overall_sparsity == pytest.approx((flat == 0).mean())
    assert wa.near_zero_fraction == pytest.approx((np.abs(flat) < 0.01).mean())


def test_layer_stats_and_histogram_match_numpy(tiny_model, fresh_hf, tiny_kind):
    wa = ns.analyze_weights(tiny_model, bins=20)
    layer = 1
    ins, out, _ = raw_mlp(fresh_hf, tiny_kind, layer)
    a = np.abs(out)
    st = wa.layers[layer]["W_out"]
    assert st["mean_abs"] == pytest.approx(a.mean(), rel=1e-6)
    assert st["std_abs"] == pytest.approx(a.std(), rel=1e-5)
    for q, v in st["quantiles_abs"].items():
        assert v == pytest.approx(np.quantile(a, float(q)), rel=1e-5)
    hist = st["histogram_abs"]
    counts, edges = np.histogram(a, bins=np.array(hist["edges"]))
    assert hist["counts"] == counts.tolist() and sum(hist["counts"]) == a.size
    assert wa.layers[layer]["W_in"]["mean_abs"] == pytest.approx(np.abs(ins[0]).mean(), rel=1e-6)
    assert ("W_gate" in wa.layers[layer]) == (tiny_kind == "llama")


def test_neuron_table_matches_numpy(tiny_model, fresh_hf, tiny_kind):
    table = ns.neuron_weight_table(tiny_model)
    info = ns.mlp_info(tiny_model)
    assert len(table) == info.n_layers * info.d_mlp
    layer = 2
    ins, out, bias = raw_mlp(fresh_hf, tiny_kind, layer)
    rows = table[table.layer == layer].sort_values("neuron")
    np.testing.assert_allclose(rows.w_in_norm, np.linalg.norm(ins[0], axis=1), rtol=1e-5)
    np.testing.assert_allclose(rows.w_out_norm, np.linalg.norm(out, axis=1), rtol=1e-5)
    mean_abs = np.concatenate([np.abs(m) for m in ins + [out]], axis=1).mean(1)
    np.testing.assert_allclose(rows.mean_abs_weight, mean_abs, rtol=1e-5)
    if bias is None:
        assert rows.bias.isna().all() and not rows.w_gate_norm.isna().any()
    else:
        np.testing.assert_allclose(rows.bias, bias, rtol=1e-6)
    assert list(rows.label[:2]) == [f"L{layer}N0", f"L{layer}N1"]


@pytest.mark.parametrize(
    "value,band", [(0.0, "very_low"), (0.0099, "very_low"), (0.01, "low"), (0.049, "low"), (0.05, "normal"), (3.0, "normal")]
)
def test_bands(value, band):
    assert weights.band_of(value) == band


@pytest.mark.parametrize("pct", [5.0, 10.0, 50.0, 100.0])
def test_candidates_are_the_layer_percentile(tiny_model, pct):
    table = ns.neuron_weight_table(tiny_model)
    cands = ns.pruning_candidates(tiny_model, pct)
    for layer, group in table.groupby("layer"):
        scores = group.mean_abs_weight.to_numpy()
        expected = set(group.neuron[scores <= np.percentile(scores, pct)])
        got = cands[cands.layer == layer]
        assert set(got.neuron) == expected
        # ranked within the layer: rank r is the r-th smallest mean |w| of the whole layer
        order = group.neuron.to_numpy()[np.argsort(scores, kind="stable")]
        assert list(got.neuron) == list(order[: len(got)])
        assert list(got.rank_in_layer) == list(range(len(got)))
    assert "is_pruning_candidate" not in cands and "safety_score" not in cands  # weight rank is no evidence


def test_weight_analyzer_items(tiny_model, tmp_path):
    calib = ["The council met on Tuesday to discuss the budget.", "Rain is expected across the coast tomorrow."]
    analyzer = ns.WeightAnalyzer(tiny_model, calib_texts=calib)
    summary = analyzer.get_sparsity_analysis()
    assert {"overall_sparsity", "total_parameters", "near_zero_fraction", "layers"} <= set(summary)
    items = analyzer.identify_pruning_candidates(threshold_percentile=50.0, safe_percentile=40.0)
    assert all(isinstance(i, ns.PruningCandidate) for i in items)
    flags = [i.is_pruning_candidate for i in items]
    assert any(flags) and not all(flags)
    ev = ns.activation_evidence(tiny_model, calib, safe_percentile=40.0).set_index(["layer", "neuron"])
    for i in items:
        row = ev.loc[(i.layer_index, i.neuron_index)]
        assert (i.is_pruning_candidate, i.safety_score) == (bool(row.is_pruning_candidate), float(row.safety_score))
    paths = analyzer.export_weight_analysis(tmp_path / "w.json")
    assert [p.name for p in paths] == ["w.json", "w_neurons.csv"]
    doc = json.loads(paths[0].read_text())
    assert doc["result"]["total_parameters"] == summary["total_parameters"]


@pytest.mark.parametrize("bad", [10**400, -1e-9, 0, float("inf"), "0.01", True])
def test_bad_near_zero_threshold(tiny_model, bad):
    with pytest.raises(ValueError, match="near_zero_threshold must be a finite number > 0"):
        ns.analyze_weights(tiny_model, near_zero_threshold=bad)


@pytest.mark.parametrize("huge", [2**64, 1e300])
def test_huge_finite_near_zero_threshold_counts_everything(tiny_model, huge):
    wa = ns.analyze_weights(tiny_model, near_zero_threshold=huge)
    assert wa.near_zero_fraction == 1.0


@pytest.mark.parametrize("bad", [0, -1, 100.0001, float("nan"), float("inf")])
def test_bad_percentile(tiny_model, bad):
    with pytest.raises(ValueError, match=r"\(0, 100\]"):
        ns.pruning_candidates(tiny_model, bad)
