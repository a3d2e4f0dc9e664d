"""Physical pruning: the saved directory loads in plain transformers and equals the hook simulation."""

from __future__ import annotations

import pytest
import torch

import neuronscope_tl as ns
from neuronscope_tl import surgery
from neuronscope_tl.hooks import attached_hooks, hook_count

from conftest import PROBE_TEXT, zero_output_weights

CALIB = [w for a in ns.lee_articles()[:1] for w in (" ".join(a.split()[i : i + 20]) for i in range(0, len(a.split()), 20))]


def _neurons(model, per_layer: int, seed: int = 0):
    info = ns.mlp_info(model)
    g = torch.Generator().manual_seed(seed)
    return {l: sorted(torch.randperm(info.d_mlp, generator=g)[:per_layer].tolist()) for l in range(info.n_layers)}


def _simulated(model, spec, tokens):
    with attached_hooks(model, surgery.simulation_hooks(spec)), torch.no_grad():
        return model(tokens).detach().clone()


def _plain_logits(path, tokens):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    with torch.no_grad():
        return hf, hf(tokens).logits


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
    torch.testing.assert_close(plain, sim, atol=1e-4, rtol=0)
    d = ns.mlp_info(model).d_mlp
    assert result.d_mlp_after == d - 8 and not result.masked
    assert result.mlp_parameters_after < result.mlp_parameters_before
    assert result.parameters_after == sum(p.numel() for p in hf.parameters())  # tied embeddings counted once
    cfg = model.original_model.config  # the bridge's own config is untouched by the surgery
    assert getattr(cfg, "intermediate_size", None) in (None, d) and getattr(cfg, "n_inner", d) in (None, d)
    assert not getattr(cfg, "mlp_bias", False)
    # Zero ablation is the same as zeroing the output weights in a fresh dense copy (independent route).
    if ablation == "zero":
        from transformers import AutoModelForCausalLM

        src = model.original_model.config._name_or_path
        dense = AutoModelForCausalLM.from_pretrained(src, attn_implementation="eager").eval()
        for layer, ns_ in neurons.items():
            zero_output_weights(dense, layer, ns_)
        with torch.no_grad():
            torch.testing.assert_close(plain, dense(tokens).logits, atol=1e-4, rtol=0)
    else:  # mean ablation really changed the output relative to zero ablation
        zero_spec = surgery.make_spec(model, neurons, "zero")
        assert (sim - _simulated(model, zero_spec, tokens)).abs().max() > 1e-3


def test_refit_survives_export_and_reduces_error(tiny_model, tmp_path):
    model = tiny_model
    tokens = model.to_tokens(PROBE_TEXT)
    neurons = _neurons(model, 16)
    grams = surgery.activation_grams(model, CALIB, sorted(neurons))
    spec = surgery.make_spec(model, neurons, "mean", grams=grams)
    assert spec.delta_out and spec.bias
    result = surgery.prune_model(model, None, "mean", out=tmp_path / "refit", spec=spec, measure_latency=False)
    _, plain = _plain_logits(result.out, tokens)
    torch.testing.assert_close(plain, _simulated(model, spec, tokens), atol=1e-4, rtol=0)


def test_refit_is_least_squares():
    """The refit equals numpy's least-squares solution on explicit activations (no dampening effect at scale)."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4000, 12, generator=g, dtype=torch.float64) + 0.5
    a[:, 3] = a[:, 1] * 0.7 + 0.1 * torch.randn(4000, generator=g, dtype=torch.float64)  # correlated neuron
    w = torch.randn(12, 5, generator=g, dtype=torch.float64)
    aug = torch.cat([a, torch.ones(4000, 1, dtype=torch.float64)], 1)
    gram = aug.t() @ aug / 4000
    pruned = [1, 7]
    delta, bias = surgery.refit_output(gram, w, pruned, with_bias=True)
    keep = [i for i in range(12) if i not in pruned]
    x = torch.cat([a[:, keep], torch.ones(4000, 1, dtype=torch.float64)], 1)
    sol = torch.linalg.lstsq(x, a @ w).solution
    err_refit = ((a[:, keep] @ (w[keep] + delta[keep].double()) + bias.double()) - a @ w).square().mean()
    err_lstsq = (x @ sol - a @ w).square().mean()
    assert err_refit <= err_lstsq * 1.02
    assert delta[pruned].abs().max() == 0


def test_global_pruning_writes_masked_checkpoint(tiny_model, tmp_path):
    model = tiny_model
    tokens = model.to_tokens(PROBE_TEXT)
    neurons = {0: [1, 2, 3], 2: [5]}
    spec = surgery.make_spec(model, neurons, "zero")
    result = surgery.prune_model(model, None, out=tmp_path / "masked", spec=spec, measure_latency=False)
    assert result.masked and result.d_mlp_after == ns.mlp_info(model).d_mlp
    _, plain = _plain_logits(result.out, tokens)
    torch.testing.assert_close(plain, _simulated(model, spec, tokens), atol=1e-4, rtol=0)


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
    order, err = surgery.obs_order(gram, w, 8, keep_constant=True, block=block, damp=0.0)
    assert len(set(order)) == 8 and all(0 <= i < 16 for i in order)
    for n in (4, 8):
        delta, bias = surgery.refit_output(gram, w, order[:n], with_bias=True, damp=0.0)
        keep = [i for i in range(16) if i not in order[:n]]
        recon = a[:, keep] @ (w[keep] + delta[keep].double()) + bias.double()
        true = (recon - a @ w).square().sum(1).mean()
        assert err[n - 1] == pytest.approx(float(true), rel=0.05)
    if block == 1:  # the first pick is the single neuron with the least refit error
        singles = [((lambda d_, b_: ((a[:, [j for j in range(16) if j != i]] @ (w[[j for j in range(16) if j != i]] + d_[[j for j in range(16) if j != i]].double()) + b_.double()) - a @ w).square().sum(1).mean())(*surgery.refit_output(gram, w, [i], True, 0.0))) for i in range(16)]
        assert order[0] == int(torch.tensor(singles).argmin())
