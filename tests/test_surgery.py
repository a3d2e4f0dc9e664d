"""Physical pruning: the saved directory loads in plain transformers and equals the hook simulation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import neuronscope_tl as ns
from neuronscope_tl import obs, surgery
from neuronscope_tl.hooks import attached_hooks, hook_count

from conftest import FP32_EPS, PROBE_TEXT, fp32_forward_error, load_hf, mlp_inputs, zero_output_weights

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CALIB = [w for a in ns.lee_articles()[:1] for w in (" ".join(a.split()[i : i + 20]) for i in range(0, len(a.split()), 20))]


def _neurons(model, per_layer: int, seed: int = 0):
    info = ns.mlp_info(model)
    g = torch.Generator().manual_seed(seed)
    return {l: sorted(torch.randperm(info.d_mlp, generator=g)[:per_layer].tolist()) for l in range(info.n_layers)}


def _simulated(model, spec, tokens):
    with attached_hooks(model, surgery.simulation_hooks(spec)), torch.no_grad():
        return model(tokens).detach().clone()


def _plain_logits(path, tokens):
    hf = load_hf(path)
    with torch.no_grad():
        return hf, hf(tokens).logits


def route_tolerance(model, tokens):
    """Max |logit difference| allowed between two fp32 routes to the same function (hooks on the bridge against a
    physically smaller or refit HF model: other matmul shapes and summation orders). Each route is within the
    forward's fp32 rounding of the exact logits, measured against a float64 copy of the dense weights and floored
    at 4 ulps of the largest logit; two routes: twice that; doubled again as a margin."""
    hf = load_hf(model.original_model.config._name_or_path)
    with torch.no_grad():
        largest = float(hf(tokens).logits.abs().max())
    return 4 * max(fp32_forward_error(hf, [tokens[0]]), 4 * FP32_EPS * largest)


@pytest.mark.parametrize("ablation", ["zero", "mean"])
def test_saved_model_equals_hook_simulation(tiny_model, tmp_path, ablation):
    model = tiny_model
    tokens = model.to_tokens(PROBE_TEXT)
    neurons = _neurons(model, 8)
    means = ns.impact.ablation_values(model, sorted(neurons), ablation, CALIB) if ablation == "mean" else None
    spec = surgery.make_spec(model, neurons, ablation, means)
    result = surgery.prune_model(model, None, ablation, out=tmp_path / "pruned", spec=spec, measure_latency=False)
    hf, plain = _plain_logits(result.out, tokens)
    sim = _simulated(model, spec, tokens)
    assert hook_count(model) == 0
    torch.testing.assert_close(plain, sim, atol=route_tolerance(model, tokens), rtol=0)
    d = ns.mlp_info(model).d_mlp
    assert result.d_mlp_after == d - 8 and not result.masked
    assert result.mlp_parameters_after < result.mlp_parameters_before
    assert result.parameters_after == sum(p.numel() for p in hf.parameters())  # tied embeddings counted once
    cfg = model.original_model.config  # the bridge's own config is untouched by the surgery
    assert getattr(cfg, "intermediate_size", None) in (None, d) and getattr(cfg, "n_inner", d) in (None, d)
    assert not getattr(cfg, "mlp_bias", False)
    # Zero ablation is the same as zeroing the output weights in a fresh dense copy (independent route).
    if ablation == "zero":
        dense = load_hf(model.original_model.config._name_or_path)
        for layer, ns_ in neurons.items():
            zero_output_weights(dense, layer, ns_)
        with torch.no_grad():
            torch.testing.assert_close(plain, dense(tokens).logits, atol=route_tolerance(model, tokens), rtol=0)
    else:  # mean ablation really changed the output relative to zero ablation
        zero_spec = surgery.make_spec(model, neurons, "zero")
        assert (sim - _simulated(model, zero_spec, tokens)).abs().max() > 100 * route_tolerance(model, tokens)


def test_refit_survives_export_and_reduces_error(tiny_model, tmp_path):
    """The least-squares refit reconstructs each layer's MLP output from the kept neurons better than no refit.

    On the calibration tokens, with activations a read from the HF output projection's input (torch hook, float64)
    and W the dense output weights: ||a W - (a_K (W_K + delta_K) + b)||^2 after the refit is below both
    ||a W - a_K W_K||^2 (zero ablation) and ||a W - (a_K W_K + mean(a_P) W_P)||^2 (mean folded into the bias).
    Then the refit model saved to disk equals the hook simulation."""
    model = tiny_model
    tokens = model.to_tokens(PROBE_TEXT)
    neurons = _neurons(model, 16)
    grams = ns.activations.activation_grams(model, CALIB, sorted(neurons))
    spec = surgery.make_spec(model, neurons, "mean", grams=grams)
    assert spec.delta_out and spec.bias
    hf = load_hf(model.original_model.config._name_or_path)
    calib_tokens = ns.texts.tokenize(model, CALIB, max_tokens=8192)
    for layer, pruned in neurons.items():
        a = mlp_inputs(hf, calib_tokens, layer)  # [n_tokens, d_mlp], float64
        mlp = hf.transformer.h[layer].mlp if hasattr(hf, "transformer") else hf.model.layers[layer].mlp
        # [d_mlp, d_model]: GPT-2's Conv1D stores [in, out], a Linear [out, in]
        w = (mlp.c_proj.weight if hasattr(mlp, "c_proj") else mlp.down_proj.weight.t()).detach().double()
        kept = [n for n in range(w.shape[0]) if n not in pruned]
        target = a @ w
        delta, bias = spec.delta_out[layer].double(), spec.bias[layer].double()
        assert delta[pruned].abs().max() == 0  # pruned neurons contribute nothing
        err_refit = (target - (a[:, kept] @ (w[kept] + delta[kept]) + bias)).square().sum()
        err_zero = (target - a[:, kept] @ w[kept]).square().sum()
        err_mean = (target - (a[:, kept] @ w[kept] + a[:, pruned].mean(0) @ w[pruned])).square().sum()
        # float64 sums of a few thousand products of fp32 numbers: rounding ~1e-13 relative, far below these gaps
        assert err_refit < err_mean < err_zero, (layer, float(err_refit), float(err_mean), float(err_zero))
        assert err_refit < 0.9 * err_mean  # not a rounding-level gain: the refit uses the kept neurons
    result = surgery.prune_model(model, None, "mean", out=tmp_path / "refit", spec=spec, measure_latency=False)
    _, plain = _plain_logits(result.out, tokens)
    torch.testing.assert_close(plain, _simulated(model, spec, tokens), atol=route_tolerance(model, tokens), rtol=0)


def test_refit_is_least_squares():
    """The refit equals numpy's least-squares solution on explicit activations (no dampening effect at scale)."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4000, 12, generator=g, dtype=torch.float64) + 0.5
    a[:, 3] = a[:, 1] * 0.7 + 0.1 * torch.randn(4000, generator=g, dtype=torch.float64)  # correlated neuron
    w = torch.randn(12, 5, generator=g, dtype=torch.float64)
    aug = torch.cat([a, torch.ones(4000, 1, dtype=torch.float64)], 1)
    gram = aug.t() @ aug / 4000
    pruned = [1, 7]
    keep = [i for i in range(12) if i not in pruned]
    x = torch.cat([a[:, keep], torch.ones(4000, 1, dtype=torch.float64)], 1)
    sol = torch.linalg.lstsq(x, a @ w).solution  # [kept + 1, d_model]: the refit weights W_K + delta_K and b
    err_lstsq = (x @ sol - a @ w).square().mean()
    # undamped: the normal equations' solution is lstsq's; the refit returns fp32, so agreement is to fp32
    # rounding of weights of magnitude |sol| (relative 2^-24 each, a few times for the sum W_K + delta_K)
    delta, bias = obs.refit_output(gram, w, pruned, with_bias=True, damp=0.0)
    scale = float(sol.abs().max())
    torch.testing.assert_close(w[keep] + delta[keep].double(), sol[:-1], rtol=0, atol=4 * FP32_EPS * scale)
    torch.testing.assert_close(bias.double(), sol[-1], rtol=0, atol=4 * FP32_EPS * scale)
    assert delta[pruned].abs().max() == 0
    # the default dampening (1% of the mean diagonal) costs little reconstruction error at this scale
    delta, bias = obs.refit_output(gram, w, pruned, with_bias=True)
    err_refit = ((a[:, keep] @ (w[keep] + delta[keep].double()) + bias.double()) - a @ w).square().mean()
    assert err_lstsq <= err_refit <= err_lstsq * 1.02
    assert delta[pruned].abs().max() == 0


def test_non_uniform_pruning_stores_the_widest_layer(tiny_model, tmp_path):
    """Layers that lost different numbers of neurons are stored at the widest layer's width (here layer 1 lost
    none, so no width is saved; with every layer losing some, the least-pruned layer sets the width), padded with
    zeroed neurons, and the reloaded model equals the hook simulation."""
    model = tiny_model
    tokens = model.to_tokens(PROBE_TEXT)
    info = ns.mlp_info(model)
    neurons = {0: [1, 2, 3], 2: [5]}
    spec = surgery.make_spec(model, neurons, "zero")
    result = surgery.prune_model(model, None, out=tmp_path / "masked", spec=spec, measure_latency=False)
    assert result.masked and result.d_mlp_after == info.d_mlp
    neurons = {l: list(range(2 + l % 2 * 3)) for l in range(info.n_layers)}  # layers lose 2 or 5
    spec = surgery.make_spec(model, neurons, "zero")
    result = surgery.prune_model(model, None, out=tmp_path / "padded", spec=spec, measure_latency=False)
    assert result.masked and result.d_mlp_after == info.d_mlp - 2
    _, plain = _plain_logits(result.out, tokens)
    torch.testing.assert_close(plain, _simulated(model, spec, tokens), atol=route_tolerance(model, tokens), rtol=0)


def test_bad_input_writes_nothing(tiny_model, tmp_path):
    model = tiny_model
    d = ns.mlp_info(model).d_mlp
    with pytest.raises(ValueError, match=f"0..{d - 1}"):
        surgery.prune_model(model, {0: [d]}, out=tmp_path / "a")
    with pytest.raises(ValueError, match="layer"):
        surgery.prune_model(model, {99: [0]}, out=tmp_path / "b")
    with pytest.raises(ValueError, match="at most"):
        surgery.prune_model(model, {0: list(range(d))}, out=tmp_path / "c")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x.txt").write_text("keep")
    with pytest.raises(ValueError, match="not empty"):
        surgery.prune_model(model, {0: [1]}, out=busy)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy"]
    assert [p.name for p in busy.iterdir()] == ["x.txt"]


@pytest.mark.parametrize("block", [1, 4])
def test_obs_error_equals_refit_error(block):
    """The greedy OBS bookkeeping equals the reconstruction error of the least-squares refit of the same set."""
    g = torch.Generator().manual_seed(1)
    a = torch.randn(3000, 16, generator=g, dtype=torch.float64) * torch.linspace(0.1, 2, 16, dtype=torch.float64)
    w = torch.randn(16, 6, generator=g, dtype=torch.float64)
    aug = torch.cat([a, torch.ones(3000, 1, dtype=torch.float64)], 1)
    gram = aug.t() @ aug / 3000
    order, err = obs.obs_order(gram, w, 8, keep_constant=True, block=block, damp=0.0)
    assert len(set(order)) == 8 and all(0 <= i < 16 for i in order)
    for n in (4, 8):
        delta, bias = obs.refit_output(gram, w, order[:n], with_bias=True, damp=0.0)
        keep = [i for i in range(16) if i not in order[:n]]
        recon = a[:, keep] @ (w[keep] + delta[keep].double()) + bias.double()
        true = (recon - a @ w).square().sum(1).mean()
        # exact at block ends in exact arithmetic; float64 rounding of a 17x17 solve and of 3000-term sums
        assert err[n - 1] == pytest.approx(float(true), rel=1e-9)
    if block == 1:  # the first pick is the single neuron with the least refit error
        singles = [
            (
                (
                    lambda d_, b_: (
                        (
                            (
                                a[:, [j for j in range(16) if j != i]]
                                @ (w[[j for j in range(16) if j != i]] + d_[[j for j in range(16) if j != i]].double())
                                + b_.double()
                            )
                            - a @ w
                        )
                        .square()
                        .sum(1)
                        .mean()
                    )
                )(*obs.refit_output(gram, w, [i], True, 0.0))
            )
            for i in range(16)
        ]
        assert order[0] == int(torch.tensor(singles).argmin())


def test_forward_latency_reports_median_and_quartiles_of_the_timed_forwards(tiny_model, monkeypatch):
    """A fake clock makes the five forwards take known times; the median and quartiles are numpy's of those."""
    durations = [0.3, 0.1, 0.5, 0.2, 0.45]
    ticks = iter(np.cumsum([x for d in durations for x in (1.0, d)]).tolist())
    monkeypatch.setattr(surgery.time, "perf_counter", lambda: next(ticks))
    med, q25, q75 = surgery.forward_latency(tiny_model, n_tokens=8, repeats=5)
    assert (med, q25, q75) == pytest.approx(tuple(np.percentile(durations, [50, 25, 75])), abs=1e-9)
    fields = surgery.latency_fields((med, q25, q75), (0.1, 0.05, 0.2))
    assert fields["latency_quartiles_s_before"] == (q25, q75) and fields["latency_s_after"] == 0.1
