"""Evaluation protocol, pruning curves and the pruning search, on the tiny models."""

from __future__ import annotations

import math

import pytest
import torch

import neuronscope_tl as ns
from neuronscope_tl import curves, surgery
from neuronscope_tl.hooks import hook_count

# Short texts: the tiny models have a 128-token context and a 384-token BPE vocabulary.
CALIB = [" ".join(a.split()[i : i + 20]) for a in ns.lee_articles()[:1] for i in range(0, len(a.split()), 20)]
EVAL = list(ns.lee_articles()[200:201])
WINDOW = 128


@pytest.fixture
def cal(tiny_model):
    return curves.calibrate(tiny_model, CALIB, calib_tokens=600)


def test_perplexity_matches_hf_loss(tiny_model, fresh_hf):
    """Our perplexity equals exp of HF's own mean loss over the same windows, weighted by scored tokens."""
    res = curves.evaluate_perplexity(tiny_model, EVAL, window=WINDOW, every=2)
    wins = curves.eval_windows(tiny_model, EVAL, WINDOW, 2).tokens
    total = count = 0
    with torch.no_grad():
        for ids in wins:
            out = fresh_hf(ids[None], labels=ids[None])
            total += float(out.loss) * (ids.numel() - 1)
            count += ids.numel() - 1
    assert res.n_tokens == count and res.n_windows == len(wins)
    assert res.perplexity == pytest.approx(math.exp(total / count), rel=1e-5)
    p = res.protocol
    assert p["window"] == WINDOW and p["n_tokens_scored"] == count and p["eval_texts"]["n_texts"] == 1
    assert set(p["versions"]) >= {"torch", "transformers", "transformer_lens"} and len(p["weights_sha256"]) == 16
    # bf16 autocast is close to fp32 and is recorded as such.
    bf = curves.evaluate_perplexity(tiny_model, EVAL, window=WINDOW, every=2, bf16=True)
    assert bf.protocol["precision"] == "bf16-autocast" and bf.perplexity == pytest.approx(res.perplexity, rel=0.05)


def test_weight_hash_changes_with_weights(tiny_model):
    before = curves.weights_hash(tiny_model)
    with torch.no_grad():
        tiny_model.original_model.get_input_embeddings().weight[0, 0] += 1.0
    assert curves.weights_hash(tiny_model) != before


def test_selection_per_layer_and_global(tiny_model, cal):
    info = ns.mlp_info(tiny_model)
    per = curves.select_neurons(tiny_model, cal, "wanda", 0.25, "per_layer")
    k = round(0.25 * info.d_mlp)
    wanda = cal.scores.pivot(index="layer", columns="neuron", values="wanda").to_numpy()
    for layer, chosen in per.items():
        assert sorted(chosen) == sorted(wanda[layer].argsort(kind="stable")[:k].tolist())
    glob = curves.select_neurons(tiny_model, cal, "fluctuation", 0.25, "global")
    assert sum(map(len, glob.values())) == round(0.25 * info.d_mlp * info.n_layers)
    z = (wanda - wanda.mean(1, keepdims=True)) / wanda.std(1, ddof=1, keepdims=True)
    glob_w = curves.select_neurons(tiny_model, cal, "wanda", 0.25, "global")
    cut = sorted(z.reshape(-1))[round(0.25 * z.size) - 1]
    assert all(z[l, n] <= cut + 1e-9 for l, ns_ in glob_w.items() for n in ns_)
    r0 = curves.select_neurons(tiny_model, cal, "random", 0.25, "per_layer", seed=0)
    r1 = curves.select_neurons(tiny_model, cal, "random", 0.25, "per_layer", seed=1)
    assert r0 != r1 and all(len(v) == k for v in r0.values())


def test_curve_points_equal_direct_evaluation(tiny_model, cal):
    res = curves.prune_curve(
        tiny_model, methods=["wanda", "random", "obs"], sparsities=[0.0, 0.25], ablation=["zero", "mean"],
        eval_texts=EVAL, window=WINDOW, every=1, calibration=cal, precision="fp32",
    )
    t = res.table
    assert set(t.columns) >= {"method", "sparsity", "scope", "ablation", "perplexity"}
    assert len(t) == 3 * 2 * 2 and (t.loc[t.method == "random", "n_seeds"] == 3).all()
    assert t.loc[t.sparsity == 0.0, "perplexity"].tolist() == pytest.approx([res.dense_perplexity] * 6)
    dense = curves.evaluate_perplexity(tiny_model, EVAL, window=WINDOW)
    assert res.dense_perplexity == pytest.approx(dense.perplexity, rel=1e-9)
    # One point re-measured independently: a physically pruned plain-HF model on the same windows.
    spec = curves.build_spec(tiny_model, cal, "obs", 0.25, "per_layer", "mean")
    hf = surgery.prune_model(tiny_model, None, "mean", spec=spec)
    total = count = 0
    with torch.no_grad():
        for ids in curves.eval_windows(tiny_model, EVAL, WINDOW).tokens:
            out = hf(ids[None], labels=ids[None])
            total += float(out.loss) * (ids.numel() - 1)
            count += ids.numel() - 1
    row = t[(t.method == "obs") & (t.sparsity == 0.25) & (t.ablation == "mean")]
    assert float(row.perplexity.iloc[0]) == pytest.approx(math.exp(total / count), rel=1e-4)
    rnd = t[(t.method == "random") & (t.sparsity == 0.25)]
    assert (rnd.perplexity_min <= rnd.perplexity).all() and (rnd.perplexity <= rnd.perplexity_max).all()
    assert res.recommended["method"] in ("wanda", "obs") and hook_count(tiny_model) == 0


def test_search_stays_within_budget(tiny_model, cal):
    res = curves.search_pruning(
        tiny_model, loss_budget=0.10, method="wanda", ablation="zero", eval_texts=EVAL, window=WINDOW,
        every=1, bf16=False, calibration=cal, step=0.1, min_step=0.05,
    )
    assert res.perplexity <= res.budget_perplexity
    accepted = res.steps[res.steps.accepted]
    assert (accepted.perplexity <= res.budget_perplexity).all()
    assert (res.steps[~res.steps.accepted].perplexity > res.budget_perplexity).all()
    if res.sparsity > 0:
        k = round(res.sparsity * ns.mlp_info(tiny_model).d_mlp)
        assert all(len(v) == k for v in res.neurons.values())
        again = curves.evaluate_perplexity(tiny_model, EVAL, window=WINDOW, hooks=surgery.simulation_hooks(res.spec))
        assert again.perplexity == pytest.approx(res.perplexity, rel=1e-9)


def test_bad_input(tiny_model, cal):
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        curves.prune_curve(tiny_model, sparsities=[1.0], calibration=cal)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        curves.prune_curve(tiny_model, sparsities=[-0.1], calibration=cal)
    with pytest.raises(ValueError, match="valid methods are magnitude"):
        curves.prune_curve(tiny_model, methods=["snip"], calibration=cal)
    with pytest.raises(ValueError, match="> 0"):
        curves.search_pruning(tiny_model, loss_budget=0.0, calibration=cal)
    with pytest.raises(ValueError, match="valid scopes"):
        curves.prune_curve(tiny_model, scope="row", calibration=cal)


def test_cli_parses_and_refuses_bad_input(tmp_path):
    from neuronscope_tl import cli

    name, cfg = cli.parse_args(["prune", "--sparsity", "0.2", "--out", str(tmp_path / "p")])
    assert name == "prune" and cfg.method == curves.RECOMMENDED_METHOD and cfg.ablation == curves.RECOMMENDED_ABLATION
    name, cfg = cli.parse_args(["curve", "--out", str(tmp_path / "c"), "--methods", "wanda,random", "--sparsities", "0.1,0.3"])
    assert cfg.methods == ["wanda", "random"] and cfg.sparsities == [0.1, 0.3]
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "f").write_text("x")
    bad = [
        ["prune", "--sparsity", "1.0", "--out", str(tmp_path / "p")],
        ["prune", "--sparsity", "0.2", "--method", "snip", "--out", str(tmp_path / "p")],
        ["prune", "--sparsity", "0.2", "--scope", "rows", "--out", str(tmp_path / "p")],
        ["prune", "--sparsity", "0.2", "--out", str(busy)],
        ["curve", "--sparsities", "0.5,1.5", "--out", str(tmp_path / "c")],
    ]
    for argv in bad:
        with pytest.raises(ValueError):
            cli.parse_args(argv)
        assert cli.main(argv) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy"]
    # overwrite lets a non-empty directory through validation
    assert cli.parse_args(["prune", "--sparsity", "0.2", "--out", str(busy), "--overwrite"])[1].overwrite


def test_plot_and_csv(tiny_model, cal, tmp_path):
    res = curves.prune_curve(tiny_model, ["wanda", "random"], [0.1, 0.3], eval_texts=EVAL, window=WINDOW, every=2,
                             calibration=cal, precision="fp32", seeds=(0, 1))
    png = curves.plot_curve(res, tmp_path / "curve.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and [p.name for p in tmp_path.iterdir()] == ["curve.png"]
