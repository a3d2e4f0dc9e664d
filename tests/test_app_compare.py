"""The app's model comparison (``AppState.compare`` and ``POST /api/pruning/compare``) on tiny models: the result is
``compare_models`` called directly on the same models with the same settings (every number equal), bad input is
refused with the library-style message before anything is loaded or run (no hook left, weights unchanged), and
token budgets past the app's limits get 413."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from fastapi.testclient import TestClient

import neuronscope_tl as ns
from neuronscope_tl import compare
from neuronscope_tl.app import create_app
from neuronscope_tl.app.state import THIS_MODEL, AppSettings, AppState, LimitExceeded
from neuronscope_tl.export import to_jsonable

P = "/api/pruning"
# Small and quick: two methods, one sparsity; the token budgets are the app's limits below.
RUN = dict(methods=["wanda", "random"], sparsities=[0.25], ablation="zero")
CALIB_LIMIT, TOKEN_LIMIT = 128, 120

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model(tiny_dirs):
    return ns.load_model(tiny_dirs["llama"])


@pytest.fixture(scope="module")
def settings(tiny_dirs):
    """The gpt2 tiny model is the one other model the app may load."""
    return AppSettings(max_calib_tokens=CALIB_LIMIT, max_tokens=TOKEN_LIMIT, warm_start=False, compare_models=[tiny_dirs["gpt2"]])


@pytest.fixture(scope="module")
def state(model, settings):
    return AppState(model, settings)


def no_hooks(model) -> bool:
    return all(not hp.fwd_hooks and not hp.bwd_hooks for hp in model.hook_dict.values())


def weights_of(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_weights(model, before: dict):
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(after[k], v), k


def direct(models, **kw) -> compare.Comparison:
    """compare_models itself, with the app's budgets (its limits) written out."""
    return compare.compare_models(models, **RUN, calib_tokens=CALIB_LIMIT, eval_tokens=TOKEN_LIMIT, **kw)


def assert_same_comparison(got: compare.Comparison, want: compare.Comparison):
    pd.testing.assert_frame_equal(compare.comparison_table(got), compare.comparison_table(want), check_exact=True)
    assert got.settings == want.settings
    for a, b in zip(got.models, want.models, strict=True):
        assert (a.model, a.kind, a.n_eval_tokens, a.dense_perplexity, a.winner) == (
            b.model,
            b.kind,
            b.n_eval_tokens,
            b.dense_perplexity,
            b.winner,
        )
        for attr in ("curve", "sensitivity", "importance", "outliers", "peaks"):
            pd.testing.assert_frame_equal(getattr(a, attr), getattr(b, attr), check_exact=True, obj=f"{a.model} {attr}")
        assert a.importance_summary == b.importance_summary


# ---------------------------------------------------------------------------------------------- names


def test_names_resolve_to_the_app_model_or_an_allowed_name(state, model, tiny_dirs):
    gpt2 = tiny_dirs["gpt2"]
    assert state.compare_choices() == [THIS_MODEL, state.model_name, gpt2]
    assert state._compare_entries(f" This Model , {gpt2}") == [model, gpt2]
    assert state._compare_entries([state.model_name]) == [model]
    # the embedded models are the choices when none are configured; their aliases name them
    default_state = AppState(model, AppSettings(warm_start=False))
    assert default_state.compare_choices() == [THIS_MODEL, state.model_name, *ns.models.embedded_models()]
    if ns.models.DEFAULT_MODEL_NAME in ns.models.embedded_models():
        assert default_state._compare_entries("default, this model") == [ns.models.DEFAULT_MODEL_NAME, model]


# ---------------------------------------------------------------------------------------------- equal to the library


def test_state_compare_equals_compare_models(state, model, tiny_dirs):
    """Two models, the app's and one loaded by name; the token budgets left to the app's defaults, which are the
    library's capped at the limits (both defaults are larger than these limits)."""
    assert compare.DEFAULT_COMPARE_CALIB_TOKENS > CALIB_LIMIT and compare.DEFAULT_EVAL_TOKENS > TOKEN_LIMIT
    before = weights_of(model)
    got = state.compare(f"{THIS_MODEL}, {tiny_dirs['gpt2']}", **RUN)
    assert (got.settings["calib_tokens"], got.settings["eval_tokens"]) == (CALIB_LIMIT, TOKEN_LIMIT)
    assert [r.model for r in got.models] == [state.model_name, tiny_dirs["gpt2"]]
    assert no_hooks(model) and state.lock.acquire(blocking=False)
    state.lock.release()
    assert_same_weights(model, before)
    assert_same_comparison(got, direct([model, tiny_dirs["gpt2"]]))


def test_rest_compare_equals_compare_models(model, settings):
    c = TestClient(create_app(model, settings, ui=False))
    r = c.post(f"{P}/compare", json={"models": [THIS_MODEL], **RUN})
    assert r.status_code == 200, r.text
    body = r.json()
    want = direct([model])
    table = compare.comparison_table(want)
    assert body["table"] == to_jsonable(table)  # every number, exactly (JSON floats round-trip)
    assert body["table"][0]["dense_ppl"] == want.models[0].dense_perplexity and body["table"][0]["model"] == model.cfg.model_name
    assert body["settings"] == to_jsonable(want.settings)
    assert [m["winner"] for m in body["models"]] == [r.winner for r in want.models]
    assert no_hooks(model)


# ---------------------------------------------------------------------------------------------- refused


@pytest.fixture
def nothing_runs(monkeypatch, model):
    """Fails the test if a refused request loads a model or starts a comparison; checks afterwards that the model
    carries no hook and its weights are unchanged."""
    calls = []
    monkeypatch.setattr(compare, "compare_models", lambda *a, **k: calls.append("compare_models"))
    monkeypatch.setattr(compare, "load_model", lambda *a, **k: calls.append("load_model"))
    monkeypatch.setattr(ns.models, "load_model", lambda *a, **k: calls.append("load_model"))
    before = weights_of(model)
    yield
    assert calls == []
    assert no_hooks(model)
    assert_same_weights(model, before)


def bad_inputs(tiny_dirs_gpt2: str, own_name: str):
    """(arguments of AppState.compare, the message's start or a part of it)."""
    choices = f"choose from {THIS_MODEL}, {own_name}, {tiny_dirs_gpt2}."
    return [
        (dict(model_names="no-such-model"), f"unknown model 'no-such-model'; {choices}"),
        (dict(model_names="/etc"), f"unknown model '/etc'; {choices}"),  # a real directory the app may not load
        (dict(model_names=f"this model, {own_name}"), f"model {own_name!r} is listed twice"),
        (dict(model_names=" , "), f"name at least one model to compare; {choices}"),
        (dict(model_names=""), f"name at least one model to compare; {choices}"),
        (dict(model_names="this model", methods=[]), "choose at least one method of magnitude"),
        (dict(model_names="this model", methods=["nope"]), "unknown method 'nope'; valid methods are"),
        (dict(model_names="this model", sparsities=[0.1, 1.5]), r"sparsity must be a number in [0, 1), got 1.5."),
        (dict(model_names="this model", sparsities=[-0.1]), r"sparsity must be a number in [0, 1), got -0.1."),
        (dict(model_names="this model", sparsities=[]), r"sparsities must be a non-empty list of numbers in [0, 1)."),
        (dict(model_names="this model", ablation="half"), "unknown ablation mode 'half'; valid modes are zero, mean."),
        (dict(model_names="this model", calib_tokens=0), f"calibration tokens must be an integer in [1, {CALIB_LIMIT}], got 0."),
        (dict(model_names="this model", eval_tokens=0), f"evaluation tokens must be an integer in [1, {TOKEN_LIMIT}], got 0."),
    ]


def test_bad_input_is_refused_before_any_work(state, model, tiny_dirs, nothing_runs):
    for kwargs, message in bad_inputs(tiny_dirs["gpt2"], state.model_name):
        args = {**RUN, **kwargs}
        with pytest.raises(ValueError) as info:
            state.compare(args.pop("model_names"), **args)
        assert not isinstance(info.value, LimitExceeded)
        assert str(info.value).startswith(message), (kwargs, str(info.value))


def test_limits_are_refused_before_any_work(state, nothing_runs):
    for kwargs, message in [
        (dict(calib_tokens=CALIB_LIMIT + 1), f"calibration tokens {CALIB_LIMIT + 1} is too large; at most {CALIB_LIMIT}."),
        (dict(eval_tokens=TOKEN_LIMIT + 1), f"evaluation tokens {TOKEN_LIMIT + 1} is too large; at most {TOKEN_LIMIT}."),
    ]:
        with pytest.raises(LimitExceeded) as info:
            state.compare(THIS_MODEL, **RUN, **kwargs)
        assert str(info.value) == message


def test_rest_refusals(model, settings, state, tiny_dirs, nothing_runs):
    c = TestClient(create_app(model, settings, ui=False))
    for kwargs, message in bad_inputs(tiny_dirs["gpt2"], state.model_name):
        body = {**RUN, **kwargs}
        names = body.pop("model_names")
        body["models"] = names.split(",")  # a list of names on the REST API
        if "ablation" in kwargs:
            r = c.post(f"{P}/compare", json=body)
            assert r.status_code == 422  # Pydantic's Literal, like the other routes' ablation
            continue
        r = c.post(f"{P}/compare", json=body)
        assert r.status_code == 400, (kwargs, r.text)
        assert r.json()["detail"].startswith(message), (kwargs, r.json())
    assert c.post(f"{P}/compare", json={"models": [], **RUN}).json()["detail"].startswith("name at least one model")
    # 413 past each limit, with the state's message
    for field, limit, what in (("calib_tokens", CALIB_LIMIT, "calibration"), ("eval_tokens", TOKEN_LIMIT, "evaluation")):
        r = c.post(f"{P}/compare", json={"models": [THIS_MODEL], **RUN, field: limit + 1})
        assert r.status_code == 413 and r.json() == {"detail": f"{what} tokens {limit + 1} is too large; at most {limit}."}
    # malformed bodies: 422, never 500
    for body in (
        {"models": [THIS_MODEL], "window": 8},
        {"models": "this model"},
        {"models": [THIS_MODEL], "sparsities": ["0.1"]},
        {"models": [THIS_MODEL], "calib_tokens": True},
        {},
    ):
        assert c.post(f"{P}/compare", json=body).status_code == 422, body
