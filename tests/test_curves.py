"""Evaluation protocol, pruning curves and the pruning search, on the tiny models, against plain HF models and
float64 references (tolerances derived from fp32 rounding, see conftest)."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

import neuronscope_tl as ns
from neuronscope_tl import curves, evaluation, search, selection, surgery
from neuronscope_tl.hooks import hook_count

from conftest import TINY_KINDS, fp32_forward_error, hf_logits, load_hf, nll64, nll_tolerance, save_tiny, zero_output_weights

# Short texts: the tiny models have a 128-token context and a 384-token BPE vocabulary.
CALIB = [" ".join(a.split()[i : i + 20]) for a in ns.lee_articles()[:1] for i in range(0, len(a.split()), 20)]
EVAL = list(ns.lee_articles()[200:201])
WINDOW = 128

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module", params=TINY_KINDS)
def kind(request):
    return request.param


@pytest.fixture(scope="module")
def model(tiny_dirs, kind):
    """One bridge per kind for the module; no test here changes its weights (the hash test loads its own)."""
    return ns.load_model(tiny_dirs[kind])


@pytest.fixture(scope="module")
def cal(model):
    return selection.calibrate(model, CALIB, calib_tokens=600)


def hf_perplexity(hf, windows):
    """exp(mean next-token NLL) over the windows, computed in float64 from a plain HF model's fp32 logits, and the
    per-position NLLs' fp32 bound (see conftest.nll_tolerance) for comparing another fp32 computation with it."""
    nll, logits = [], []
    for ids in windows:
        out = hf_logits(hf, ids)
        logits.append(out)
        nll.append(nll64(out, ids))
    return math.exp(float(torch.cat(nll).mean())), logits


def perplexity_tolerance(logits, windows, eta):
    """Relative bound on |ppl_fp32 - ppl64| / ppl64: ppl = exp(mean NLL), so d ppl / ppl = d mean NLL (to first
    order, doubled)."""
    return 2 * float(torch.cat([nll_tolerance(l, ids, eta, runs=2) for l, ids in zip(logits, windows)]).mean())


def test_perplexity_matches_hf_in_float64(model, tiny_dirs, kind):
    """Our perplexity equals exp of the mean float64 NLL of a plain HF model over the same windows."""
    res = evaluation.evaluate_perplexity(model, EVAL, window=WINDOW, every=2)
    wins = evaluation.eval_windows(model, EVAL, WINDOW, 2).tokens
    hf = load_hf(tiny_dirs[kind])
    expected, logits = hf_perplexity(hf, wins)
    tol = perplexity_tolerance(logits, wins, 2 * fp32_forward_error(hf, wins))
    assert res.n_tokens == sum(len(w) - 1 for w in wins) and res.n_windows == len(wins) >= 2
    assert abs(res.perplexity / expected - 1) <= tol, (res.perplexity, expected, tol)
    # windows: non-overlapping, every 2nd, of the concatenated texts with their BOS
    stream = model.to_tokens(EVAL[0], truncate=False)[0]
    assert [w.tolist() for w in wins] == [c.tolist() for c in stream.split(WINDOW)[::2] if len(c) >= 2]
    p = res.protocol
    assert p["window"] == WINDOW and p["n_tokens_scored"] == res.n_tokens and p["eval_texts"]["n_texts"] == 1
    assert set(p["versions"]) >= {"torch", "transformers", "transformer_lens"} and len(p["weights_sha256"]) == 16
    # bf16 autocast is recorded as such and stays near fp32 (bf16 keeps 8 bits of mantissa: 0.4% per rounding)
    bf = evaluation.evaluate_perplexity(model, EVAL, window=WINDOW, every=2, bf16=True)
    # bf16 keeps 8 mantissa bits (relative rounding up to 2^-9 per operation); 5% only asserts that the two are
    # close and differ: how far bf16 may move a curve is decided at run time by prune_curve(precision="auto"),
    # which measures both and keeps fp32 beyond 0.5%
    assert bf.protocol["precision"] == "bf16-autocast" and bf.perplexity == pytest.approx(res.perplexity, rel=0.05)
    assert bf.perplexity != res.perplexity


def test_weight_hash_changes_with_weights(tiny_dirs):
    model = ns.load_model(tiny_dirs["llama"])
    before = evaluation.weights_hash(model)
    assert evaluation.weights_hash(ns.load_model(tiny_dirs["llama"])) == before
    with torch.no_grad():
        model.original_model.get_input_embeddings().weight[0, 0] += 1.0
    assert evaluation.weights_hash(model) != before


def test_selection_per_layer_and_global(model, cal):
    info = ns.mlp_info(model)
    per = selection.select_neurons(model, cal, "wanda", 0.25, "per_layer")
    k = round(0.25 * info.d_mlp)
    wanda = cal.scores.pivot(index="layer", columns="neuron", values="wanda").to_numpy()
    for layer, chosen in per.items():
        assert sorted(chosen) == sorted(wanda[layer].argsort(kind="stable")[:k].tolist())
    glob = selection.select_neurons(model, cal, "fluctuation", 0.25, "global")
    assert sum(map(len, glob.values())) == round(0.25 * info.d_mlp * info.n_layers)
    z = (wanda - wanda.mean(1, keepdims=True)) / wanda.std(1, ddof=1, keepdims=True)
    glob_w = selection.select_neurons(model, cal, "wanda", 0.25, "global")
    cut = sorted(z.reshape(-1))[round(0.25 * z.size) - 1]
    assert all(z[l, n] <= cut + 1e-9 for l, ns_ in glob_w.items() for n in ns_)
    r0 = selection.select_neurons(model, cal, "random", 0.25, "per_layer", seed=0)
    r1 = selection.select_neurons(model, cal, "random", 0.25, "per_layer", seed=1)
    assert r0 != r1 and all(len(v) == k for v in r0.values())


def test_curve_points_equal_independent_evaluation(model, tiny_dirs, kind, cal):
    """Every point of a curve against a plain HF model evaluated in float64: sparsity 0 against the dense model,
    each random seed against the model with that seed's neurons zeroed (min, mean and max of the spread too), and
    an obs point against the physically pruned model."""
    res = curves.prune_curve(
        model,
        methods=["wanda", "random", "obs"],
        sparsities=[0.0, 0.25],
        ablation=["zero", "mean"],
        eval_texts=EVAL,
        window=WINDOW,
        every=1,
        calibration=cal,
        precision="fp32",
    )
    t, runs = res.table, res.runs
    assert len(t) == 3 * 2 * 2 and (t.loc[t.method == "random", "n_seeds"] == 3).all() and len(runs) == 2 * 2 * (1 + 1 + 3)
    wins = evaluation.eval_windows(model, EVAL, WINDOW).tokens
    dense_hf = load_hf(tiny_dirs[kind])
    eta = 2 * fp32_forward_error(dense_hf, wins)

    dense, logits = hf_perplexity(dense_hf, wins)
    tol = perplexity_tolerance(logits, wins, eta)
    zero_rows = t[t.sparsity == 0.0]
    assert len(zero_rows) == 6 and runs[runs.sparsity == 0.0].n_pruned.eq(0).all()
    assert all(abs(p / dense - 1) <= tol for p in zero_rows.perplexity), (zero_rows.perplexity.tolist(), dense, tol)
    assert abs(res.dense_perplexity / dense - 1) <= tol

    # random, zero ablation: each seed's neurons zeroed in plain HF weights
    seeds = {}
    for seed in curves.RANDOM_SEEDS:
        neurons = selection.select_neurons(model, cal, "random", 0.25, "per_layer", "zero", seed)
        hf = load_hf(tiny_dirs[kind])
        for layer, ns_ in neurons.items():
            zero_output_weights(hf, layer, ns_)
        seeds[seed], logits = hf_perplexity(hf, wins)
        tol = max(tol, perplexity_tolerance(logits, wins, eta))
    run = runs[(runs.method == "random") & (runs.sparsity == 0.25) & (runs.ablation == "zero")].sort_values("seed")
    assert run.seed.tolist() == list(curves.RANDOM_SEEDS)
    for got, seed in zip(run.perplexity, curves.RANDOM_SEEDS):
        assert abs(got / seeds[seed] - 1) <= tol, (seed, got, seeds[seed], tol)
    row = t[(t.method == "random") & (t.sparsity == 0.25) & (t.ablation == "zero")].iloc[0]
    values = np.array(list(seeds.values()))
    assert abs(row.perplexity / values.mean() - 1) <= tol
    assert abs(row.perplexity_min / values.min() - 1) <= tol and abs(row.perplexity_max / values.max() - 1) <= tol
    assert values.max() / values.min() - 1 > 10 * tol  # the seeds differ resolvably: the spread is real

    # obs with mean ablation (least-squares refit and bias) against the physically pruned model
    spec = selection.build_spec(model, cal, "obs", 0.25, "per_layer", "mean")
    pruned, logits = hf_perplexity(surgery.prune_model(model, None, "mean", spec=spec), wins)
    row = t[(t.method == "obs") & (t.sparsity == 0.25) & (t.ablation == "mean")]
    assert abs(float(row.perplexity.iloc[0]) / pruned - 1) <= perplexity_tolerance(logits, wins, eta)
    assert abs(pruned / dense - 1) > 10 * tol  # pruning a quarter of the neurons moved the perplexity
    # the recommendation is the argmin of mean log-perplexity per (method, ablation), random excluded
    mean_log = t[t.method != "random"].assign(lp=lambda d: np.log(d.perplexity)).groupby(["method", "ablation"]).lp.mean()
    assert (res.recommended["method"], res.recommended["ablation"]) == mean_log.idxmin()
    assert hook_count(model) == 0


def table_of(points):
    """A curve table from {(method, ablation): [perplexity at each sparsity]}."""
    rows = [
        {"method": m, "ablation": a, "sparsity": s, "scope": "per_layer", "perplexity": p}
        for (m, a), ppl in points.items()
        for s, p in zip([0.1, 0.3, 0.5], ppl)
    ]
    return pd.DataFrame(rows)


@pytest.mark.parametrize(
    "points, expected",
    [
        # obs best everywhere
        ({("obs", "mean"): [11, 12, 14], ("wanda", "zero"): [12, 14, 20], ("random", "zero"): [9, 10, 11]}, ("obs", "mean")),
        # obs best at two sparsities but far worse at the third: the mean of log-perplexity picks wanda, not obs
        ({("obs", "mean"): [10, 11, 400], ("wanda", "mean"): [12, 13, 15], ("taylor", "zero"): [30, 40, 50]}, ("wanda", "mean")),
        # the same method with two ablations is two candidates
        (
            {("fluctuation", "zero"): [20, 30, 40], ("fluctuation", "mean"): [19, 29, 39], ("obs", "zero"): [25, 30, 35]},
            ("fluctuation", "mean"),
        ),
        # random is a baseline, never recommended, even when it is lowest
        (
            {("random", "zero"): [1, 1, 1], ("magnitude", "zero"): [50, 60, 70], ("obs", "mean"): [40, 70, 90]},
            ("magnitude", "zero"),
        ),
    ],
)
def test_recommend_picks_the_lowest_mean_log_perplexity(points, expected):
    assert curves.recommend(table_of(points)) == {"method": expected[0], "ablation": expected[1], "chosen_on": "evaluation_set"}


def test_recommend_chooses_on_out_of_domain_ratio():
    """With evaluation domains the choice is made on the out-of-domain ratio, even where in-domain disagrees."""
    table = table_of({("obs", "mean"): [10, 11, 12], ("wanda", "mean"): [12, 13, 15], ("random", "zero"): [1, 1, 1]})
    table["ratio_in_domain"] = [1.1, 1.2, 1.3, 1.3, 1.4, 1.5, 1.0, 1.0, 1.0]
    table["ratio_out_of_domain"] = [2.0, 2.4, 2.9, 1.6, 1.9, 2.2, 1.0, 1.0, 1.0]
    assert curves.recommend(table) == {"method": "wanda", "ablation": "mean", "chosen_on": "out_of_domain"}


def test_recommend_without_candidates_is_empty():
    assert curves.recommend(table_of({("random", "zero"): [1, 2, 3]})) == {}


def test_search_accepts_and_returns_the_largest_accepted_step(model, tiny_dirs, kind, cal):
    """A budget the first steps meet: the search accepts, and its answer is the largest accepted sparsity, whose
    perplexity a plain HF model with those neurons zeroed reproduces."""
    res = search.search_pruning(
        model,
        loss_budget=0.5,
        method="wanda",
        ablation="zero",
        eval_texts=EVAL,
        window=WINDOW,
        every=1,
        bf16=False,
        calibration=cal,
        step=0.1,
        min_step=0.05,
    )
    steps = res.steps
    accepted = steps[steps.accepted]
    assert len(accepted) >= 1 and res.sparsity == accepted.sparsity.max() > 0
    assert res.perplexity == accepted.perplexity.iloc[-1] <= res.budget_perplexity
    assert res.budget_perplexity == pytest.approx(res.dense_perplexity * 1.5, rel=1e-12)
    assert (steps.accepted == (steps.perplexity <= res.budget_perplexity)).all()
    assert list(steps.ratio) == pytest.approx(list(steps.perplexity / res.dense_perplexity), rel=1e-12)
    k = round(res.sparsity * ns.mlp_info(model).d_mlp)
    assert sorted(res.neurons) == [0, 1, 2] and all(len(v) == k for v in res.neurons.values())
    hf = load_hf(tiny_dirs[kind])
    for layer, ns_ in res.neurons.items():
        zero_output_weights(hf, layer, ns_)
    wins = evaluation.eval_windows(model, EVAL, WINDOW).tokens
    expected, logits = hf_perplexity(hf, wins)
    assert abs(res.perplexity / expected - 1) <= perplexity_tolerance(logits, wins, 2 * fp32_forward_error(hf, wins))


class FakeSpec:
    def __init__(self, sparsity):
        self.sparsity, self.neurons = sparsity, {0: [0]}


@pytest.mark.parametrize(
    "case",
    [
        # budget 5%, perplexity = dense x (1 + s^2): accepted while s <= 0.2236. 0.3 fails -> step 0.05: 0.25 fails ->
        # step 0.025 (= min_step, still tried): 0.225 fails -> step 0.0125 < min_step: stop at 0.2.
        dict(
            ppl=lambda s: 10 * (1 + s * s),
            kwargs=dict(step=0.1, min_step=0.025, max_sparsity=0.9),
            tried=[0.1, 0.2, 0.3, 0.25, 0.225],
            accepted=[True, True, False, False, False],
            chosen=0.2,
        ),
        # every step within budget, max_sparsity 0.3: 0.4 is never evaluated; the step halves (0.35, 0.325 also over
        # the maximum) until it is below min_step.
        dict(
            ppl=lambda s: 10.0,
            kwargs=dict(step=0.1, min_step=0.025, max_sparsity=0.3),
            tried=[0.1, 0.2, 0.3],
            accepted=[True, True, True],
            chosen=0.3,
        ),
        # max_sparsity 0.27: 0.3 is over it, the step halves to 0.05 and 0.25 is tried; 0.3 and 0.275 are over it again.
        dict(
            ppl=lambda s: 10.0,
            kwargs=dict(step=0.1, min_step=0.025, max_sparsity=0.27),
            tried=[0.1, 0.2, 0.25],
            accepted=[True, True, True],
            chosen=0.25,
        ),
        # a budget the first step already breaks: back off from 0.1 to 0.05 to 0.025, and 0.0125 is below min_step.
        dict(
            ppl=lambda s: 10 * (1 + s),
            kwargs=dict(step=0.1, min_step=0.02, max_sparsity=0.9, loss_budget=0.01),
            tried=[0.1, 0.05, 0.025],
            accepted=[False, False, False],
            chosen=0.0,
        ),
    ],
)
def test_search_back_off_sequence(model, monkeypatch, case):
    """The search's step logic alone: perplexity is a fixed function of the sparsity tried, so the sequence of
    tried sparsities is known exactly."""
    seen = []
    monkeypatch.setattr(search, "build_spec", lambda model, cal, method, s, scope, ablation, seed=0: FakeSpec(s))
    monkeypatch.setattr(search, "simulation_hooks", lambda spec: [("sparsity", spec.sparsity)])

    def window_nll(model, wins, hooks=(), bf16=False, progress=False):
        s = hooks[0][1] if hooks else 0.0
        seen.append(s)
        return math.log(case["ppl"](s)) * 1000, 1000

    monkeypatch.setattr(search, "window_nll", window_nll)

    class Cal:
        record = {}

    kwargs = {"loss_budget": 0.05, **case["kwargs"]}
    res = search.search_pruning(model, method="wanda", eval_texts=EVAL, window=WINDOW, calibration=Cal(), **kwargs)
    assert seen == [0.0] + case["tried"]  # the dense model once, then each trial exactly once
    assert res.steps.sparsity.tolist() == pytest.approx(case["tried"], abs=1e-12)
    assert res.steps.accepted.tolist() == case["accepted"]
    assert res.sparsity == pytest.approx(case["chosen"], abs=1e-12)
    assert res.dense_perplexity == pytest.approx(case["ppl"](0.0), rel=1e-12)
    assert res.perplexity == pytest.approx(case["ppl"](case["chosen"]), rel=1e-12)


def test_bad_input(model, cal):
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        curves.prune_curve(model, sparsities=[1.0], calibration=cal)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        curves.prune_curve(model, sparsities=[-0.1], calibration=cal)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        curves.prune_curve(model, sparsities=[10**400], calibration=cal)  # no float: not OverflowError
    with pytest.raises(ValueError, match="valid methods are magnitude"):
        curves.prune_curve(model, methods=["snip"], calibration=cal)
    with pytest.raises(ValueError, match="> 0"):
        search.search_pruning(model, loss_budget=0.0, calibration=cal)
    with pytest.raises(ValueError, match="> 0"):
        search.search_pruning(model, loss_budget=-(10**400), calibration=cal)
    with pytest.raises(ValueError, match=r"min_step must be in \(0, step\]"):
        search.search_pruning(model, step=0.05, min_step=0.1, calibration=cal)
    with pytest.raises(ValueError, match="valid scopes"):
        curves.prune_curve(model, scope="row", calibration=cal)
    with pytest.raises(ValueError, match=r"window must be an integer in \[2, 128\]"):
        evaluation.evaluate_perplexity(model, EVAL, window=129)


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


@pytest.fixture(scope="module")
def long_ctx_dir(tmp_path_factory):
    """A tiny GPT-2 with a 1024-token context, so that the default protocol's 512-token windows and the Lee
    calibration articles fit."""
    return save_tiny(tmp_path_factory.mktemp("tiny-gpt2-1024"), "gpt2", n_positions=1024)


def test_curve_command_writes_the_measured_table(long_ctx_dir, tmp_path):
    """``neuronscope-tl curve``: curve.csv, curve_runs.csv and curve_domains.csv hold the numbers prune_curve
    measures with the same settings (read back and compared), protocol.json its protocol and recommendation,
    curve.png a PNG. Calibration: the default mix; evaluation: the user's NAME=FILE set."""
    from neuronscope_tl import cli, pipelines
    from neuronscope_tl.domains import user_set

    out = tmp_path / "curve"
    mine = tmp_path / "mine.txt"
    mine.write_text("\n".join(ns.lee_articles()[250:252]))
    argv = [
        "curve",
        "--model",
        long_ctx_dir,
        "--out",
        str(out),
        "--methods",
        "wanda,random",
        "--sparsities",
        "0.1,0.3",
        "--ablations",
        "zero",
        "--calib-tokens",
        "300",
        "--precision",
        "fp32",
        "--no-domains",
        "--eval-texts",
        f"mine={mine}",
    ]
    assert cli.main(argv) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "curve.csv",
        "curve.png",
        "curve_domains.csv",
        "curve_runs.csv",
        "protocol.json",
        "report.html",
    ]
    model = ns.load_model(long_ctx_dir)
    calib, _ = pipelines.calibration_texts_for(None)
    sets = [user_set(f"mine={mine}")]
    sets[0].in_domain = False
    expected = curves.prune_curve(
        model,
        ["wanda", "random"],
        [0.1, 0.3],
        ablation="zero",
        calib_texts=calib,
        calib_tokens=300,
        precision="fp32",
        domains=sets,
    )
    table, runs = pd.read_csv(out / "curve.csv"), pd.read_csv(out / "curve_runs.csv")
    assert list(table.columns) == list(expected.table.columns) and list(runs.columns) == list(expected.runs.columns)
    assert len(table) == 4 and len(runs) == 2 + 2 * 3
    # same computation, same machine: the CSV holds the measured numbers exactly (floats round-trip through CSV)
    pd.testing.assert_frame_equal(table, expected.table, check_exact=True, check_dtype=False)
    pd.testing.assert_frame_equal(runs, expected.runs, check_exact=True, check_dtype=False)
    domains_csv = pd.read_csv(out / "curve_domains.csv")
    pd.testing.assert_frame_equal(domains_csv, expected.domains, check_exact=True, check_dtype=False)
    doc = json.loads((out / "protocol.json").read_text())
    assert doc["recommended"] == expected.recommended == {"method": "wanda", "ablation": "zero", "chosen_on": "out_of_domain"}
    assert doc["dense_perplexity"] == expected.dense_perplexity
    assert doc["protocol"]["weights_sha256"] == expected.protocol["weights_sha256"]
    assert (out / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_curve_over_domains_matches_hf_labels_loss(model, tiny_dirs, kind, cal):
    """Each evaluation set is measured separately: dense and pruned perplexity of every set equal exp of HF's own
    ``labels=`` loss on the same windows (pruned: the neurons zeroed in the HF weights), and the summaries are the
    geometric means of those ratios."""
    from neuronscope_tl.domains import TextSet

    sets = [
        TextSet("near", list(ns.lee_articles()[201:203]), "lee", "LGPL", "evaluation", True),
        TextSet("far", [" ".join(ns.lee_articles()[5].split()[::-1])], "reversed lee", "LGPL", "user", False),
    ]
    res = curves.prune_curve(
        model,
        ["wanda"],
        [0.25],
        ablation="zero",
        domains=sets,
        window=WINDOW,
        calibration=cal,
        precision="fp32",
        domain_windows_max=3,
    )
    dws = evaluation.domain_windows(model, sets, WINDOW, 3)
    assert [len(d.wins.tokens) for d in dws] == [3, min(3, len(dws[1].wins.tokens))]
    neurons = selection.select_neurons(model, cal, "wanda", 0.25, "per_layer")
    dense_hf, pruned_hf = load_hf(tiny_dirs[kind]), load_hf(tiny_dirs[kind])
    for layer, chosen in neurons.items():
        zero_output_weights(pruned_hf, layer, chosen)

    ratios = {}
    for d in dws:
        row = res.domains[(res.domains.domain == d.name) & (res.domains.sparsity == 0.25)].iloc[0]
        (dense, dense_logits), (pruned, pruned_logits) = (
            hf_perplexity(dense_hf, d.wins.tokens),
            hf_perplexity(pruned_hf, d.wins.tokens),
        )
        eta = 2 * fp32_forward_error(dense_hf, d.wins.tokens)
        assert abs(row.dense / dense - 1) <= perplexity_tolerance(dense_logits, d.wins.tokens, eta)
        assert abs(row.perplexity / pruned - 1) <= perplexity_tolerance(pruned_logits, d.wins.tokens, eta)
        assert bool(row.in_domain) == d.in_domain
        ratios[d.name] = row.perplexity / row.dense
    summary = res.table.iloc[0]
    assert summary.ratio_in_domain == pytest.approx(ratios["near"], rel=1e-12)
    assert summary.ratio_out_of_domain == pytest.approx(ratios["far"], rel=1e-12)
    assert summary.ratio == pytest.approx(math.sqrt(ratios["near"] * ratios["far"]), rel=1e-9)
    assert [r["name"] for r in res.protocol["domains"]] == ["near", "far"]
    assert all({"source", "licence", "n_tokens", "sha256"} <= set(r) for r in res.protocol["domains"])
    assert res.recommended["chosen_on"] == "out_of_domain"
    with pytest.raises(ValueError, match="near given more than once"):
        curves.prune_curve(model, ["wanda"], [0.25], domains=sets + sets[:1], window=WINDOW, calibration=cal)
