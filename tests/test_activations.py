"""Streaming activation statistics against a full cache computed with numpy; shard merging."""

import numpy as np
import pytest

import neuronscope_tl as ns
from neuronscope_tl.activations import NeuronAccumulator, stream_activations
from neuronscope_tl.hooks import hook_count, is_mlp_post
from neuronscope_tl.texts import tokenize

from conftest import FP32_EPS, logit_noise, single_and_padded_activations, stat_tolerances

pytestmark = pytest.mark.usefixtures("one_torch_thread")

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
    """Statistics against numpy over activations cached one text at a time. Right-padded batches may change fp32
    activations by rounding: that difference (eta) is measured on the same batching and bounds each statistic
    (conftest.stat_tolerances); at batch size 1 it is only the 4-ulp floor."""
    single, padded = single_and_padded_activations(tiny_model, tokenize(tiny_model, TEXTS), batch_size)
    acc = stream_activations(tiny_model, TEXTS, batch_size=batch_size, progress=False)
    table = acc.table()
    for layer, act in single.items():
        tol = stat_tolerances(act, logit_noise(act, padded[layer]), 0.01)
        a = act.numpy()
        rows = table[table.layer == layer].sort_values("neuron")
        for column, expected in [
            ("mean", a.mean(0)),
            ("mean_abs", np.abs(a).mean(0)),
            ("var", a.var(0)),
            ("rms", np.sqrt((a**2).mean(0))),
            ("max", a.max(0)),
            ("frac_active", (np.abs(a) > 0.01).mean(0)),
        ]:
            excess = np.abs(rows[column].to_numpy() - expected) - np.asarray(tol[column])
            assert excess.max() <= 0, (layer, column, excess.max())
    assert acc.n_tokens == len(single[0]) == sum(len(t) for t in tokenize(tiny_model, TEXTS))
    assert hook_count(tiny_model) == 0


def test_shards_merge_to_single_pass(tiny_model):
    whole = stream_activations(tiny_model, TEXTS, progress=False)
    a = stream_activations(tiny_model, TEXTS[:1], progress=False)
    b = stream_activations(tiny_model, TEXTS[1:], progress=False)
    merged = a.merge(b).table()
    single = whole.table()
    # the same fp32 activations (one text per forward in both), accumulated in float64 in another order:
    # rounding ~1e-16 relative per operation; 1e-9 leaves room for the variance's cancellation (mean^2 / var)
    for col in ["mean", "mean_abs", "var", "rms", "frac_active", "max"]:
        np.testing.assert_allclose(merged[col], single[col], rtol=1e-9, atol=1e-12)


def test_merge_rejects_mismatched_accumulators():
    with pytest.raises(ValueError):
        NeuronAccumulator([0, 1], 8).merge(NeuronAccumulator([0], 8))


def test_all_layers_come_from_the_same_forward_passes(tiny_model):
    """One forward per batch of texts (counted at the embedding hook), however many layers are analysed."""
    stream_activations(tiny_model, TEXTS[:1], progress=False)  # a model's hook points are checked once, on first use
    calls = []
    tiny_model.add_hook("hook_embed", lambda act, hook: calls.append(1))
    try:
        stream_activations(tiny_model, TEXTS, batch_size=2, progress=False)
    finally:
        tiny_model.reset_hooks()
    assert len(calls) == 2


def test_importance_and_critical(tiny_model):
    imp = ns.neuron_importance(tiny_model, TEXTS, top_k=3, progress=False)
    w_out = tiny_model.W_out.detach().double().norm(dim=2).numpy()
    t = imp.table
    # an fp32 norm of d_model numbers: within (d_model + 2) eps of the float64 norm
    np.testing.assert_allclose(t["w_out_norm"], w_out.reshape(-1), rtol=(ns.mlp_info(tiny_model).d_model + 2) * FP32_EPS, atol=0)
    assert (t["importance"] == t["rms"] * t["w_out_norm"]).all()  # the same float64 product
    for layer, group in t.groupby("layer"):
        top = group.sort_values("importance", ascending=False).neuron.head(3).tolist()
        assert imp.critical[imp.critical.layer == layer].neuron.tolist() == top
    one = ns.neuron_importance(tiny_model, TEXTS, layer_index=1, progress=False)
    assert one.layers == [1] and set(one.table.layer) == {1}
    # the forward stops after block 1 instead of running to the end: the same activations, the same sums
    assert (one.table["rms"].to_numpy() == t[t.layer == 1]["rms"].to_numpy()).all()
