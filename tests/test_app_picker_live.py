"""Picking neurons (rules, rectangles, the basket), basket pruning and live pruning, on a tiny model with a
1024-token context; every number is compared with an independent computation."""

from __future__ import annotations

import zipfile

import numpy as np
import pytest
import torch
from conftest import load_hf, nll64, save_tiny, zero_output_weights

import neuronscope_tl as ns
from neuronscope_tl import selection
from neuronscope_tl.app import picker
from neuronscope_tl.app.live import LivePruning, greedy_continuation
from neuronscope_tl.app.state import AppSettings, AppState
from neuronscope_tl.hooks import mlp_post_name


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("picker-llama"), "llama", max_position_embeddings=1024)


@pytest.fixture(scope="module")
def state(model_dir):
    return AppState(ns.load_model(model_dir), AppSettings(max_calib_tokens=512, warm_start=False))


METHODS = ("magnitude", "activation", "wanda")


def test_rules_read_and_refuse():
    r = picker.parse_rule("lowest 5% of layer 2 by wanda", 3, 48, METHODS)
    assert (r.side, r.amount, r.percent, r.first, r.last, r.method) == ("lowest", 5.0, True, 2, 2, "wanda")
    assert r.per_layer(48) == 2  # 2.4 -> 2
    r = picker.parse_rule("Highest 3 neurons of layers 0-1 by activation", 3, 48, METHODS)
    assert (r.side, r.amount, r.percent, r.first, r.last) == ("highest", 3.0, False, 0, 1)
    assert picker.parse_rule("lowest 1% of all layers by magnitude", 3, 48, METHODS).last == 2
    for bad, message in [
        ("lowest 5% of layer 3 by wanda", "out of range"),
        ("lowest 5% of layer 1 by nope", "unknown score"),
        ("pick some", "cannot read"),
        ("lowest 0% of layer 1 by wanda", r"\(0, 100\]"),
        ("lowest 49 of layer 1 by wanda", "1..48"),
    ]:
        with pytest.raises(ValueError, match=message):
            picker.parse_rule(bad, 3, 48, METHODS)


def test_rule_selection_equals_the_scores_computed_here(state):
    """ "lowest 10% of layer 1 by wanda": the 5 neurons of layer 1 with the smallest ||W_out row|| x RMS activation,
    both computed here from the calibration's activation statistics and the model's weights."""
    chosen = state.select("lowest 10% of layer 1 by wanda")
    cal = state._calibrate(state.default_calib_tokens, ["wanda"])
    t = cal.scores[cal.scores.layer == 1]
    w_out = state.model.original_model.model.layers[1].mlp.down_proj.weight.detach().double()  # [d_model, d_mlp]
    wanda = w_out.norm(dim=0).numpy() * t["rms"].to_numpy()
    expected = sorted(np.argsort(wanda, kind="stable")[: round(0.1 * 48)].tolist())
    assert chosen == [(1, n) for n in expected]
    top = state.select("highest 2 of all layers by activation")
    for layer in range(3):
        mean_abs = cal.scores[cal.scores.layer == layer]["mean_abs"].to_numpy()
        assert sorted(n for l, n in top if l == layer) == sorted(np.argsort(-mean_abs, kind="stable")[:2].tolist())


def test_the_same_calibration_as_the_command_line(state):
    """The app calibrates on the CLI's default texts: its score table equals selection.calibrate's defaults."""
    mine = state._calibrate(256, ["wanda"])
    theirs = selection.calibrate(state.model, calib_tokens=256, with_grams=False, with_gradients=False)
    assert mine.record == theirs.record
    np.testing.assert_array_equal(mine.scores["wanda"].to_numpy(), theirs.scores["wanda"].to_numpy())


def test_rectangle_basket_and_table(state):
    rect = picker.rectangle((2, 5), (1, 3))
    assert rect == [(1, 3), (1, 4), (1, 5), (2, 3), (2, 4), (2, 5)]
    basket = picker.add([(0, 1)], rect + [(0, 1)], limit=10)
    assert basket == [(0, 1)] + rect
    with pytest.raises(ValueError, match="at most 3"):
        picker.add(basket, [], limit=3)
    table = state.basket_table(basket)
    cal = state._calibrate(state.default_calib_tokens, list(state.map_methods()))
    for row in table.itertuples():
        ref = cal.scores[(cal.scores.layer == row.layer) & (cal.scores.neuron == row.neuron)].iloc[0]
        assert row.wanda == ref["wanda"] and row.mean_abs == ref["mean_abs"]
        assert row.magnitude == pytest.approx(float(cal.magnitude[row.layer, row.neuron]))
    batch = ns.batch_analysis(state.model, basket[:3], ns.EXAMPLE_TEXTS[:1], progress=False)
    with_impact = state.basket_table(basket, batch.individual)
    assert with_impact["impact_score"].iloc[:3].tolist() == batch.individual["impact_score"].tolist()
    assert with_impact["impact_score"].iloc[3:].isna().all()
    assert picker.single_layer(basket) == (0, [1], 6)


def test_basket_prune_reloads_and_equals_zeroed_weights(state, tmp_path):
    basket = [(0, 1), (0, 2), (1, 3), (1, 4), (2, 5), (2, 6)]
    archive = state.prune_neurons(basket, "zero")
    with zipfile.ZipFile(archive) as z:
        z.extractall(tmp_path / "p")
    pruned = load_hf(tmp_path / "p")
    assert pruned.config.intermediate_size == 46
    ref = load_hf(state_dir(state))
    for layer, neuron in basket:
        zero_output_weights(ref, layer, [neuron])
    ids = state.model.to_tokens(ns.EXAMPLE_TEXTS[0])
    with torch.no_grad():
        torch.testing.assert_close(pruned(ids).logits, ref(ids).logits, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="empty"):
        state.prune_neurons([], "zero")


def state_dir(state) -> str:
    return state.model.original_model.config._name_or_path


def test_live_numbers_equal_zeroed_weights_by_hand(state):
    """Live pruning with wanda (zero ablation, per layer): each domain's pruned perplexity equals exp(mean NLL) of
    the plain HF model with those neurons' output weights zeroed, over the same windows, in float64; the dense
    numbers likewise; the pruned continuation equals the zeroed model's greedy tokens."""
    r = state.live("wanda", "per_layer", 0.25, "zero", "The council said")
    cal = state._calibrate(state.default_calib_tokens, ["wanda"])
    neurons = selection.select_neurons(state.model, cal, "wanda", 0.25, "per_layer", "zero")
    assert r.n_pruned == sum(len(v) for v in neurons.values()) == 3 * 12
    dense_hf, pruned_hf = load_hf(state_dir(state)), load_hf(state_dir(state))
    for layer, ns_ in neurons.items():
        zero_output_weights(pruned_hf, layer, ns_)
    for d, row in zip(state.live_engine.sets(), r.table.itertuples()):
        assert row.domain == d.name
        for hf, got in ((dense_hf, row.dense), (pruned_hf, row.pruned)):
            nll = torch.cat([nll64(hf(w[None]).logits[0].detach(), w) for w in d.wins.tokens])
            assert got == pytest.approx(float(torch.exp(nll.mean())), rel=1e-4)
        assert row.x_dense == pytest.approx(row.pruned / row.dense)
    assert r.geometric_mean == pytest.approx(float(np.exp(np.log(r.table["x_dense"]).mean())))
    ids = state.model.to_tokens("The council said")
    with torch.no_grad():
        for _ in range(state.live_engine.new_tokens):
            ids = torch.cat([ids, pruned_hf(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    start = state.model.to_tokens("The council said").shape[1]
    assert r.pruned_text == state.model.tokenizer.decode(ids[0, start:].tolist())


def test_continuation_with_hooks_equals_the_zeroed_model(state):
    """A continuation with a hook zeroing layer 1's MLP output neurons equals the plain HF model's greedy tokens
    with layer 1's down_proj zeroed."""
    model = state.model
    hook = (mlp_post_name(1), lambda a, hook: a * 0.0)
    ref = zero_output_weights(load_hf(state_dir(state)), 1, range(model.cfg.d_mlp))
    ids = model.to_tokens("Rain is expected")
    start = ids.shape[1]
    with torch.no_grad():
        for _ in range(8):
            ids = torch.cat([ids, ref(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert greedy_continuation(model, "Rain is expected", 8, [hook]) == model.tokenizer.decode(ids[0, start:].tolist())


def test_live_refuses_bad_input_and_keeps_its_caches(state):
    for kwargs, message in [
        (dict(prompt="   "), "prompt is empty"),
        (dict(sparsity=1.0), r"\[0, 1\)"),
        (dict(method="random"), "random baseline"),
        (dict(method="nope"), "unknown method"),
        (dict(scope="all"), "unknown scope"),
    ]:
        args = {"method": "wanda", "scope": "per_layer", "sparsity": 0.2, "ablation": "zero", "prompt": "Hi", **kwargs}
        with pytest.raises(ValueError, match=message):
            state.live(**args)
    engine = LivePruning(state.model, lambda methods: state._calibrate(state.default_calib_tokens, methods))
    engine.warm("wanda", "Hi")
    assert engine._dense is not None and "Hi" in engine._dense_text


@pytest.mark.parametrize("scope", ["per_layer", "global"])
def test_live_selection_after_the_deepest_one_equals_a_fresh_selection(state, scope):
    """The live tab first selects at the slider's end (obs keeps its whole greedy order), then reads a prefix; the
    result equals obs selected directly at that sparsity on a calibration of its own."""
    from neuronscope_tl.app.live import LIVE_MAX_SPARSITY

    kept = selection.calibrate_for(state.model, ["obs"], calib_tokens=512)  # kept, as the app keeps its calibration
    engine = LivePruning(state.model, lambda methods: kept)
    live = engine.spec("obs", scope, "mean", 0.25)
    assert ("obs", scope, "mean", LIVE_MAX_SPARSITY) in engine._specs
    assert len(kept.obs[("mean", 0)][0]) >= round(0.5 * ns.mlp_info(state.model).d_mlp)  # the order was kept deep
    fresh_cal = selection.calibrate_for(state.model, ["obs"], calib_tokens=512)
    fresh = selection.build_spec(state.model, fresh_cal, "obs", 0.25, scope, "mean")
    assert live.neurons == fresh.neurons
    for layer, delta in fresh.delta_out.items():
        torch.testing.assert_close(live.delta_out[layer], delta, rtol=0, atol=0)
