"""One-pass scoring: every column checked against a computation done another way, shard merging, top contexts,
gradients only on activations, fault safety, validation and bad input."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import scipy.stats
import torch

import neuronscope_tl as ns
from neuronscope_tl import cli, engine, hooks, models, scoring
from neuronscope_tl.activations import DEFAULT_ACTIVE_THRESHOLD
from neuronscope_tl.texts import tokenize

from conftest import (
    FP32_EPS,
    hf_logits,
    load_hf,
    logit_noise,
    nll64,
    single_and_padded_activations,
    stat_tolerances,
    zero_output_weights,
)

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Neural networks learn representations of language from large corpora.",
    "The news agency said on Monday that fires were still burning.",
    "Prices rose sharply.",
]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on a shared, loaded 2-core machine two OpenMP threads can make
    each tiny matmul 100x slower (barrier waits); the default-model test keeps the session's setting."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def hf_weight_norms(model):
    """Per-neuron input and output weight norms read straight from the HF modules, in float64: [L, d_mlp] each."""
    hf = model.original_model
    if hasattr(hf, "transformer"):  # GPT-2 Conv1D: weight [in, out]
        w_in = torch.stack([b.mlp.c_fc.weight.detach().double().norm(dim=0) for b in hf.transformer.h])
        w_out = torch.stack([b.mlp.c_proj.weight.detach().double().norm(dim=1) for b in hf.transformer.h])
    else:  # Linear: weight [out, in]
        w_in = torch.stack([l.mlp.up_proj.weight.detach().double().norm(dim=1) for l in hf.model.layers])
        w_out = torch.stack([l.mlp.down_proj.weight.detach().double().norm(dim=0) for l in hf.model.layers])
    return w_in.numpy(), w_out.numpy()


def assert_within(got, expected, atol, what):
    """|got - expected| <= atol elementwise (atol may be per neuron); reports the worst excess."""
    got, expected = np.asarray(got, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    excess = np.abs(got - expected) - np.broadcast_to(atol, got.shape)
    worst = int(excess.argmax())
    assert excess.max() <= 0, (what, worst, got[worst], expected[worst], np.broadcast_to(atol, got.shape)[worst])


def test_columns_match_manual_numpy(tiny_model):
    """Every column against numpy over activations cached one text at a time. The pass batches two right-padded
    texts, which may change fp32 activations by rounding: that difference (eta) is measured and bounds each
    statistic (conftest.stat_tolerances); weight norms in fp32 are within (d_model + 2) eps of float64."""
    table = scoring.score_neurons(tiny_model, TEXTS, batch_size=2)
    info = ns.mlp_info(tiny_model)
    assert list(table.columns) == list(scoring.SCORE_COLUMNS)
    assert len(table) == info.n_layers * info.d_mlp
    assert table["label"].iloc[info.d_mlp + 3] == "L1N3"
    single, padded = single_and_padded_activations(tiny_model, tokenize(tiny_model, TEXTS), 2)
    w_in, w_out = hf_weight_norms(tiny_model)
    rel_norm = (info.d_model + 2) * FP32_EPS
    for layer, act in single.items():
        eta = logit_noise(act, padded[layer])
        tol = {k: np.asarray(v) for k, v in stat_tolerances(act, eta, DEFAULT_ACTIVE_THRESHOLD).items()}
        a = act.numpy()
        rows = table[table["layer"] == layer]
        rms, var = np.sqrt((a**2).mean(0)), a.var(0)
        assert_within(rows["mean"], a.mean(0), tol["mean"], "mean")
        assert_within(rows["mean_abs"], np.abs(a).mean(0), tol["mean_abs"], "mean_abs")
        assert_within(rows["var"], var, tol["var"], "var")
        assert_within(rows["rms"], rms, tol["rms"], "rms")
        assert_within(rows["max"], a.max(0), tol["max"], "max")
        assert (
            np.abs(rows["frac_active"].to_numpy() - (np.abs(a) > DEFAULT_ACTIVE_THRESHOLD).mean(0)) <= tol["frac_active"]
        ).all()
        assert_within(rows["w_in_norm"], w_in[layer], rel_norm * w_in[layer], "w_in_norm")
        assert_within(rows["w_out_norm"], w_out[layer], rel_norm * w_out[layer], "w_out_norm")
        wo = w_out[layer]
        assert_within(rows["wanda"], wo * rms, wo * tol["rms"] + rms * wo * rel_norm * 1.01, "wanda")
        assert_within(rows["fluctuation"], var * wo**2, wo**2 * tol["var"] + var * wo**2 * 2.01 * rel_norm, "fluctuation")


def hf_taylor(hf, token_lists, layer, neuron, target):
    """d/ds at s=0 of the mean next-token loss of a plain HF model when input ``neuron`` of the layer's output
    projection moves to a + s (target - a), by autograd on s, in the model's own dtype (a torch pre-hook; no
    TransformerLens). Also returns sum_t |g_t (target - a_t)| / N, the size of the terms the derivative sums."""
    mlp = hf.transformer.h[layer].mlp if hasattr(hf, "transformer") else hf.model.layers[layer].mlp
    proj = mlp.c_proj if hasattr(mlp, "c_proj") else mlp.down_proj
    dtype = next(hf.parameters()).dtype
    s = torch.zeros((), dtype=dtype, requires_grad=True)
    moved = []

    def pre(module, args):
        x = args[0].clone()
        a = x[..., neuron].detach().clone()
        col = x[..., neuron] + s * (target - x[..., neuron])
        x = torch.cat([x[..., :neuron], col[..., None], x[..., neuron + 1 :]], dim=-1)
        moved.append((col, a))
        return (x,)

    handle = proj.register_forward_pre_hook(pre)
    total, count = 0.0, 0
    try:
        for ids in token_lists:
            lp = torch.log_softmax(hf(ids[None]).logits[0], -1)
            total = total + -lp[:-1].gather(-1, ids[1:, None]).sum()
            count += ids.numel() - 1
    finally:
        handle.remove()
    grads = torch.autograd.grad(total / count, [s] + [c for c, _ in moved])
    terms = sum(float((g * (target - a)).abs().sum()) for g, (_, a) in zip(grads[1:], moved)) / count
    return float(grads[0]), terms


def test_taylor_matches_autograd_in_float64(tiny_model, tiny_dirs, tiny_kind):
    """taylor_zero / taylor_mean against the derivative computed by autograd on a float64 copy of the plain HF
    model. Tolerance: the same derivative computed by the same route in fp32 shows the fp32 rounding of a forward
    and backward (e32, one sample of it); the library's batched route (other batch shapes, thread counts and summation
    orders) is allowed 4 e32, plus 256 eps of the summed |terms| (a bound on the summation error that does not
    depend on that one sample being typical)."""
    import copy

    table = scoring.score_neurons(tiny_model, TEXTS, batch_size=3)
    d_mlp = ns.mlp_info(tiny_model).d_mlp
    hf32 = load_hf(tiny_dirs[tiny_kind])
    hf64 = copy.deepcopy(hf32).double()
    tokens = tokenize(tiny_model, TEXTS)
    for layer, neuron in [(0, 2), (1, 7), (2, 11)]:
        row = table.iloc[layer * d_mlp + neuron]
        mu = float(row["mean"])
        for column, target in [("taylor_zero", 0.0), ("taylor_mean", mu)]:
            ref, terms = hf_taylor(hf64, tokens, layer, neuron, target)
            e32 = abs(hf_taylor(hf32, tokens, layer, neuron, target)[0] - ref)
            tol = 4 * e32 + 256 * FP32_EPS * terms
            assert abs(row[column] - ref) <= tol, (layer, neuron, column, row[column], ref, tol)
            assert abs(ref) > 10 * tol  # resolved, not lost in rounding
    assert not any(p.grad is not None for p in tiny_model.parameters())


def test_shards_merge_to_single_pass(tiny_model):
    tok = tokenize(tiny_model, TEXTS)
    # batch size 1 everywhere, so each text's fp32 forward is the same computation in both runs
    single = scoring.accumulate_scores(tiny_model, tok, top_k_contexts=3)
    merged = scoring.accumulate_scores(tiny_model, tok[:1], top_k_contexts=3)
    merged.merge(scoring.accumulate_scores(tiny_model, tok[1:3], top_k_contexts=3))
    merged.merge(scoring.accumulate_scores(tiny_model, tok[3:], top_k_contexts=3))
    a, b = single.table(tiny_model), merged.table(tiny_model)
    for col in scoring.SCORE_COLUMNS[3:]:
        np.testing.assert_allclose(a[col], b[col], rtol=1e-9, atol=1e-12, err_msg=col)
    assert merged.n_texts == single.n_texts and merged.n_targets == single.n_targets
    torch.testing.assert_close(merged.top_value, single.top_value)
    torch.testing.assert_close(merged.top_text, single.top_text)
    torch.testing.assert_close(merged.top_pos, single.top_pos)


def test_top_contexts_point_at_the_activations(tiny_model):
    result = scoring.score_pass(tiny_model, TEXTS, top_k_contexts=4)
    tok = tokenize(tiny_model, TEXTS)
    layer, neuron = 1, 5
    ctx = scoring.top_contexts(result, layer, neuron, window=2)
    assert len(ctx) == 4
    assert ctx["activation"].is_monotonic_decreasing
    assert ctx["activation"].iloc[0] == pytest.approx(
        result.table.iloc[layer * ns.mlp_info(tiny_model).d_mlp + neuron]["max"], rel=1e-6
    )
    for row in ctx.itertuples():
        ids = tok[row.text_index]
        with torch.no_grad():
            _, cache = tiny_model.run_with_cache(ids[None], names_filter=hooks.mlp_post_name(layer))
        assert float(cache[hooks.mlp_post_name(layer)][0, row.position, neuron]) == pytest.approx(row.activation, rel=1e-5)
        assert row.token == tiny_model.tokenizer.decode([int(ids[row.position])])
    with pytest.raises(ValueError, match="out of range"):
        scoring.top_contexts(result, 99, 0)


def test_pass_leaves_model_as_it_was(tiny_model):
    flags = [p.requires_grad for p in tiny_model.parameters()]
    before = hooks.hook_count(tiny_model)
    scoring.score_neurons(tiny_model, TEXTS[:2])
    assert hooks.hook_count(tiny_model) == before
    assert [p.requires_grad for p in tiny_model.parameters()] == flags
    assert all(p.grad is None for p in tiny_model.parameters())


def test_exception_inside_a_batch_leaves_no_hooks_and_no_grads(tiny_model, monkeypatch):
    flags = [p.requires_grad for p in tiny_model.parameters()]
    before = hooks.hook_count(tiny_model)

    def boom(*args, **kwargs):
        assert hooks.hook_count(tiny_model) > before  # we really are inside the batch, hooks attached
        raise RuntimeError("interrupted")

    monkeypatch.setattr(engine, "nll_from_log_probs", boom)
    with pytest.raises(RuntimeError, match="interrupted"):
        scoring.score_neurons(tiny_model, TEXTS)
    assert hooks.hook_count(tiny_model) == before
    assert [p.requires_grad for p in tiny_model.parameters()] == flags
    assert all(p.grad is None for p in tiny_model.parameters())


@pytest.mark.parametrize("tiny_kind", ["llama"])
def test_bad_input(tiny_model):
    with pytest.raises(ValueError, match="non-empty"):
        scoring.score_neurons(tiny_model, [])
    with pytest.raises(ValueError, match="batch_size"):
        scoring.score_neurons(tiny_model, TEXTS, batch_size=0)
    with pytest.raises(ValueError, match="top_k_contexts"):
        scoring.score_neurons(tiny_model, TEXTS, top_k_contexts=0)
    table = scoring.score_neurons(tiny_model, TEXTS[:1])
    with pytest.raises(ValueError, match="unknown score"):
        scoring.validate_scores(tiny_model, table, TEXTS, n=5, scores=["nope"])
    with pytest.raises(ValueError, match="unknown ablation"):
        scoring.validate_scores(tiny_model, table, TEXTS, n=5, ablation="half")
    with pytest.raises(ValueError, match="n must be"):
        scoring.validate_scores(tiny_model, table, TEXTS, n=1)


def test_spearman_matches_scipy():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 5, 50).astype(float)  # many ties
    y = x + rng.normal(size=50)
    assert scoring.spearman(x, y) == pytest.approx(scipy.stats.spearmanr(x, y).statistic, abs=1e-12)
    np.testing.assert_allclose(scoring.rank_average(torch.tensor(x)).numpy(), scipy.stats.rankdata(x))
    assert np.isnan(scoring.spearman(np.ones(5), np.arange(5)))


@pytest.mark.parametrize("tiny_kind", ["gpt2"])
def test_validate_scores_against_simulate_pruning_and_scipy(tiny_model):
    table = scoring.score_neurons(tiny_model, TEXTS)
    v = scoring.validate_scores(tiny_model, table, TEXTS[:2], n=6, scores=["wanda", "taylor_zero"], max_tokens=None)
    m = v.measured
    assert m["random"].sum() == 6
    for score in ("wanda", "taylor_zero"):
        cand = table.nsmallest(6, score, keep="first")["label"]
        sub = m[m["label"].isin(cand)]
        assert len(sub) == 6
        assert v.spearman_candidates[score] == pytest.approx(
            scipy.stats.spearmanr(sub[score], sub["loss_change"]).statistic, abs=1e-9
        )
        rnd = m[m["random"]]
        assert v.spearman_random[score] == pytest.approx(
            scipy.stats.spearmanr(rnd[score], rnd["loss_change"]).statistic, abs=1e-9
        )
    row = m.iloc[0]
    exact = ns.simulate_pruning(tiny_model, int(row["layer"]), [int(row["neuron"])], TEXTS[:2])
    assert row["loss_change"] == pytest.approx(exact.loss_change, abs=1e-6)
    assert row["kl"] == pytest.approx(exact.impact_score, abs=1e-6)


def test_validate_without_table_scores_the_ablated_tokens(tiny_model, tiny_dirs, tiny_kind):
    """table=None scores exactly the validation tokens, and on the same tokens the first-order estimate tracks the
    truth: over 24 random neurons, taylor_zero's Spearman correlation with the loss change measured independently
    (plain HF models with each neuron's output weights zeroed, NLL in float64) is at least 0.9.

    Measured 0.98-0.99 on both tiny models; a score with the wrong sign gives about -0.98, and the magnitude scores
    (wanda, rms), which do not estimate the loss change, stay below 0.4 in absolute value here."""
    v = scoring.validate_scores(tiny_model, None, TEXTS[:2], n=24, scores=["taylor_zero"], max_tokens=None)
    same = scoring.validate_scores(
        tiny_model, scoring.score_neurons(tiny_model, TEXTS[:2]), TEXTS[:2], n=24, scores=["taylor_zero"], max_tokens=None
    )
    assert v.spearman_random == pytest.approx(same.spearman_random, abs=1e-12)
    pd_cols = ["label", "taylor_zero", "loss_change"]
    assert v.measured[pd_cols].equals(same.measured[pd_cols])
    rnd = v.measured[v.measured["random"]]
    assert len(rnd) == 24
    tokens = tokenize(tiny_model, TEXTS[:2])
    clean_hf = load_hf(tiny_dirs[tiny_kind])
    clean = [nll64(hf_logits(clean_hf, t), t) for t in tokens]
    truth = []
    for layer, neuron in zip(rnd["layer"], rnd["neuron"]):
        hf = zero_output_weights(load_hf(tiny_dirs[tiny_kind]), int(layer), [int(neuron)])
        truth.append(float(torch.cat([nll64(hf_logits(hf, t), t) - c for t, c in zip(tokens, clean)]).mean()))
    rho = scipy.stats.spearmanr(rnd["taylor_zero"], truth).statistic
    assert rho >= 0.9, rho
    assert v.spearman_random["taylor_zero"] == pytest.approx(
        scipy.stats.spearmanr(rnd["taylor_zero"], rnd["loss_change"]).statistic, abs=1e-9
    )


def test_score_cli_writes_table_and_validation(tiny_dirs, tmp_path, capsys):
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(TEXTS), encoding="utf-8")
    out = tmp_path / "out"
    argv = [
        "score",
        "--model",
        tiny_dirs["llama"],
        "--calib-texts",
        str(texts),
        "--out",
        str(out),
        "--validate-n",
        "5",
        "--scores",
        "wanda,taylor_zero",
    ]
    name, cfg = cli.parse_args(argv)
    assert name == "score" and cfg.validate_n == 5
    assert cli.main(argv) == 0
    table = pd.read_csv(out / "scores.csv")
    assert list(table.columns) == list(scoring.SCORE_COLUMNS)
    doc = json.loads((out / "validation.json").read_text())
    measured = pd.read_csv(out / "validation_measured.csv")
    rnd = measured[measured["random"]]
    assert doc["result"]["spearman_random"]["wanda"] == pytest.approx(
        scipy.stats.spearmanr(rnd["wanda"], rnd["loss_change"]).statistic, abs=1e-9
    )
    printed = capsys.readouterr().out
    assert f"{doc['result']['spearman_candidates']['taylor_zero']:.3f}" in printed
    assert (
        cli.main(["score", "--out", str(out), "--scores", "bogus", "--model", tiny_dirs["llama"], "--calib-texts", str(texts)])
        == 2
    )
    with pytest.raises(ValueError, match="batch_size"):
        cli.parse_args(["score", "--batch-size", "0"])


def test_score_cli_validates_on_each_eval_set(tiny_dirs, tmp_path, capsys):
    """--eval-texts NAME=FILE: the calibration's lowest-scored neurons are measured on the set's own texts (equal to
    the hook simulation run there), the set's Spearman correlations are those of its rows, and bad sets fail
    before anything is written."""
    calib, other = tmp_path / "calib.txt", tmp_path / "other.txt"
    calib.write_text("\n".join(TEXTS[:2]), encoding="utf-8")
    other_texts = ["Rain is expected across the north on Tuesday.", "She sold the house and moved to the coast."]
    other.write_text("\n".join(other_texts), encoding="utf-8")
    out = tmp_path / "out"
    base = [
        "score",
        "--model",
        tiny_dirs["llama"],
        "--calib-texts",
        str(calib),
        "--out",
        str(out),
        "--validate-n",
        "4",
        "--scores",
        "wanda,taylor_zero",
        "--top-k-contexts",
        "2",
    ]
    assert cli.main(base + ["--eval-texts", f"other={other}"]) == 0
    table = pd.read_csv(out / "scores.csv")
    measured = pd.read_csv(out / "validation_measured.csv")
    assert set(measured["set"]) == {"calibration", "other"}
    on_other = measured[measured["set"] == "other"]
    lowest = table.nsmallest(4, "wanda", keep="first")[["layer", "neuron"]].apply(tuple, axis=1).tolist()
    assert set(lowest) <= set(on_other[["layer", "neuron"]].apply(tuple, axis=1))
    model = models.load_model(tiny_dirs["llama"])
    for _, row in on_other.head(3).iterrows():
        exact = ns.simulate_pruning(model, int(row["layer"]), [int(row["neuron"])], other_texts)
        assert row["loss_change"] == pytest.approx(exact.loss_change, abs=1e-6)
    doc = json.loads((out / "validation.json").read_text())["result"]
    rnd = on_other[on_other["random"]]
    assert doc["sets"]["other"]["spearman_random"]["taylor_zero"] == pytest.approx(
        scipy.stats.spearmanr(rnd["taylor_zero"], rnd["loss_change"]).statistic, abs=1e-9
    )
    assert [r["name"] for r in doc["sets_record"]] == ["other"]
    capsys.readouterr()
    for bad, message in (
        (["--eval-texts", f"other={tmp_path / 'missing.txt'}"], "cannot read text file"),
        (["--eval-texts", f"other={other}", "--eval-texts", f"other={calib}"], "other given more than once"),
        (["--eval-texts", f"other={other}", "--validate-n", "0"], "need --validate-n >= 2"),
        (["--eval-texts", f"calibration={other}"], "'calibration' is the calibration texts' own validation"),
    ):
        fresh = tmp_path / "never"
        assert cli.main(base[:-8] + ["--out", str(fresh)] + bad) == 2
        assert message in capsys.readouterr().err, bad
        assert not fresh.exists()


@pytest.mark.parametrize("values", ["continuous", "tied"])
def test_top_contexts_are_the_k_largest_by_value_then_text_then_position(values):
    """The kept top-k equal a plain Python sort by (-value, text, position) over everything streamed, whatever the
    batches' order; with values drawn from 4 levels most neurons tie at their k-th value (the full-sort path)."""
    gen = torch.Generator().manual_seed(0)
    d, k = 6, 3
    acc = scoring.ScoreAccumulator(1, d, top_k=k)
    rows = []
    for text in torch.randperm(7, generator=gen).tolist():
        n = int(torch.randint(1, 5, (1,), generator=gen))
        val = torch.randn(n, d, generator=gen)
        if values == "tied":
            val = val.round().clamp(-1, 2)
        pos = torch.arange(n)
        acc.update(0, val, torch.zeros(n, d), torch.full((n,), text), pos)
        rows += [(val[i], text, i) for i in range(n)]
    for j in range(d):
        expected = sorted(((-float(v[j]), t, p) for v, t, p in rows))[:k]
        got = [(-float(acc.top_value[0, r, j]), int(acc.top_text[0, r, j]), int(acc.top_pos[0, r, j])) for r in range(k)]
        assert got == expected, j
