"""The score registry: each registered method against a plain computation from the score table, seeds, names,
refusals, and a method registered here reaching the table, the CLI and a pruning curve with no other edit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import neuronscope_tl as ns
from neuronscope_tl import cli, curves, scores, scoring, selection
from neuronscope_tl.obs import obs_order
from neuronscope_tl.scores import Column, Score

from conftest import FP32_EPS

CALIB = [" ".join(a.split()[i : i + 20]) for a in ns.lee_articles()[:1] for i in range(0, len(a.split()), 20)]
EVAL = list(ns.lee_articles()[200:201])
WINDOW = 128
BUILT_IN = ("magnitude", "activation", "wanda", "wanda_io", "fluctuation", "taylor", "random", "obs")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def model(tiny_dirs, request):
    return ns.load_model(tiny_dirs[request.param])


@pytest.fixture(scope="module")
def cal(model):
    return selection.calibrate(model, CALIB, calib_tokens=600)


def pivot(cal, column) -> np.ndarray:
    """A score table column as a plain [n_layers, d_mlp] float64 array."""
    return cal.scores.pivot(index="layer", columns="neuron", values=column).to_numpy(dtype=np.float64)


def plain(model, cal, method: str, ablation: str) -> np.ndarray:
    """Each built-in plain score, written out from the score table's columns (magnitude: the weight table's)."""
    if method == "magnitude":
        weights = ns.neuron_weight_table(model)
        return weights.pivot(index="layer", columns="neuron", values="mean_abs_weight").to_numpy(dtype=np.float64)
    t = {c: pivot(cal, c) for c in ("w_in_norm", "w_out_norm", "rms", "var", "mean_abs", "taylor_zero", "taylor_mean")}
    return {
        "activation": t["mean_abs"],
        "wanda": t["w_out_norm"] * t["rms"],
        "wanda_io": t["rms"] * np.hypot(t["w_in_norm"], t["w_out_norm"]),
        "fluctuation": t["var"] * t["w_out_norm"] ** 2,
        "taylor": np.abs(t["taylor_mean"] if ablation == "mean" else t["taylor_zero"]),
    }[method]


@pytest.mark.parametrize("method", ["magnitude", "activation", "wanda", "wanda_io", "fluctuation", "taylor"])
@pytest.mark.parametrize("ablation", ["zero", "mean"])
def test_each_plain_score_equals_its_formula(model, cal, method, ablation):
    got = scores.get(method).scores(cal, ablation)
    assert got.dtype == torch.float64 and tuple(got.shape) == cal.shape
    # the same columns combined by the same formula: equal up to a few float64 ulps, except that w_out_norm is an
    # fp32 column whose square (fluctuation, wanda_io) the table takes in fp32: fp32 roundings of squares, a sum and
    # a square root
    rtol = 4 * FP32_EPS if method in ("fluctuation", "wanda_io") else 1e-14
    np.testing.assert_allclose(got.numpy(), plain(model, cal, method, ablation), rtol=rtol, atol=0)


def test_score_columns_equal_their_formulas(cal):
    """The registered columns of the scoring pass (wanda, wanda_io, fluctuation) from the pass's own statistics."""
    # products of the pass's own statistics: a few float64 ulps; fluctuation squares the fp32 w_out_norm in fp32
    np.testing.assert_allclose(pivot(cal, "wanda"), pivot(cal, "w_out_norm") * pivot(cal, "rms"), rtol=1e-14)
    np.testing.assert_allclose(pivot(cal, "fluctuation"), pivot(cal, "var") * pivot(cal, "w_out_norm") ** 2, rtol=4 * FP32_EPS)
    wanda_io = pivot(cal, "rms") * np.hypot(pivot(cal, "w_in_norm"), pivot(cal, "w_out_norm"))
    np.testing.assert_allclose(pivot(cal, "wanda_io"), wanda_io, rtol=4 * FP32_EPS)


def test_taylor_depends_on_the_ablation(cal):
    zero, mean = scores.get("taylor").scores(cal, "zero"), scores.get("taylor").scores(cal, "mean")
    assert not torch.equal(zero, mean)


def test_random_is_seeded_and_differs_across_seeds(cal):
    rnd = scores.get("random")
    assert rnd.random and not any(scores.get(m).random for m in BUILT_IN if m != "random")
    a, b, c = rnd.scores(cal, "zero", 0), rnd.scores(cal, "zero", 0), rnd.scores(cal, "mean", 1)
    assert torch.equal(a, b) and not torch.equal(a, c)
    expected = torch.rand(cal.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert torch.equal(a, expected)


def test_obs_is_a_selection_with_a_refit(model, cal):
    """obs has no plain score; its per-layer selection is the first k of each layer's OBS removal order."""
    obs = scores.get("obs")
    assert obs.refit and obs.needs_grams and obs.needs == "grams"
    assert not any(scores.get(m).refit or scores.get(m).needs_grams for m in BUILT_IN if m != "obs")
    with pytest.raises(ValueError, match="no plain score"):
        obs.scores(cal, "zero")
    k = 5
    chosen = selection.select_neurons(model, cal, "obs", k / cal.shape[1], "per_layer", "mean")
    for layer in range(cal.shape[0]):
        order, _ = obs_order(cal.grams[layer], model.W_out[layer].detach().float().cpu(), k, keep_constant=True)
        assert chosen[layer] == sorted(order[:k])


def test_registry_names_equal_methods():
    assert scores.METHODS == scores.method_names() == tuple(s.name for s in scores.registered()) == BUILT_IN
    assert all(s.description and s.needs in scores.NEEDS for s in scores.registered())
    assert [c.name for c in scores.columns()] == ["wanda", "wanda_io", "fluctuation", "taylor_zero", "taylor_mean"]
    assert scoring.CHEAP_SCORES == (
        "w_out_norm",
        "mean_abs",
        "rms",
        "wanda",
        "wanda_io",
        "fluctuation",
        "taylor_zero",
        "taylor_mean",
    )
    assert scoring.SCORE_COLUMNS[-5:] == ("wanda", "wanda_io", "fluctuation", "taylor_zero", "taylor_mean")


def test_unknown_or_bad_names_are_refused():
    valid = ", ".join(BUILT_IN)
    for bad in ("snip", "", None, 3):
        with pytest.raises(ValueError, match=f"valid methods are {valid}"):
            scores.get(bad)
    with pytest.raises(ValueError, match="already registered"):
        scores.register(Score("wanda", "again", needs="activations", rank=lambda cal, ablation, seed: cal.column("rms")))
    with pytest.raises(ValueError, match="needs must be one of"):
        scores.register(Score("mine", "x", needs="tea", rank=lambda cal, ablation, seed: cal.column("rms")))
    with pytest.raises(ValueError, match="already defined"):
        scores.register(
            Score(
                "mine",
                "x",
                needs="activations",
                columns=(Column("wanda", lambda t, s: t["rms"]),),
                rank=lambda cal, ablation, seed: cal.column("rms"),
            )
        )
    assert scores.METHODS == BUILT_IN


def test_a_registered_score_reaches_table_cli_and_curve(model, tmp_path, capsys):
    """One registration: its column joins the scoring pass and the validated cheap scores, its name the CLI's
    choices and defaults, and prune_curve ranks by it; removed again afterwards."""
    new = Score(
        "w_in_rms",
        "||W_in row|| x RMS activation (an input-side Wanda, for this test)",
        needs="activations",
        columns=(Column("w_in_rms", lambda t, s: t["w_in_norm"] * t["rms"]),),
        rank=lambda cal, ablation, seed: cal.column("w_in_rms"),
    )
    scores.register(new)
    try:
        assert scores.METHODS[-1] == "w_in_rms" and scoring.CHEAP_SCORES[-1] == "w_in_rms"
        cal = selection.calibrate(model, CALIB, calib_tokens=600, with_grams=scores.needs_grams(["w_in_rms"]))
        assert cal.grams is None and list(cal.scores.columns) == list(scoring.SCORE_COLUMNS)
        np.testing.assert_allclose(pivot(cal, "w_in_rms"), pivot(cal, "w_in_norm") * pivot(cal, "rms"), rtol=1e-14)

        assert "w_in_rms" in cli.CurveConfig(out=str(tmp_path / "c")).methods
        _, cfg = cli.parse_args(["curve", "--out", str(tmp_path / "c"), "--methods", "w_in_rms,wanda"])
        assert cfg.methods == ["w_in_rms", "wanda"]
        assert (
            cli.parse_args(["prune", "--sparsity", "0.2", "--out", str(tmp_path / "p"), "--method", "w_in_rms"])[1].method
            == "w_in_rms"
        )
        with pytest.raises(SystemExit):
            cli.parse_args(["curve", "--help"])
        assert f"one of {', '.join(BUILT_IN)}, w_in_rms;" in " ".join(capsys.readouterr().out.split())

        res = curves.prune_curve(
            model, ["w_in_rms"], [0.25], eval_texts=EVAL, window=WINDOW, every=1, calibration=cal, precision="fp32"
        )
        assert res.table.method.tolist() == ["w_in_rms"] and res.recommended["method"] == "w_in_rms"
        k = round(0.25 * cal.shape[1])
        assert res.runs.n_pruned.tolist() == [k * cal.shape[0]]
        chosen = selection.select_neurons(model, cal, "w_in_rms", 0.25)
        expected = pivot(cal, "w_in_rms").argsort(axis=1, kind="stable")[:, :k]
        assert chosen == {l: sorted(expected[l].tolist()) for l in range(cal.shape[0])}
    finally:
        scores.unregister("w_in_rms")
    assert scores.METHODS == BUILT_IN and "w_in_rms" not in scoring.SCORE_COLUMNS
    with pytest.raises(ValueError, match="valid methods are"):
        cli.parse_args(["curve", "--out", str(tmp_path / "c"), "--methods", "w_in_rms"])
