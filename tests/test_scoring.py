"""One-pass scoring: every column checked against a computation done another way, shard merging, top contexts,
gradients only on activations, fault safety, validation and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats
import torch

import neuronscope_tl as ns
from neuronscope_tl import engine, hooks, scoring
from neuronscope_tl.activations import DEFAULT_ACTIVE_THRESHOLD
from neuronscope_tl.texts import tokenize

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
    """Per-neuron input and output weight norms read straight from the HF modules: [L, d_mlp] each."""
    hf = model.original_model
    if hasattr(hf, "transformer"):  # GPT-2 Conv1D: weight [in, out]
        w_in = torch.stack([b.mlp.c_fc.weight.detach().norm(dim=0) for b in hf.transformer.h])
        w_out = torch.stack([b.mlp.c_proj.weight.detach().norm(dim=1) for b in hf.transformer.h])
    else:  # Linear: weight [out, in]
        w_in = torch.stack([l.mlp.up_proj.weight.detach().norm(dim=1) for l in hf.model.layers])
        w_out = torch.stack([l.mlp.down_proj.weight.detach().norm(dim=0) for l in hf.model.layers])
    return w_in.numpy(), w_out.numpy()


def manual_activations(model, texts):
    """{layer: [n_tokens, d_mlp]} over all texts, one run_with_cache per text."""
    out = {}
    for ids in tokenize(model, texts):
        with torch.no_grad():
            _, cache = model.run_with_cache(ids[None], names_filter=hooks.is_mlp_post)
        for name, act in cache.items():
            out.setdefault(hooks.layer_of(name), []).append(act[0].double().numpy())
    return {l: np.concatenate(a) for l, a in out.items()}


def test_columns_match_manual_numpy(tiny_model):
    table = scoring.score_neurons(tiny_model, TEXTS, batch_size=2)
    info = ns.mlp_info(tiny_model)
    assert list(table.columns) == list(scoring.SCORE_COLUMNS)
    assert len(table) == info.n_layers * info.d_mlp
    assert table["label"].iloc[info.d_mlp + 3] == "L1N3"
    acts = manual_activations(tiny_model, TEXTS)
    w_in, w_out = hf_weight_norms(tiny_model)
    for layer, a in acts.items():
        rows = table[table["layer"] == layer]
        rms = np.sqrt((a**2).mean(0))
        np.testing.assert_allclose(rows["mean"], a.mean(0), rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(rows["mean_abs"], np.abs(a).mean(0), rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(rows["var"], a.var(0), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(rows["rms"], rms, rtol=1e-6)
        np.testing.assert_allclose(rows["max"], a.max(0), rtol=1e-6)
        np.testing.assert_allclose(rows["frac_active"], (np.abs(a) > DEFAULT_ACTIVE_THRESHOLD).mean(0))
        np.testing.assert_allclose(rows["w_in_norm"], w_in[layer], rtol=1e-5)
        np.testing.assert_allclose(rows["w_out_norm"], w_out[layer], rtol=1e-5)
        np.testing.assert_allclose(rows["wanda"], w_out[layer] * rms, rtol=1e-5)
        np.testing.assert_allclose(rows["fluctuation"], a.var(0) * w_out[layer] ** 2, rtol=1e-4, atol=1e-7)


def direct_taylor(model, texts, layer, neuron, target):
    """d/ds at s=0 of the mean loss when the activation is moved to a + s * (target - a), by autograd on s."""
    s = torch.zeros((), requires_grad=True)
    total, count = 0.0, 0
    for ids in tokenize(model, texts):
        def hook(act, hook=None):
            act = act.clone()
            act[..., neuron] = act[..., neuron] + s * (target - act[..., neuron])
            return act

        logits = model.run_with_hooks(ids[None], fwd_hooks=[(hooks.mlp_post_name(layer), hook)])
        total = total + ns.metrics.token_nll(logits, ids[None]).sum()
        count += ids.numel() - 1
    (grad,) = torch.autograd.grad(total / count, [s])
    return float(grad)


def test_taylor_matches_autograd_on_direct_computation(tiny_model):
    table = scoring.score_neurons(tiny_model, TEXTS, batch_size=3)
    d_mlp = ns.mlp_info(tiny_model).d_mlp
    for layer, neuron in [(0, 2), (1, 7), (2, 11)]:
        row = table.iloc[layer * d_mlp + neuron]
        assert row["taylor_zero"] == pytest.approx(direct_taylor(tiny_model, TEXTS, layer, neuron, 0.0), rel=1e-3, abs=1e-7)
        mu = float(row["mean"])
        assert row["taylor_mean"] == pytest.approx(direct_taylor(tiny_model, TEXTS, layer, neuron, mu), rel=1e-3, abs=1e-7)
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
    assert ctx["activation"].iloc[0] == pytest.approx(result.table.iloc[layer * ns.mlp_info(tiny_model).d_mlp + neuron]["max"], rel=1e-6)
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
        assert v.spearman_candidates[score] == pytest.approx(scipy.stats.spearmanr(sub[score], sub["loss_change"]).statistic, abs=1e-9)
        rnd = m[m["random"]]
        assert v.spearman_random[score] == pytest.approx(scipy.stats.spearmanr(rnd[score], rnd["loss_change"]).statistic, abs=1e-9)
    row = m.iloc[0]
    exact = ns.simulate_pruning(tiny_model, int(row["layer"]), [int(row["neuron"])], TEXTS[:2])
    assert row["loss_change"] == pytest.approx(exact.loss_change, abs=1e-6)
    assert row["kl"] == pytest.approx(exact.impact_score, abs=1e-6)


@pytest.mark.parametrize("tiny_kind", ["llama"])
def test_validate_without_table_scores_the_ablated_tokens(tiny_model):
    """table=None scores exactly the validation tokens; on the same tokens the first-order estimate tracks the truth."""
    v = scoring.validate_scores(tiny_model, None, TEXTS[:2], n=8, scores=["taylor_zero"], max_tokens=None)
    same = scoring.validate_scores(tiny_model, scoring.score_neurons(tiny_model, TEXTS[:2]), TEXTS[:2], n=8, scores=["taylor_zero"], max_tokens=None)
    assert v.spearman_random == pytest.approx(same.spearman_random)
    pd_cols = ["label", "taylor_zero", "loss_change"]
    assert v.measured[pd_cols].equals(same.measured[pd_cols])


def test_score_cli_writes_table_and_validation(tiny_dirs, tmp_path, capsys):
    import json

    import pandas as pd

    from neuronscope_tl import cli

    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(TEXTS), encoding="utf-8")
    out = tmp_path / "out"
    argv = ["score", "--model", tiny_dirs["llama"], "--texts", str(texts), "--out", str(out), "--validate-n", "5", "--scores", "wanda,taylor_zero"]
    name, cfg = cli.parse_args(argv)
    assert name == "score" and cfg.validate_n == 5
    assert cli.main(argv) == 0
    table = pd.read_csv(out / "scores.csv")
    assert list(table.columns) == list(scoring.SCORE_COLUMNS)
    doc = json.loads((out / "validation.json").read_text())
    measured = pd.read_csv(out / "validation_measured.csv")
    rnd = measured[measured["random"]]
    assert doc["result"]["spearman_random"]["wanda"] == pytest.approx(scipy.stats.spearmanr(rnd["wanda"], rnd["loss_change"]).statistic, abs=1e-9)
    printed = capsys.readouterr().out
    assert f"{doc['result']['spearman_candidates']['taylor_zero']:.3f}" in printed
    assert cli.main(["score", "--out", str(out), "--scores", "bogus", "--model", tiny_dirs["llama"], "--texts", str(texts)]) == 2
    with pytest.raises(ValueError, match="batch_size"):
        cli.parse_args(["score", "--batch-size", "0"])
