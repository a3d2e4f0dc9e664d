"""Streaming activation statistics against a full cache computed with numpy; shard merging."""

import numpy as np
import pytest
import torch

import neuronscope_tl as ns
from neuronscope_tl.activations import NeuronAccumulator, stream_activations
from neuronscope_tl.hooks import hook_count, is_mlp_post

TEXTS = [
    "The government announced new measures on Monday.",
    "Fires burned across the state as crews worked through the night to contain them.",
    "Shares rose sharply.",
    "The minister said talks would continue next week in Sydney.",
]


def cached_acts(model, texts):
    """{layer: [n_tokens, d_mlp]} from run_with_cache, one text at a time (no padding)."""
    out = {}
    for t in texts:
        _, cache = model.run_with_cache(model.to_tokens(t), names_filter=is_mlp_post)
        for name, act in cache.items():
            out.setdefault(int(name.split(".")[1]), []).append(act[0].double().numpy())
    return {l: np.concatenate(v) for l, v in out.items()}


@pytest.mark.parametrize("batch_size", [1, 3])
def test_stats_match_numpy_on_full_cache(tiny_model, batch_size):
    acts = cached_acts(tiny_model, TEXTS)
    acc = stream_activations(tiny_model, TEXTS, batch_size=batch_size, progress=False)
    table = acc.table()
    for layer, a in acts.items():
        rows = table[table.layer == layer].sort_values("neuron")
        np.testing.assert_allclose(rows["mean"], a.mean(0), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(rows["mean_abs"], np.abs(a).mean(0), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(rows["var"], a.var(0), rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(rows["rms"], np.sqrt((a**2).mean(0)), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(rows["frac_active"], (np.abs(a) > 0.01).mean(0), atol=1e-12)
        np.testing.assert_allclose(rows["max"], a.max(0), rtol=1e-5, atol=1e-7)
    assert acc.n_tokens == sum(a.shape[0] for a in [acts[0]])
    assert hook_count(tiny_model) == 0


def test_shards_merge_to_single_pass(tiny_model):
    whole = stream_activations(tiny_model, TEXTS, progress=False)
    a = stream_activations(tiny_model, TEXTS[:1], progress=False)
    b = stream_activations(tiny_model, TEXTS[1:], progress=False)
    merged = a.merge(b).table()
    single = whole.table()
    for col in ["mean", "mean_abs", "var", "rms", "frac_active", "max"]:
        np.testing.assert_allclose(merged[col], single[col], rtol=1e-9, atol=1e-12)


def test_merge_rejects_mismatched_accumulators():
    with pytest.raises(ValueError):
        NeuronAccumulator([0, 1], 8).merge(NeuronAccumulator([0], 8))


def test_all_layers_come_from_the_same_forward_passes(tiny_model):
    """One forward per text (counted at the embedding hook), however many layers are analysed."""
    calls = []
    tiny_model.add_hook("hook_embed", lambda act, hook: calls.append(1))
    try:
        stream_activations(tiny_model, TEXTS, batch_size=2, progress=False)
    finally:
        tiny_model.reset_hooks()
    assert len(calls) == 2


def test_importance_and_critical(tiny_model):
    imp = ns.neuron_importance(tiny_model, TEXTS, top_k=3, progress=False)
    w_out = tiny_model.W_out.detach().norm(dim=2).numpy()
    t = imp.table
    np.testing.assert_allclose(t["w_out_norm"], w_out.reshape(-1), rtol=1e-6)
    np.testing.assert_allclose(t["importance"], t["rms"] * t["w_out_norm"])
    for layer, group in t.groupby("layer"):
        top = group.sort_values("importance", ascending=False).neuron.head(3).tolist()
        assert imp.critical[imp.critical.layer == layer].neuron.tolist() == top
    one = ns.neuron_importance(tiny_model, TEXTS, layer_index=1, progress=False)
    assert one.layers == [1] and set(one.table.layer) == {1}
    np.testing.assert_allclose(one.table["rms"], t[t.layer == 1]["rms"], rtol=1e-9)
