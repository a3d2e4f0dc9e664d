"""Property tests of the Python API (hypothesis), with valid and invalid input drawn apart:

* a call whose every argument is valid must return a well-formed result (any exception fails the test);
* a call with at least one invalid argument must raise ``ValueError`` with a message (anything else fails);
* either way, afterwards the model's logits on a fixed probe text are bit-identical and its hook count is unchanged.

Input classes: layer and neuron indices in range and out of range, negative, 64-bit and beyond, duplicated, of
the wrong type (float, str, bytes, bool, None, an arbitrary object); empty lists; random unicode texts (controls,
emoji, combining marks), whitespace-only texts, texts longer than the context; numbers that are zero, -0, tiny,
at and past each bound, +-1e308, +-inf, NaN, integers too large for a float (10**400, 2**1024), numpy scalars and
fractions; strings, None and bools. Every numeric parameter of the public functions is covered, each against an
oracle written here (not the library's own check).

The tiny model is built once per module (hypothesis runs many examples per test and does not re-run fixtures).
Examples are derandomized in CI (the ``ci`` profile of conftest.py); ``HYPOTHESIS_PROFILE=explore`` draws fresh
random examples, 500 per test.
"""

from __future__ import annotations

import math
import numbers
from decimal import Decimal
from fractions import Fraction

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import neuronscope_tl as ns
from neuronscope_tl import ablation, curves, evaluation, scoring, search, selection, surgery
from neuronscope_tl.hooks import hook_count
from neuronscope_tl.metrics import HIGH, MODERATE, SAFE

from conftest import PROBE_TEXT, max_examples, probe_logits, save_tiny

N_LAYERS, D_MLP, N_CTX = 3, 48, 128  # the tiny Llama of conftest
VERDICTS = {SAFE, MODERATE, HIGH}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def examples(n: int):
    return settings(max_examples=max_examples(n))


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return ns.load_model(save_tiny(tmp_path_factory.mktemp("prop-llama"), "llama"))


@pytest.fixture(scope="module")
def baseline(model):
    return probe_logits(model), hook_count(model)


# ---------------------------------------------------------------------------------------------- oracles


def exact_real(v):
    """The value of a real-number argument as the library sees it (its float, held exactly as a Fraction), or None
    when ``v`` is not one: bool, str, None, Decimal, NaN, infinities, or an integer too large for a float."""
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Real):
        return None
    try:
        x = float(v)
    except OverflowError:
        return None
    return Fraction(x) if math.isfinite(x) else None


def exact_int(v):
    """``v`` as a Python int when it is an integer argument (Python or numpy int, not a bool), else None."""
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
        return None
    return int(v)


def real_in(low, high, low_open=False, high_open=False):
    def ok(v):
        x = exact_real(v)
        if x is None:
            return False
        above = x > low if low_open else x >= low
        below = high is None or (x < high if high_open else x <= high)
        return above and below

    return ok


def int_in(low, high=None):
    def ok(v):
        x = exact_int(v)
        return x is not None and x >= low and (high is None or x <= high)

    return ok


def tokens_ok(v) -> bool:
    """A token budget: None (no limit) or an integer >= 1."""
    return v is None or int_in(1)(v)


# ---------------------------------------------------------------------------------------------- strategies

WEIRD = [None, "0", "", "0.5", b"1", True, False, object(), Decimal("0.5"), [1], {"a": 1}]
weird = st.sampled_from(WEIRD)
HUGE = [2**63, -(2**63) - 1, 2**64, 10**30, -(10**30), 10**400, -(10**400), 2**1024]
numbers_st = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(-2.0, 2.0),
    st.sampled_from(
        [0.0, -0.0, 1e-300, 0.5, 1.0, 0.9999999999, 100.0, 100.0000001, 1e308, -1e308, math.inf, -math.inf, math.nan]
    ),
    st.integers(-5, 300),
    st.integers(-(10**400), 10**400),
    st.sampled_from(HUGE),
    st.builds(np.float32, st.floats(-2.0, 2.0, width=32)),
    st.builds(np.int64, st.integers(-5, 300)),
    st.fractions(-2, 2),
    weird,
)


def valid(values, oracle):
    return values.filter(oracle)


def invalid(values, oracle):
    return values.filter(lambda v: not oracle(v))


layer_ok = int_in(0, N_LAYERS - 1)
layer_any = st.one_of(
    st.integers(-3, N_LAYERS + 2), st.sampled_from(HUGE), st.builds(np.int64, st.integers(-1, N_LAYERS)), weird, st.floats(0, 3)
)
valid_layer = st.one_of(st.integers(0, N_LAYERS - 1), st.builds(np.int64, st.integers(0, N_LAYERS - 1)))
invalid_layer = invalid(layer_any, layer_ok)

neuron_list = st.lists(st.integers(0, D_MLP - 1), min_size=1, max_size=6, unique=True)
valid_neurons = st.one_of(neuron_list, neuron_list.map(tuple), neuron_list.map(np.array), st.integers(0, D_MLP - 1))
invalid_neurons = st.one_of(
    st.just([]),
    st.lists(st.integers(-3, D_MLP + 3), min_size=1, max_size=6).filter(
        lambda ns_: len(set(ns_)) < len(ns_) or any(not 0 <= n < D_MLP for n in ns_)
    ),  # out of range, negative or duplicated
    st.sampled_from([D_MLP, -1, 2**63, 10**400]),  # a bare int out of range
    st.lists(st.one_of(weird, st.floats(0, 5)), min_size=1, max_size=2),
    weird.filter(lambda w: not isinstance(w, list)),  # [1] would be a valid neuron list
)

# Valid texts fit the 128-token context: byte-level BPE makes at most one token per byte, <= 4 bytes per char.
short_text = st.text(max_size=30).filter(lambda t: t.strip())
valid_text = st.one_of(short_text, st.just(PROBE_TEXT), st.just("word " * 20))
valid_texts = st.one_of(
    valid_text, st.lists(valid_text, min_size=1, max_size=3), st.lists(valid_text, min_size=1, max_size=2).map(tuple)
)
whitespace = st.text(alphabet=" \t\n\r\x0b\x0c\u00a0\u2003\u3000", max_size=8)
too_long = st.just("word " * 200)  # > n_ctx tokens
invalid_text = st.one_of(whitespace, too_long)
invalid_texts = st.one_of(
    invalid_text,
    st.just([]),
    st.lists(st.one_of(valid_text, invalid_text), min_size=1, max_size=3).filter(
        lambda ts: any(not t.strip() or len(t) > 100 for t in ts)
    ),
    st.lists(st.one_of(valid_text, st.sampled_from([None, 1.5, b"x", True, object()])), min_size=1, max_size=3).filter(
        lambda ts: any(not isinstance(t, str) for t in ts)
    ),
    st.sampled_from([None, 1.5, 7, True, object()]),
)

valid_ablation = st.sampled_from(["zero", "mean"])
invalid_ablation = st.sampled_from(["noise", "", "ZERO", " zero", None, 0, ["zero"]])
valid_batch = st.one_of(st.integers(1, 5), st.builds(np.int64, st.integers(1, 4)), st.sampled_from([10**30]))
invalid_batch = invalid(numbers_st, int_in(1))


# ---------------------------------------------------------------------------------------------- the property


def unchanged(model, baseline):
    before, hooks_before = baseline
    assert hook_count(model) == hooks_before
    assert torch.equal(probe_logits(model), before)


def expect_ok(model, baseline, fn, well_formed):
    """A call with valid arguments: it must return (no exception of any kind) a well-formed result."""
    well_formed(fn())
    unchanged(model, baseline)


def expect_refused(model, baseline, fn, match=None):
    """A call with an invalid argument: it must raise ValueError with a message (matching ``match``)."""
    with pytest.raises(ValueError, match=match) as info:
        fn()
    assert str(info.value).strip(), "ValueError without a message"
    unchanged(model, baseline)


@st.composite
def corrupted(draw, good: dict, bad: dict):
    """Valid arguments with one or more of them replaced by an invalid value."""
    args = {name: draw(strategy) for name, strategy in good.items()}
    for name in draw(st.lists(st.sampled_from(sorted(bad)), min_size=1, max_size=2, unique=True)):
        args[name] = draw(bad[name])
    return args


def finite(x) -> bool:
    return isinstance(x, float) and math.isfinite(x)


def neuron_list_of(neurons):
    return [int(neurons)] if isinstance(neurons, int) else [int(n) for n in neurons]


def impact_ok(r: ns.ImpactResult, layer: int, neurons=None, n_texts=None):
    assert finite(r.impact_score) and r.impact_score >= 0.0
    assert r.verdict in VERDICTS and r.safe_to_prune == (r.verdict == SAFE)
    assert r.verdict == r.thresholds.verdict(r.impact_score)
    assert finite(r.loss_original) and finite(r.loss_pruned)
    assert r.loss_change == r.loss_pruned - r.loss_original  # defined as that difference of the two means
    assert 0.0 <= r.top1_agreement <= 1.0
    assert r.n_tokens >= r.n_texts >= 1
    assert r.layer_index == int(layer)
    assert [c["layer"] for c in r.activation_changes] == list(range(int(layer), N_LAYERS))
    if neurons is not None:
        assert r.neuron_indices == neuron_list_of(neurons)
    if n_texts is not None:
        assert r.n_texts == n_texts


def n_texts_of(texts) -> int:
    return 1 if isinstance(texts, str) else len(texts)


# ---------------------------------------------------------------------------------------------- simulate_pruning

SIM_GOOD = {
    "layer": valid_layer,
    "neurons": valid_neurons,
    "texts": valid_texts,
    "ablation": valid_ablation,
    "batch_size": valid_batch,
}
SIM_BAD = {
    "layer": invalid_layer,
    "neurons": invalid_neurons,
    "texts": invalid_texts,
    "ablation": invalid_ablation,
    "batch_size": invalid_batch,
}


def simulate(model, a):
    return ns.simulate_pruning(
        model, a["layer"], a["neurons"], a["texts"], ablation=a["ablation"], batch_size=a["batch_size"], calib_texts=[PROBE_TEXT]
    )


@examples(60)
@given(a=st.fixed_dictionaries(SIM_GOOD))
def test_simulate_pruning_valid(model, baseline, a):
    expect_ok(
        model, baseline, lambda: simulate(model, a), lambda r: impact_ok(r, a["layer"], a["neurons"], n_texts_of(a["texts"]))
    )


@examples(80)
@given(a=corrupted(SIM_GOOD, SIM_BAD))
def test_simulate_pruning_invalid(model, baseline, a):
    expect_refused(model, baseline, lambda: simulate(model, a))


# ---------------------------------------------------------------------------------------------- pruning_candidates

percentile_ok = real_in(0, 100, low_open=True)


def candidates_ok(table):
    assert len(table) >= N_LAYERS  # at least the lowest neuron of each layer
    assert table["layer"].between(0, N_LAYERS - 1).all() and table["neuron"].between(0, D_MLP - 1).all()
    assert not table.duplicated(["layer", "neuron"]).any()


@examples(40)
@given(threshold=valid(numbers_st, percentile_ok))
def test_pruning_candidates_valid(model, baseline, threshold):
    expect_ok(model, baseline, lambda: ns.pruning_candidates(model, threshold), candidates_ok)


@examples(80)
@given(threshold=invalid(numbers_st, percentile_ok))
def test_pruning_candidates_invalid(model, baseline, threshold):
    expect_refused(model, baseline, lambda: ns.pruning_candidates(model, threshold), match=r"\(0, 100\]")


# ---------------------------------------------------------------------------------------------- neuron_importance

IMP_GOOD = {
    "texts": valid_texts,
    "layer": st.one_of(st.none(), valid_layer),
    "top_k": st.one_of(st.integers(1, 200), st.just(10**30)),
    "batch_size": valid_batch,
    "active_threshold": st.one_of(st.floats(0, 10), st.just(0)),
    "max_tokens": st.one_of(st.none(), st.integers(1, 300)),
}
IMP_BAD = {
    "texts": invalid_texts,
    "layer": invalid_layer.filter(lambda l: l is not None),  # None: every layer
    "top_k": invalid(numbers_st, int_in(1)),
    "batch_size": invalid_batch,
    "active_threshold": invalid(numbers_st, real_in(0, None)),
    "max_tokens": invalid(numbers_st, tokens_ok),
}


def importance(model, a):
    return ns.neuron_importance(
        model,
        a["texts"],
        layer_index=a["layer"],
        top_k=a["top_k"],
        batch_size=a["batch_size"],
        active_threshold=a["active_threshold"],
        max_tokens=a["max_tokens"],
        progress=False,
    )


@examples(40)
@given(a=st.fixed_dictionaries(IMP_GOOD))
def test_neuron_importance_valid(model, baseline, a):
    def ok(r):
        assert r.layers == ([int(a["layer"])] if a["layer"] is not None else list(range(N_LAYERS)))
        assert len(r.table) == len(r.layers) * D_MLP
        assert r.table["importance"].map(math.isfinite).all() and (r.table["importance"] >= 0).all()
        assert len(r.critical) == len(r.layers) * min(a["top_k"], D_MLP)
        assert 1 <= r.n_tokens <= (a["max_tokens"] or 10**9)
        assert r.table["frac_active"].between(0, 1).all()

    expect_ok(model, baseline, lambda: importance(model, a), ok)


@examples(80)
@given(a=corrupted(IMP_GOOD, IMP_BAD))
def test_neuron_importance_invalid(model, baseline, a):
    expect_refused(model, baseline, lambda: importance(model, a))


# ---------------------------------------------------------------------------------------------- stream_activations

valid_layers = st.one_of(
    st.none(),
    st.lists(st.integers(0, N_LAYERS - 1), min_size=1, max_size=3, unique=True),
    st.lists(st.integers(0, N_LAYERS - 1), min_size=1, max_size=3, unique=True).map(tuple),
    st.just(range(N_LAYERS)),
)
invalid_layers = st.one_of(
    st.just([]),
    st.lists(layer_any, min_size=1, max_size=4).filter(
        lambda ls: len(set(map(repr, ls))) < len(ls) or not all(layer_ok(l) for l in ls)
    ),
    # a bare value, not a list (None means every layer; a list such as [1] is a valid list of layers)
    invalid_layer.filter(lambda l: l is not None and not isinstance(l, list)),
)


@examples(40)
@given(layers=valid_layers, texts=valid_texts)
def test_stream_activations_valid(model, baseline, layers, texts):
    def ok(acc):
        assert acc.layers == (sorted(int(l) for l in layers) if layers is not None else list(range(N_LAYERS)))
        assert acc.n_tokens >= 1 and torch.isfinite(acc.mean).all()

    expect_ok(model, baseline, lambda: ns.stream_activations(model, texts, layers, progress=False), ok)


@examples(60)
@given(a=corrupted({"layers": valid_layers, "texts": valid_texts}, {"layers": invalid_layers, "texts": invalid_texts}))
def test_stream_activations_invalid(model, baseline, a):
    expect_refused(model, baseline, lambda: ns.stream_activations(model, a["texts"], a["layers"], progress=False))


# ---------------------------------------------------------------------------------------------- batch_analysis

pair = st.tuples(st.integers(0, N_LAYERS - 1), st.integers(0, D_MLP - 1))
valid_candidates = st.one_of(
    st.lists(pair, min_size=1, max_size=4, unique=True),
    st.lists(pair, min_size=1, max_size=4, unique=True).map(lambda ps: [{"layer_index": l, "neuron_index": n} for l, n in ps]),
    st.lists(pair, min_size=1, max_size=4, unique=True).map(lambda ps: pd.DataFrame(ps, columns=["layer", "neuron"])),
)
invalid_candidates = st.one_of(
    st.just([]),
    st.lists(st.tuples(st.integers(-1, N_LAYERS), st.integers(-1, D_MLP)), min_size=1, max_size=4).filter(
        lambda ps: len(set(ps)) < len(ps) or any(not (0 <= l < N_LAYERS and 0 <= n < D_MLP) for l, n in ps)
    ),
    st.lists(st.fixed_dictionaries({"layer": st.integers(0, 2)}), min_size=1, max_size=2),  # missing keys
    st.lists(st.sampled_from([None, 1.5, "0,1", (0,), (0, 1, 2)]), min_size=1, max_size=2),
    st.sampled_from([None, 1.5, 7, "L0N1", object()]),
)


def batch(model, a):
    return ns.batch_analysis(
        model, a["candidates"], a["texts"], a["batch_size"], a["ablation"], calib_texts=[PROBE_TEXT], progress=False
    )


@examples(30)
@given(
    a=st.fixed_dictionaries(
        {"candidates": valid_candidates, "texts": valid_texts, "ablation": valid_ablation, "batch_size": valid_batch}
    )
)
def test_batch_analysis_valid(model, baseline, a):
    def ok(r):
        n = len(a["candidates"])
        assert len(r.individual) == len(r.cumulative) == n
        assert r.cumulative["n_pruned"].tolist() == list(range(1, n + 1))
        assert r.individual["impact_score"].map(math.isfinite).all() and (r.individual["impact_score"] >= 0).all()
        rec = r.recommendations
        assert len(rec["safe_to_prune"]) + len(rec["moderate"]) + len(rec["risky_to_prune"]) == n
        assert 0 <= rec["max_safe_prefix"] <= n

    expect_ok(model, baseline, lambda: batch(model, a), ok)


@examples(60)
@given(
    a=corrupted(
        {"candidates": valid_candidates, "texts": valid_texts, "ablation": valid_ablation, "batch_size": valid_batch},
        {"candidates": invalid_candidates, "texts": invalid_texts, "ablation": invalid_ablation, "batch_size": invalid_batch},
    )
)
def test_batch_analysis_invalid(model, baseline, a):
    expect_refused(model, baseline, lambda: batch(model, a))


# ---------------------------------------------------------------------------------------------- analyze_weights

near_zero_ok = real_in(0, None, low_open=True)
bins_ok = int_in(1, 10_000)


@examples(20)
@given(near_zero=valid(numbers_st, near_zero_ok), bins=st.integers(1, 10_000))
def test_analyze_weights_valid(model, baseline, near_zero, bins):
    def ok(wa):
        assert 0.0 <= wa.overall_sparsity <= 1.0 and 0.0 <= wa.near_zero_fraction <= 1.0
        assert wa.total_parameters > 0 and len(wa.layers) == N_LAYERS

    expect_ok(model, baseline, lambda: ns.analyze_weights(model, near_zero, bins), ok)


@examples(60)
@given(
    a=corrupted(
        {"near_zero": valid(numbers_st, near_zero_ok), "bins": st.integers(1, 100)},
        {"near_zero": invalid(numbers_st, near_zero_ok), "bins": invalid(numbers_st, bins_ok)},
    )
)
def test_analyze_weights_invalid(model, baseline, a):
    expect_refused(model, baseline, lambda: ns.analyze_weights(model, a["near_zero"], a["bins"]))


# ---------------------------------------------------------------------------------------------- ImpactThresholds


def thresholds_ok(safe, risky) -> bool:
    s, r = exact_real(safe), exact_real(risky)
    return s is not None and r is not None and 0 < s <= r


@examples(30)
@given(safe=st.one_of(st.floats(1e-9, 5), st.fractions(Fraction(1, 100), 5), st.integers(1, 3)), extra=st.floats(0, 5))
def test_impact_thresholds_valid(model, baseline, safe, extra):
    risky = float(safe) + extra

    def make():
        th = ns.ImpactThresholds(safe, risky)
        assert (th.safe_below, th.risky_from) == (float(safe), risky)
        return ns.simulate_pruning(model, 0, [1], PROBE_TEXT, thresholds=th)

    expect_ok(model, baseline, make, lambda r: impact_ok(r, 0, [1], 1))


@examples(150)
@given(safe=numbers_st, risky=numbers_st)
def test_impact_thresholds_invalid(model, baseline, safe, risky):
    if thresholds_ok(safe, risky):  # the pair happened to be valid: covered above
        return
    expect_refused(model, baseline, lambda: ns.ImpactThresholds(safe, risky), match="safe_below")


# ---------------------------------------------------------------------------------------------- numeric parameters
# Each numeric parameter of the public functions, against its oracle: valid values are accepted (the validator
# returns them as float/int), invalid ones raise ValueError naming the valid range, through the public function,
# before any model work.

REAL_PARAMS = [
    # (validator, oracle, the range as the message names it)
    (selection.check_sparsity, real_in(0, 1, high_open=True), r"\[0, 1\)"),
    (search.check_budget, real_in(0, None, low_open=True), "> 0"),
    (lambda v: search.check_step(v, "step"), real_in(0, 1, low_open=True, high_open=True), r"\(0, 1\)"),
    (ns.activations.check_active_threshold, real_in(0, None), ">= 0"),
]
INT_PARAMS = [
    (ns.texts.check_batch_size, int_in(1), ">= 1"),
    (ns.texts.check_max_tokens, tokens_ok, ">= 1"),
    (evaluation.check_every, int_in(1), ">= 1"),
    (evaluation.check_seed, int_in(0, 2**63 - 1), r"\[0, 9223372036854775807\]"),
    (scoring.check_top_k_contexts, int_in(1, scoring.MAX_TOP_K), rf"\[1, {scoring.MAX_TOP_K}\]"),
    (lambda v: ns.texts.check_int(v, "top_k", 1), int_in(1), ">= 1"),
]


@examples(300)
@given(value=numbers_st, which=st.integers(0, len(REAL_PARAMS) - 1))
def test_real_validators_follow_their_oracle(value, which):
    check, ok, message = REAL_PARAMS[which]
    if ok(value):
        out = check(value)
        assert isinstance(out, float) and out == float(value)
    else:
        with pytest.raises(ValueError, match=message):
            check(value)


@examples(300)
@given(value=st.one_of(numbers_st, st.none()), which=st.integers(0, len(INT_PARAMS) - 1))
def test_int_validators_follow_their_oracle(value, which):
    check, ok, message = INT_PARAMS[which]
    if ok(value):
        out = check(value)
        assert out == value and (out is None or type(out) is int)
    else:
        with pytest.raises(ValueError, match=message):
            check(value)


@examples(100)
@given(window=st.one_of(numbers_st, st.integers(N_CTX - 2, N_CTX + 2)))
def test_window_follows_its_oracle(model, baseline, window):
    if int_in(2, N_CTX)(window):
        wins = evaluation.eval_windows(model, [PROBE_TEXT], window)
        assert wins.window == window and all(2 <= t.numel() <= window for t in wins.tokens)
    else:
        expect_refused(
            model,
            baseline,
            lambda: evaluation.evaluate_perplexity(model, [PROBE_TEXT], window=window),
            match=rf"window must be an integer in \[2, {N_CTX}\]",
        )


@pytest.fixture(scope="module")
def score_result(model):
    return scoring.score_pass(model, [PROBE_TEXT], top_k_contexts=3)


@pytest.fixture(scope="module")
def refusals(model, score_result, tmp_path_factory):
    """{parameter: (call with the value, message)}: public functions that take each numeric parameter."""
    spec = surgery.make_spec(model, {0: [1]}, "zero")
    out = tmp_path_factory.mktemp("never-written") / "pruned"
    return {
        "sparsity": (lambda v: curves.prune_curve(model, ["wanda"], [v]), r"sparsity must be a number in \[0, 1\)"),
        "select sparsity": (lambda v: selection.select_neurons(model, None, "wanda", v), r"\[0, 1\)"),
        "max_sparsity": (
            lambda v: search.search_pruning(model, 0.05, "wanda", max_sparsity=v),
            r"max_sparsity must be a number in \[0, 1\)",
        ),
        "step": (lambda v: search.search_pruning(model, 0.05, "wanda", step=v), r"step must be a number in \(0, 1\)"),
        "min_step": (lambda v: search.search_pruning(model, 0.05, "wanda", min_step=v), r"min_step must be"),
        "loss_budget": (lambda v: search.search_pruning(model, v, "wanda"), "loss_budget"),
        "every": (lambda v: evaluation.evaluate_perplexity(model, [PROBE_TEXT], window=64, every=v), r"every .* >= 1"),
        "seed": (
            lambda v: evaluation.evaluate_perplexity(model, [PROBE_TEXT], window=64, seed=v),
            r"seed must be an integer in \[0, ",
        ),
        "seeds": (lambda v: curves.prune_curve(model, ["random"], [0.1], seeds=[v]), r"seed must be an integer in \[0, "),
        "calib_tokens": (
            lambda v: selection.calibrate(model, [PROBE_TEXT], calib_tokens=v),
            r"calib_tokens must be None .* >= 1",
        ),
        "prune calib_tokens": (
            lambda v: surgery.prune_model(model, {0: [1]}, calib_tokens=v),
            r"calib_tokens must be None .* >= 1",
        ),
        "top_k_contexts": (
            lambda v: scoring.score_neurons(model, [PROBE_TEXT], top_k_contexts=v),
            r"top_k_contexts must be an integer in \[1, ",
        ),
        "score max_tokens": (
            lambda v: scoring.score_neurons(model, [PROBE_TEXT], max_tokens=v),
            r"max_tokens must be None .* >= 1",
        ),
        "score batch_size": (
            lambda v: scoring.score_neurons(model, [PROBE_TEXT], batch_size=v),
            r"batch_size must be an integer >= 1",
        ),
        "validate n": (lambda v: scoring.validate_scores(model, None, [PROBE_TEXT], n=v), r"n must be an integer in \[2, "),
        "validate seed": (
            lambda v: scoring.validate_scores(model, None, [PROBE_TEXT], n=4, seed=v),
            r"seed must be an integer in \[0, ",
        ),
        "validate max_tokens": (
            lambda v: scoring.validate_scores(model, None, [PROBE_TEXT], n=4, max_tokens=v),
            r"max_tokens must be None .* >= 1",
        ),
        "context window": (
            lambda v: scoring.top_contexts(score_result, 0, 1, window=v),
            r"window .* must be an integer in \[0, ",
        ),
        "ablate stack": (
            lambda v: ablation.ablate_each(model, [(0, 1)], [PROBE_TEXT], stack=v),
            r"stack must be an integer >= 1",
        ),
        "ablate max_tokens": (
            lambda v: ablation.ablate_each(model, [(0, 1)], [PROBE_TEXT], max_tokens=v),
            r"max_tokens must be None .* >= 1",
        ),
        "importance top_k": (
            lambda v: ns.neuron_importance(model, [PROBE_TEXT], top_k=v, progress=False),
            r"top_k must be an integer >= 1",
        ),
        "importance max_tokens": (
            lambda v: ns.neuron_importance(model, [PROBE_TEXT], max_tokens=v, progress=False),
            r"max_tokens must be None .* >= 1",
        ),
        "active_threshold": (
            lambda v: ns.neuron_importance(model, [PROBE_TEXT], active_threshold=v, progress=False),
            r"active_threshold must be a finite number >= 0",
        ),
        "stream max_tokens": (
            lambda v: ns.stream_activations(model, [PROBE_TEXT], max_tokens=v, progress=False),
            r"max_tokens must be None .* >= 1",
        ),
        "latency_tokens": (
            lambda v: surgery.save_pruned(model, spec, out, latency_tokens=v),
            r"latency_tokens must be an integer >= 1",
        ),
        "latency_repeats": (
            lambda v: surgery.save_pruned(model, spec, out, latency_repeats=v),
            r"latency_repeats must be an integer in \[1, 1000\]",
        ),
    }


ORACLES = {
    "sparsity": real_in(0, 1, high_open=True),
    "select sparsity": real_in(0, 1, high_open=True),
    "max_sparsity": real_in(0, 1, high_open=True),
    "step": real_in(0, 1, low_open=True, high_open=True),
    "min_step": real_in(0, Fraction(0.05), low_open=True),
    "loss_budget": real_in(0, None, low_open=True),
    "every": int_in(1),
    "seed": int_in(0, 2**63 - 1),
    "seeds": int_in(0, 2**63 - 1),
    "calib_tokens": tokens_ok,
    "prune calib_tokens": tokens_ok,
    "top_k_contexts": int_in(1, scoring.MAX_TOP_K),
    "score max_tokens": tokens_ok,
    "score batch_size": int_in(1),
    "validate n": int_in(2, N_LAYERS * D_MLP),
    "validate seed": int_in(0, 2**63 - 1),
    "validate max_tokens": tokens_ok,
    "context window": int_in(0, scoring.MAX_CONTEXT),
    "ablate stack": int_in(1),
    "ablate max_tokens": tokens_ok,
    "importance top_k": int_in(1),
    "importance max_tokens": tokens_ok,
    "active_threshold": real_in(0, None),
    "stream max_tokens": tokens_ok,
    "latency_tokens": int_in(1),
    "latency_repeats": int_in(1, 1000),
}


@examples(300)
@given(data=st.data())
def test_invalid_numbers_are_refused_by_every_public_function(model, baseline, refusals, data):
    """Any invalid value of any numeric parameter: a ValueError naming the valid range, before any model work."""
    name = data.draw(st.sampled_from(sorted(ORACLES)), label="parameter")
    value = data.draw(invalid(numbers_st, ORACLES[name]), label="value")
    call, message = refusals[name]
    expect_refused(model, baseline, lambda: call(value), match=message)
