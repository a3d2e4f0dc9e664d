"""Property tests of the Python API (hypothesis): for ANY input, each public analysis either returns a well-formed
result or raises ``ValueError`` with a message, and afterwards the model's logits on a fixed probe text are
bit-identical and its hook count is unchanged.

Input classes drawn: layer and neuron indices in range, out of range, negative, duplicated, of the wrong type
(float, str, bool, None); empty lists; random unicode, whitespace-only and control-character texts; texts longer
than the context; huge, negative, zero, infinite and NaN thresholds; bad batch sizes, top_k and ablation modes.

The tiny model is built once per module (hypothesis runs many examples per test and does not re-run fixtures).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import neuronscope_tl as ns
from neuronscope_tl.hooks import hook_count
from neuronscope_tl.metrics import HIGH, MODERATE, SAFE

from conftest import PROBE_TEXT, probe_logits, save_tiny

N_LAYERS, D_MLP = 3, 48  # the tiny Llama of conftest
SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)
VERDICTS = {SAFE, MODERATE, HIGH}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return ns.load_model(save_tiny(tmp_path_factory.mktemp("prop-llama"), "llama"))


@pytest.fixture(scope="module")
def baseline(model):
    return probe_logits(model), hook_count(model)


# ---------------------------------------------------------------------------------------------- strategies

weird = st.sampled_from([None, 1.5, float("nan"), "0", "", True, False, b"0", object()])
layer_st = st.one_of(st.integers(-3, N_LAYERS + 2), st.integers(-(2**63), 2**63), weird)
neuron_int = st.integers(-3, D_MLP + 3)
neurons_st = st.one_of(
    st.lists(neuron_int, min_size=0, max_size=6),  # empty, in range, out of range, negative, duplicates
    st.lists(st.integers(0, D_MLP - 1), min_size=1, max_size=6, unique=True),  # always valid
    neuron_int,  # a bare int
    weird,
    st.lists(weird, min_size=1, max_size=2),
)
whitespace = st.text(alphabet=" \t\n\r\x0b\x0c\u00a0\u2003\u3000", max_size=8)
unicode_text = st.text(max_size=40)  # any code point but surrogates: controls, emoji, RTL, combining marks
text_st = st.one_of(unicode_text, whitespace, st.just(PROBE_TEXT), st.just("word " * 200))  # the last is > n_ctx
texts_st = st.one_of(text_st, st.lists(text_st, min_size=0, max_size=3), st.lists(st.one_of(text_st, weird), max_size=2), weird)
number_st = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -0.0, 1e-300, 100.0, 100.0000001, 1e308, -1e308]),
    st.integers(-(10**30), 10**30),
    weird,
)
batch_size_st = st.one_of(st.integers(-2, 5), weird)
ablation_st = st.sampled_from(["zero", "mean", "noise", "", "ZERO", None])
candidate_st = st.one_of(
    st.tuples(st.integers(-1, N_LAYERS), st.integers(-1, D_MLP)),
    st.fixed_dictionaries({"layer_index": st.integers(-1, N_LAYERS), "neuron_index": st.integers(-1, D_MLP)}),
    st.fixed_dictionaries({"layer": st.integers(0, 2)}),
    weird,
)
candidates_st = st.one_of(st.lists(candidate_st, min_size=0, max_size=4), st.lists(st.tuples(st.integers(0, 2), st.integers(0, D_MLP - 1)), min_size=1, max_size=4, unique=True), weird)


# ---------------------------------------------------------------------------------------------- the property


def check_call(model, baseline, fn, well_formed):
    """Run ``fn``; it must return a well-formed result or raise ValueError with a message; nothing may change."""
    try:
        result = fn()
    except ValueError as exc:
        assert str(exc).strip(), "ValueError without a message"
    else:
        well_formed(result)
    before, hooks_before = baseline
    assert hook_count(model) == hooks_before
    assert torch.equal(probe_logits(model), before)


def finite(x) -> bool:
    return isinstance(x, float) and math.isfinite(x)


def impact_ok(r: ns.ImpactResult, layer: int):
    assert finite(r.impact_score) and r.impact_score >= -1e-6
    assert r.verdict in VERDICTS and r.safe_to_prune == (r.verdict == SAFE)
    assert finite(r.loss_original) and finite(r.loss_pruned)
    assert 0.0 <= r.top1_agreement <= 1.0
    assert r.n_tokens >= r.n_texts >= 1
    assert [c["layer"] for c in r.activation_changes] == list(range(layer, N_LAYERS))
    assert len(set(r.neuron_indices)) == len(r.neuron_indices) and all(0 <= n < D_MLP for n in r.neuron_indices)


# ---------------------------------------------------------------------------------------------- tests


@SETTINGS
@given(layer=layer_st, neurons=neurons_st, texts=texts_st, ablation=ablation_st, batch_size=batch_size_st)
def test_simulate_pruning(model, baseline, layer, neurons, texts, ablation, batch_size):
    check_call(
        model, baseline,
        lambda: ns.simulate_pruning(model, layer, neurons, texts, ablation=ablation, batch_size=batch_size, calib_texts=[PROBE_TEXT]),
        lambda r: impact_ok(r, r.layer_index),
    )


@SETTINGS
@given(threshold=number_st)
def test_pruning_candidates(model, baseline, threshold):
    def ok(table):
        assert len(table) >= N_LAYERS  # at least the lowest neuron of each layer
        assert table["layer"].between(0, N_LAYERS - 1).all() and table["neuron"].between(0, D_MLP - 1).all()
        assert not table.duplicated(["layer", "neuron"]).any()

    check_call(model, baseline, lambda: ns.pruning_candidates(model, threshold), ok)


@SETTINGS
@given(texts=texts_st, layer=st.one_of(st.none(), layer_st), top_k=st.one_of(st.integers(-1, 200), weird), batch_size=batch_size_st)
def test_neuron_importance(model, baseline, texts, layer, top_k, batch_size):
    def ok(r):
        assert r.layers == ([layer] if layer is not None else list(range(N_LAYERS)))
        assert len(r.table) == len(r.layers) * D_MLP
        assert r.table["importance"].map(math.isfinite).all() and (r.table["importance"] >= 0).all()
        assert len(r.critical) == len(r.layers) * min(top_k, D_MLP)
        assert r.n_tokens >= 1

    check_call(model, baseline, lambda: ns.neuron_importance(model, texts, layer_index=layer, top_k=top_k, batch_size=batch_size, progress=False), ok)


@SETTINGS
@given(layers=st.one_of(st.lists(layer_st, max_size=4), layer_st), texts=texts_st)
def test_stream_activations_layers(model, baseline, layers, texts):
    def ok(acc):
        assert acc.layers == sorted(acc.layers) and acc.n_tokens >= 1
        assert torch.isfinite(acc.mean).all()

    check_call(model, baseline, lambda: ns.stream_activations(model, texts, layers, progress=False), ok)


@settings(SETTINGS, max_examples=60)
@given(candidates=candidates_st, texts=texts_st, ablation=ablation_st, batch_size=batch_size_st)
def test_batch_analysis(model, baseline, candidates, texts, ablation, batch_size):
    def ok(r):
        n = len(candidates)
        assert len(r.individual) == len(r.cumulative) == n
        assert r.cumulative["n_pruned"].tolist() == list(range(1, n + 1))
        assert r.individual["impact_score"].map(math.isfinite).all()
        rec = r.recommendations
        assert len(rec["safe_to_prune"]) + len(rec["moderate"]) + len(rec["risky_to_prune"]) == n
        assert 0 <= rec["max_safe_prefix"] <= n

    check_call(
        model, baseline,
        lambda: ns.batch_analysis(model, candidates, texts, batch_size, ablation, calib_texts=[PROBE_TEXT], progress=False),
        ok,
    )


@settings(SETTINGS, max_examples=40)
@given(near_zero=number_st, bins=st.one_of(st.integers(-2, 20_000), weird))
def test_analyze_weights_thresholds(model, baseline, near_zero, bins):
    def ok(wa):
        assert 0.0 <= wa.overall_sparsity <= 1.0 and 0.0 <= wa.near_zero_fraction <= 1.0
        assert wa.total_parameters > 0 and len(wa.layers) == N_LAYERS

    check_call(model, baseline, lambda: ns.analyze_weights(model, near_zero, bins), ok)


@settings(SETTINGS, max_examples=60)
@given(safe=number_st, risky=number_st)
def test_impact_thresholds(model, baseline, safe, risky):
    def make():
        th = ns.ImpactThresholds(safe, risky)
        return ns.simulate_pruning(model, 0, [1], PROBE_TEXT, thresholds=th)

    check_call(model, baseline, make, lambda r: impact_ok(r, 0))
