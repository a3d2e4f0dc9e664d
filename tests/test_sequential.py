"""Sequential calibration and the held-out refit damping, checked against computations done another way: Gram
matrices re-collected on the full model with the earlier layers pruned through hooks, and refit errors measured on
raw activations instead of Gram matrices."""

from __future__ import annotations

import pytest
import torch

import neuronscope_tl as ns
from neuronscope_tl import engine, obs, scores, selection, sequential, surgery
from neuronscope_tl.activations import GramAccumulator
from neuronscope_tl.hooks import attached_hooks, hook_count

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _windows(model, n_tokens=1024, window=32):
    texts = list(ns.lee_articles()[:40])
    return sequential.calibration_windows(model, {"a": texts[:20], "b": texts[20:]}, n_tokens, window)


def _prefix(spec: surgery.PruneSpec, upto: int) -> surgery.PruneSpec:
    """The spec restricted to layers < upto."""
    keep = lambda d: {l: v for l, v in d.items() if l < upto}  # noqa: E731
    return surgery.PruneSpec(
        keep(spec.neurons),
        spec.d_mlp,
        spec.ablation,
        keep(spec.bias),
        keep(spec.delta_out),
        keep(spec.replacement),
        keep(spec.out_hooks),
    )


def _gram_with(model, spec, layer, tokens):
    acc = GramAccumulator([layer], spec.d_mlp)
    with attached_hooks(model, surgery.simulation_hooks(spec)):
        engine.run(model, list(tokens), [acc], by_length=False)
    return acc.grams()[layer].double()


@pytest.mark.parametrize("method", ["obs", "wanda"])
def test_each_layer_is_fitted_on_the_model_pruned_so_far(tiny_model, method):
    """Layer 2's selection and refit equal those computed from a Gram matrix collected on the full model with
    layers 0-1 pruned by simulation hooks (an independent forward path: whole-model runs, padded batches)."""
    w = _windows(tiny_model)
    res = sequential.sequential_spec(tiny_model, w, method, 0.25, "mean", refit=0.05, groups=None)
    spec = res.spec
    assert sorted(spec.neurons) == [0, 1, 2] and res.damp == {0: 0.05, 1: 0.05, 2: 0.05}
    gram = _gram_with(tiny_model, _prefix(spec, 2), 2, w.tokens)
    d = spec.d_mlp
    n = len(spec.neurons[2])
    if method == "obs":
        cal = selection.Calibration(None, None, {2: gram[d, :d].float()}, {2: gram.float()})
        assert scores.get("obs").select_layer(tiny_model, cal, 2, n, "mean") == spec.neurons[2]
    else:  # structured Wanda from the Gram diagonal: ||W_out row|| x RMS activation
        w_out = surgery.output_matrix(tiny_model)[2].double()
        wanda = w_out.norm(dim=1) * gram.diagonal()[:d].sqrt()
        assert sorted(wanda.argsort(stable=True)[:n].tolist()) == spec.neurons[2]
    delta, bias = obs.refit_output(gram, surgery.output_matrix(tiny_model)[2], spec.neurons[2], True, 0.05)
    scale = float(spec.delta_out[2].abs().max())
    assert torch.allclose(spec.delta_out[2], delta, atol=1e-4 * scale + 1e-6)
    assert torch.allclose(spec.bias[2], bias, atol=1e-4 * float(bias.abs().max()) + 1e-6)


def test_layer_zero_matches_one_shot_selection(tiny_model):
    """Nothing is pruned before layer 0, so its selection is the one-shot selection on the same windows."""
    w = _windows(tiny_model)
    res = sequential.sequential_spec(tiny_model, w, "obs", 0.25, "zero", refit=0.01)
    gram = _gram_with(tiny_model, surgery.PruneSpec({}, res.spec.d_mlp), 0, w.tokens)
    cal = selection.Calibration(None, None, {}, {0: gram.float()})
    assert scores.get("obs").select_layer(tiny_model, cal, 0, len(res.spec.neurons[0]), "zero") == res.spec.neurons[0]


def test_later_layers_differ_from_one_shot(tiny_model):
    """The pruned prefix changes what later layers see: their Gram differs from the dense one (so sequential
    calibration is not one-shot calibration in disguise)."""
    w = _windows(tiny_model)
    spec = sequential.sequential_spec(tiny_model, w, "wanda", 0.5, "zero", refit=None, groups=None).spec
    dense = _gram_with(tiny_model, surgery.PruneSpec({}, spec.d_mlp), 2, w.tokens)
    pruned = _gram_with(tiny_model, _prefix(spec, 2), 2, w.tokens)
    assert (dense - pruned).abs().max() > 1e-3 * dense.abs().max()


def test_refit_residual_equals_the_error_on_activations():
    """The closed-form error on a Gram matrix equals the mean squared error computed on the activations."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(500, 12, generator=g, dtype=torch.float64) @ torch.randn(12, 12, generator=g, dtype=torch.float64) + 0.3
    w_out = torch.randn(12, 5, generator=g)
    aug = torch.cat([a, torch.ones(500, 1, dtype=torch.float64)], 1)
    gram = aug.t() @ aug / 500
    pruned = [1, 4, 7]
    delta, bias = obs.refit_output(gram[:, :] * 1.1, w_out, pruned, True, 0.02)  # a refit from other data
    kept = [i for i in range(12) if i not in pruned]
    pred = a[:, kept] @ (w_out.double()[kept] + delta.double()[kept]) + bias.double()
    direct = ((a @ w_out.double() - pred) ** 2).sum(1).mean()
    assert obs.refit_residual(gram, w_out, pruned, delta, bias) == pytest.approx(float(direct), rel=1e-9)


def test_choose_damp_is_the_grid_value_with_least_held_out_error():
    """Leave-one-fold-out by brute force on activations (least squares with the same damping, solved from the
    activations of the other folds) picks the same damping and errors."""
    g = torch.Generator().manual_seed(1)
    folds = [
        torch.randn(n, 10, generator=g, dtype=torch.float64) * s + m
        for n, s, m in ((300, 1.0, 0.0), (200, 2.0, 1.0), (250, 0.5, -1.0))
    ]
    w_out = torch.randn(10, 4, generator=g)
    pruned = [0, 3, 5, 8]
    aug = [torch.cat([f, torch.ones(len(f), 1, dtype=torch.float64)], 1) for f in folds]
    grams = [x.t() @ x / len(x) for x in aug]
    best, errors = obs.choose_damp(grams, [len(f) for f in folds], w_out, pruned, True, grid=(1e-3, 0.1, 10.0))
    kept = [i for i in range(10) if i not in pruned] + [10]
    brute = []
    for damp in (1e-3, 0.1, 10.0):
        rel = []
        for i in range(3):
            train = torch.cat([aug[j] for j in range(3) if j != i])
            gtr = train.t() @ train / len(train)
            lam = damp * gtr.diagonal()[:10].mean()
            # the damped update of the kept weights (and bias) that makes up for what the pruned neurons wrote
            x = train[:, kept]
            lost = train[:, pruned] @ w_out.double()[pruned]
            upd = torch.linalg.solve(x.t() @ x / len(x) + lam * torch.eye(len(kept), dtype=torch.float64), x.t() @ lost / len(x))
            coef = torch.cat([w_out.double(), torch.zeros(1, 4, dtype=torch.float64)])[kept] + upd
            err = ((aug[i][:, :10] @ w_out.double() - aug[i][:, kept] @ coef) ** 2).sum(1).mean()
            rel.append(float(err) / float(((aug[i][:, :10] @ w_out.double()) ** 2).sum(1).mean()))
        brute.append(sum(rel) / 3)
    assert errors == pytest.approx(brute, rel=1e-6)
    assert best == (1e-3, 0.1, 10.0)[min(range(3), key=brute.__getitem__)]


def test_groups_share_one_calibration_pass(tiny_model):
    """With one group, every layer is calibrated on the dense model: layer 2's Gram is the dense one."""
    w = _windows(tiny_model)
    spec = sequential.sequential_spec(tiny_model, w, "obs", 0.25, "mean", refit=0.05, groups=1).spec
    gram = _gram_with(tiny_model, surgery.PruneSpec({}, spec.d_mlp), 2, w.tokens)
    delta, _ = obs.refit_output(gram, surgery.output_matrix(tiny_model)[2], spec.neurons[2], True, 0.05)
    assert torch.allclose(spec.delta_out[2], delta, atol=1e-4 * float(delta.abs().max()) + 1e-6)
    assert sequential.layer_groups(30, 6) == [list(range(i, i + 5)) for i in range(0, 30, 5)]
    assert sequential.layer_groups(7, 3) == [[0, 1], [2, 3, 4], [5, 6]] and sequential.layer_groups(3, None) == [[0], [1], [2]]


def test_calibration_windows_balance_and_folds(tiny_model):
    w = _windows(tiny_model, n_tokens=1024, window=32)
    assert w.tokens.shape == (32, 32) and w.fold_names == ["a", "b"]
    assert w.folds.tolist() == [0, 1] * 16
    single = sequential.calibration_windows(tiny_model, {"mine": list(ns.lee_articles()[:20])}, 1024, 32)
    assert single.folds.tolist() == sorted(single.folds.tolist()) and len(single.fold_names) == 4
    with pytest.raises(ValueError, match=r"hold \d+ tokens in full 32-token windows, fewer than the 1024 asked for"):
        sequential.calibration_windows(tiny_model, {"tiny": ["just a few words"]}, 1024, 32)
    with pytest.raises(ValueError, match=r"source .b. holds \d+ tokens"):
        sequential.calibration_windows(tiny_model, {"a": list(ns.lee_articles()[:20]), "b": ["a few words"]}, 1024, 32)


def test_bad_input_changes_nothing(tiny_model):
    w = _windows(tiny_model)
    before = surgery.output_matrix(tiny_model).clone()
    for kwargs, match in (
        ({"method": "taylor"}, "needs gradients"),
        ({"refit": -1.0}, "refit must be"),
        ({"refit": "auto", "method": "wanda", "sparsity": 1.5}, "sparsity"),
    ):
        args = {"method": "obs", "sparsity": 0.25, "refit": 0.01, **kwargs}
        with pytest.raises(ValueError, match=match):
            sequential.sequential_spec(tiny_model, w, args["method"], args["sparsity"], "mean", args["refit"])
    one_fold = sequential.CalibrationWindows(w.tokens, torch.zeros(len(w.tokens), dtype=torch.long), ["only"])
    with pytest.raises(ValueError, match="at least 2 calibration folds"):
        sequential.sequential_spec(tiny_model, one_fold, "obs", 0.25, "mean", "auto")
    assert hook_count(tiny_model) == 0 and torch.equal(surgery.output_matrix(tiny_model), before)


def test_curve_command_with_sequential_calibration(tiny_dirs, tmp_path):
    """``curve --calibration sequential`` measures the sequential recipe: its point equals the perplexity of the
    same sequential spec evaluated on the same windows; a global scope is refused before any work."""
    import json

    from neuronscope_tl import cli, evaluation

    out = tmp_path / "curve"
    argv = [
        "curve",
        "--model",
        tiny_dirs["llama"],
        "--methods",
        "obs",
        "--sparsities",
        "0.25",
        "--ablations",
        "mean",
        "--calibration",
        "sequential",
        "--refit",
        "0.05",
        "--calib-tokens",
        "1024",
        "--no-domains",
        "--every",
        "1",
        "--precision",
        "fp32",
        "--out",
        str(out),
    ]
    assert cli.main(argv) == 0
    row = json.loads((out / "protocol.json").read_text())
    curve = __import__("pandas").read_csv(out / "curve.csv")
    model = ns.load_model(tiny_dirs["llama"])
    wins = sequential.calibration_windows(model, sequential.sequential_sources(), 1024)
    spec = sequential.sequential_spec(model, wins, "obs", 0.25, "mean", 0.05).spec
    window = min(evaluation.DEFAULT_WINDOW, int(model.cfg.n_ctx))
    ppl = evaluation.evaluate_perplexity(model, window=window, hooks=surgery.simulation_hooks(spec)).perplexity
    assert float(curve["perplexity"].iloc[0]) == pytest.approx(ppl, rel=1e-9)
    assert row["config"]["calibration"] == "sequential"
    bad = tmp_path / "bad"
    assert cli.main(argv[:-1] + [str(bad), "--scope", "global"]) == 2 and not bad.exists()
