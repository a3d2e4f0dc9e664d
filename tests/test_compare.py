"""compare_models on every model kind (tiny models): the dense perplexity, each layer's sensitivity, the importance
distribution and the peak activations against independent computations on the plain reference model (weights
edited, float64 metrics; TransformerLens's own run_with_cache for activations); the table, files and plot; the
command; bad input."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

import neuronscope_tl as ns
from neuronscope_tl import cli, compare, selection, surgery
from neuronscope_tl.arch import output_matrix
from neuronscope_tl.evaluation import eval_windows, window_nll
from neuronscope_tl.metrics import perplexity
from neuronscope_tl.texts import calibration_tokens

from conftest import nll64, nll_tolerance, logit_noise

pytestmark = pytest.mark.usefixtures("one_torch_thread")

EVAL = ns.lee_articles()[200:203]
CALIB = ns.lee_articles()[:2]
KW = dict(
    calib_texts=CALIB,
    methods=["wanda", "random"],
    sparsities=[0.25],
    ablation="zero",
    layer_sparsity=0.5,
    eval_tokens=120,
    calib_tokens=128,
    window=32,
)


def reference_log_ppl(km, ref, wins, eta):
    """log perplexity of the reference over the windows, in float64, and its fp32 tolerance."""
    total, count, tol = 0.0, 0, 0.0
    for w in wins.tokens:
        logits = km.logits(ref, w)
        total += float(nll64(logits, w).sum())
        tol += float(nll_tolerance(logits, w, eta, runs=2).sum())
        count += int(w.numel()) - 1
    return total / count, tol / count


def test_compare_numbers_equal_independent_computations(kind_model):
    km, model = kind_model, kind_model.model
    comp = compare.compare_models([model], EVAL, **KW)
    r = comp.models[0]
    info = ns.mlp_info(model)
    wins = eval_windows(model, EVAL, r.window, r.every)
    assert r.n_eval_tokens == sum(int(w.numel()) - 1 for w in wins.tokens) >= 1
    with torch.no_grad():
        eta = max(logit_noise(model(w[None])[0], km.logits(km.reference(), w)) for w in wins.tokens)
    dense_log, tol = reference_log_ppl(km, km.reference(), wins, eta)
    assert abs(math.log(r.dense_perplexity) - dense_log) <= tol

    # importance = RMS activation x ||W_out row|| over the calibration tokens, from TransformerLens's own cache
    toks = calibration_tokens(model, CALIB, 128)
    acts = {l: [] for l in range(info.n_layers)}
    for ids in toks:
        _, cache = model.run_with_cache(ids[None], names_filter=lambda n: n.endswith("mlp.hook_post"))
        for l in range(info.n_layers):
            acts[l].append(cache[f"blocks.{l}.mlp.hook_post"][0].double())
    a = {l: torch.cat(v) for l, v in acts.items()}
    w_norm = output_matrix(model).double().norm(dim=2)
    want = torch.stack([a[l].square().mean(0).sqrt() * w_norm[l] for l in range(info.n_layers)]).reshape(-1)
    got = r.importance.sort_values(["layer", "neuron"])["importance"].to_numpy()
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(r.importance["relative"], r.importance["importance"] / np.median(got), rtol=1e-12)

    # peak |activation| and the outlier rule
    peak = torch.stack([a[l].abs().amax(0) for l in range(info.n_layers)])
    np.testing.assert_allclose(
        r.peaks.sort_values(["layer", "neuron"])["peak_abs"].to_numpy(), peak.reshape(-1).numpy(), rtol=1e-6
    )
    ratio = peak / peak.median()
    assert set(zip(r.outliers["layer"], r.outliers["neuron"])) == {tuple(x) for x in (ratio >= 100).nonzero().tolist()}

    # each layer's sensitivity: its lowest-importance half zeroed in the reference's weights
    k = int(round(0.5 * info.d_mlp))
    for row in r.sensitivity.itertuples():
        layer = int(row.layer)
        assert row.relative_depth == layer / (info.n_layers - 1) and row.n_pruned == k
        imp = torch.tensor(r.importance[r.importance["layer"] == layer].sort_values("neuron")["importance"].to_numpy())
        chosen = sorted(imp.argsort(stable=True)[:k].tolist())
        pruned_log, ptol = reference_log_ppl(km, km.zero(km.reference(), layer, chosen), wins, eta)
        assert abs(math.log(row.ratio) - (pruned_log - dense_log)) <= ptol + tol, layer
    assert r.winner["method"] == "wanda"  # the only non-random method


def test_table_files_and_plot(tiny_dirs, tmp_path):
    comp = compare.compare_models([tiny_dirs["llama"], tiny_dirs["gpt2"]], EVAL, **KW)
    table = compare.comparison_table(comp)
    assert list(table["kind"]) == ["llama", "gpt2"] and list(table["n_layers"]) == [3, 3]
    for i, r in enumerate(comp.models):
        at = r.curve.set_index("method")["ratio"]
        assert table.iloc[i]["winner_x0.25"] == at["wanda"] and table.iloc[i]["random_x0.25"] == at["random"]
        assert table.iloc[i]["most_sensitive_ratio"] == r.sensitivity["ratio"].max()
    paths = compare.write_comparison(comp, tmp_path / "cmp")
    assert {p.name for p in paths} == {
        "compare_table.csv",
        "compare_curves.csv",
        "compare_sensitivity.csv",
        "compare_outliers.csv",
        "compare_result.json",
        "compare.png",
    }
    back = pd.read_csv(tmp_path / "cmp" / "compare_table.csv")
    np.testing.assert_allclose(back["dense_ppl"], table["dense_ppl"], rtol=1e-12)
    assert (tmp_path / "cmp" / "compare.png").stat().st_size > 10_000


def test_compare_command(tiny_dirs, tmp_path):
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(t[:600] for t in EVAL) + "\n")
    rc = cli.main(
        [
            "compare",
            "--models",
            f"{tiny_dirs['llama']},{tiny_dirs['gpt2']}",
            "--texts",
            str(texts),
            "--out",
            str(tmp_path / "out"),
            "--methods",
            "wanda,random",
            "--sparsities",
            "0.25",
            "--eval-tokens",
            "120",
            "--calib-tokens",
            "128",
            "--ablation",
            "zero",
        ]
    )
    assert rc == 0
    assert len(pd.read_csv(tmp_path / "out" / "compare_table.csv")) == 2


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(models=[]), "models must be a non-empty list"),
        (dict(models="default"), "models must be a non-empty list"),
        (dict(models=["x"], layer_sparsity=1.0), r"layer_sparsity must be a number in \(0, 1\)"),
        (dict(models=["x"], layer_sparsity=0), r"layer_sparsity must be a number in \(0, 1\)"),
        (dict(models=["x"], outlier_factor=0.5), "outlier_factor must be a finite number >= 1"),
        (dict(models=["x"], outlier_factor=float("inf")), "outlier_factor must be a finite number >= 1"),
        (dict(models=["x"], eval_tokens=0), "eval_tokens must be an integer >= 1"),
    ],
)
def test_bad_input_is_refused_before_loading(kwargs, match):
    with pytest.raises(ValueError, match=match):
        compare.compare_models(**kwargs)


def test_relative_depth():
    assert [compare.relative_depth(l, 5) for l in range(5)] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert compare.relative_depth(0, 1) == 0.0


def test_a_method_that_needs_gram_matrices_compares(tiny_dirs):
    """obs selects from the calibration Gram matrices, so the comparison's calibration collects them; its curve
    point equals the same selection evaluated directly."""
    model = ns.load_model(tiny_dirs["llama"])
    comp = compare.compare_models([model], EVAL, **{**KW, "methods": ["obs"]})
    point = comp.models[0].curve.set_index("method").loc["obs"]
    cal = selection.calibrate(model, CALIB, KW["calib_tokens"], with_grams=True, with_gradients=False)
    spec = selection.build_spec(model, cal, "obs", 0.25, "per_layer", KW["ablation"])
    r = comp.models[0]
    wins = eval_windows(model, EVAL, r.window, r.every)
    expected = perplexity(*window_nll(model, wins, surgery.simulation_hooks(spec)))
    assert point["perplexity"] == pytest.approx(expected, rel=1e-9)
