"""Distillation of the kept output weights, checked another way: its loss and gradient against a physically pruned
plain HF model (float64, plain autograd on the HF output projection), its effect measured on the saved model, and
its bad input."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

import neuronscope_tl as ns
from neuronscope_tl import distill, recipes, selection, sequential, surgery
from neuronscope_tl.hooks import hook_count

from conftest import FP32_EPS, fp32_forward_error, kl64, load_hf, save_tiny

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _windows(model, n_tokens=512, window=32):
    texts = list(ns.lee_articles()[:40])
    return sequential.calibration_windows(model, {"a": texts[:20], "b": texts[20:]}, n_tokens, window)


def _spec(model, windows):
    return sequential.sequential_spec(model, windows, "obs", 0.25, "mean", refit=0.05, groups=None).spec


def _output_projection(hf, layer):
    mlp = hf.transformer.h[layer].mlp if hasattr(hf, "transformer") else hf.model.layers[layer].mlp
    return mlp.c_proj if hasattr(mlp, "c_proj") else mlp.down_proj


def test_loss_and_gradient_equal_a_physically_pruned_hf_model(tiny_model, tiny_dirs, tiny_kind):
    """In float64, the hook-simulated loss equals the summed KL of a plain HF model with the neurons physically
    removed against the dense HF model, and its gradient with respect to the kept output weights and the output
    bias equals plain autograd's on that model's output projection (transposed for Llama's ``down_proj``)."""
    model = tiny_model
    w = _windows(model)
    spec = distill.trainable_spec(model, _spec(model, w))
    g = torch.Generator().manual_seed(1)
    for layer in spec.delta_out:  # move away from the least-squares optimum, where the gradient is small
        spec.bias[layer] = spec.bias[layer] + 0.05 * torch.randn(spec.bias[layer].shape, generator=g)
    tokens = w.tokens[:3]
    model.to(torch.float64)
    params = {}
    for layer in spec.delta_out:
        spec.delta_out[layer] = params[("delta", layer)] = spec.delta_out[layer].double().requires_grad_()
        spec.bias[layer] = params[("bias", layer)] = spec.bias[layer].double().requires_grad_()
    loss = distill.distillation_kl(model, tokens, spec, bf16=False)
    loss.backward()
    assert hook_count(model) == 0

    dense = load_hf(tiny_dirs[tiny_kind]).double()
    frozen = {l: (d.detach().float(), spec.bias[l].detach().float()) for l, d in spec.delta_out.items()}
    plain_spec = surgery.PruneSpec(
        spec.neurons, spec.d_mlp, spec.ablation, {l: b for l, (_, b) in frozen.items()}, {l: d for l, (d, _) in frozen.items()}
    )
    pruned = surgery.apply_spec(load_hf(tiny_dirs[tiny_kind]), plain_spec).double()
    layers = sorted(spec.delta_out)
    with torch.no_grad():  # the float64 weights, not the fp32 round trip of apply_spec
        for layer in layers:
            kept = spec.kept(layer)
            w_out = surgery.output_matrix(model)[layer].double()
            full = (w_out + spec.delta_out[layer].detach())[kept]  # [kept, d_model]
            proj = _output_projection(pruned, layer)
            proj.weight.copy_(full.t() if proj.weight.shape[0] != len(kept) else full)
            base = _output_projection(dense, layer).bias
            proj.bias.copy_(spec.bias[layer].detach() + (0 if base is None else base.double()))
    for p in pruned.parameters():
        p.requires_grad_(False)
    projs = {l: _output_projection(pruned, l) for l in layers}
    for proj in projs.values():
        proj.weight.requires_grad_(True)
        proj.bias.requires_grad_(True)
    with torch.no_grad():
        teacher = dense(tokens).logits
    reference = kl64(teacher, pruned(tokens).logits).sum()
    reference.backward()
    # float64 throughout: the two routes differ by summation order only (~1e-16 relative per operation).
    torch.testing.assert_close(loss.detach(), reference.detach(), rtol=1e-9, atol=0)
    for layer in layers:
        kept = spec.kept(layer)
        grad = projs[layer].weight.grad
        grad = grad.t() if grad.shape[0] != len(kept) else grad
        mine = params[("delta", layer)].grad
        torch.testing.assert_close(mine[kept], grad, rtol=1e-7, atol=1e-12 * float(grad.abs().max()))
        assert float(mine[spec.neurons[layer]].abs().max()) == 0.0  # pruned rows see no activation
        torch.testing.assert_close(params[("bias", layer)].grad, projs[layer].bias.grad, rtol=1e-7, atol=1e-14)
        assert float(grad.abs().max()) > 1e-6  # the check compared something


def test_distillation_lowers_the_kl_of_the_saved_model(tiny_model, tiny_dirs, tiny_kind, tmp_path):
    """After distillation the saved, physically smaller model (plain transformers) is closer to the dense model on
    the calibration windows (KL in float64 from its logits) than the pruning it started from; pruned rows stay zero
    and the given spec is untouched."""
    model = tiny_model
    w = _windows(model)
    spec = _spec(model, w)
    before_delta = {l: d.clone() for l, d in spec.delta_out.items()}
    result = distill.distill_spec(model, spec, w.tokens, epochs=3, lr=1e-3, bf16=False)
    assert hook_count(model) == 0 and all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(before_delta[l], spec.delta_out[l]) for l in spec.delta_out)
    assert len(result.losses) == 3 * 8 and len(result.epoch_losses) == 3
    for layer, pruned in result.spec.neurons.items():
        assert float(result.spec.delta_out[layer][pruned].abs().max()) == 0.0

    dense = load_hf(tiny_dirs[tiny_kind])
    kls = {}
    for name, s in (("before", spec), ("after", result.spec)):
        saved = surgery.prune_model(model, None, out=tmp_path / name, spec=s, measure_latency=False)
        hf = load_hf(saved.out)
        with torch.no_grad():
            kls[name] = float(kl64(dense(w.tokens).logits, hf(w.tokens).logits).mean())
    assert kls["after"] < 0.9 * kls["before"], kls


def test_zero_ablation_stays_without_biases(tiny_model, tmp_path):
    """Distilling a zero-ablation pruning trains the output weights only: no bias appears, so the saved Llama-style
    config keeps ``mlp_bias`` off."""
    model = tiny_model
    w = _windows(model)
    spec = sequential.sequential_spec(model, w, "wanda", 0.25, "zero", refit=None, groups=None).spec
    trained = distill.distill_spec(model, spec, w.tokens, epochs=1, lr=1e-3, bf16=False).spec
    assert not trained.bias and sorted(trained.delta_out) == sorted(spec.neurons)
    assert any(float(d.abs().max()) > 0 for d in trained.delta_out.values())
    saved = surgery.prune_model(model, None, out=tmp_path / "zero", spec=trained, measure_latency=False)
    assert not getattr(load_hf(saved.out).config, "mlp_bias", False)


def test_epochs_zero_returns_the_pruning_in_trainable_form(tiny_model):
    """No training: the trainable form simulates exactly as the given spec (mean ablation folded into the bias)."""
    model = tiny_model
    w = _windows(model)
    spec = sequential.sequential_spec(model, w, "wanda", 0.25, "mean", refit=None, groups=None).spec
    assert spec.replacement and not spec.delta_out
    same = distill.distill_spec(model, spec, w.tokens, epochs=0).spec
    assert not same.replacement and sorted(same.delta_out) == sorted(spec.neurons)
    tokens = w.tokens[:2]
    from neuronscope_tl.hooks import attached_hooks

    with torch.no_grad():
        with attached_hooks(model, surgery.simulation_hooks(spec)):
            a = model(tokens)
        with attached_hooks(model, surgery.simulation_hooks(same)):
            b = model(tokens)
    dense = model(tokens).detach()
    # Same function by two routes (replacement values on hook_post against a bias after the projection).
    torch.testing.assert_close(a, b, atol=1e-4 * float(dense.abs().max()), rtol=0)


def test_recipe_distills_and_records(tiny_model):
    model = tiny_model
    w = _windows(model)
    recipe = recipes.Recipe("wanda", "mean", "sequential", 0.05, distill=2)
    assert recipe.describe().endswith("distilled for 2 epochs")
    spec, record = recipes.recipe_spec(model, recipe, 0.25, windows=w, train_windows=w, bf16=False)
    assert record["distillation"]["epochs"] == 2 and len(record["distillation"]["epoch_kl"]) == 2
    assert record["distillation"]["n_windows"] == len(w.tokens)
    assert sorted(spec.delta_out) == sorted(spec.neurons)
    oneshot, rec1 = recipes.recipe_spec(
        model,
        recipes.Recipe("wanda", "mean", distill=1),
        0.25,
        calib_sources={"a": list(ns.lee_articles()[:30])},
        calib_tokens=512,
    )
    taken = rec1["distillation"]["windows"]
    assert rec1["mode"] == "oneshot" and rec1["distillation"]["n_windows"] == taken["n_windows"] == -(-512 // taken["window"])
    assert recipes.RECOMMENDED.distill >= 1
    assert recipes.resolve_recipe(None, distill=0).distill == 0
    assert recipes.resolve_recipe("wanda").distill == 0


def test_distill_windows_start_with_the_calibration_windows(tiny_model):
    """Distillation takes more tokens of the same sources: its windows begin with the calibration's own, in order;
    a source too small for the larger budget leaves the calibration windows alone; a bad budget is refused."""
    model = tiny_model
    sources = {"a": list(ns.lee_articles()[:20]), "b": list(ns.lee_articles()[20:40])}
    cal = recipes.recipe_windows(model, calib_sources=sources, calib_tokens=512)
    more = recipes.distill_windows(model, calib_sources=sources, calib_tokens=512, distill_tokens=2048)
    assert len(more.tokens) == 4 * len(cal.tokens) and torch.equal(more.tokens[: len(cal.tokens)], cal.tokens)
    fallback = recipes.distill_windows(model, calib_sources=sources, calib_tokens=512, distill_tokens=10**8)
    assert torch.equal(fallback.tokens, cal.tokens)
    with pytest.raises(ValueError, match="distillation tokens"):
        recipes.distill_windows(model, calib_sources=sources, calib_tokens=512, distill_tokens=0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"epochs": -1}, "distillation epochs"),
        ({"epochs": 1.5}, "distillation epochs"),
        ({"epochs": 101}, "distillation epochs"),
        ({"lr": 0}, "learning rate must be a number in \\(0, 1\\]"),
        ({"lr": "fast"}, "learning rate"),
        ({"batch_size": 0}, "batch size"),
        ({"windows": torch.zeros(3)}, "n_windows >= 1, pos >= 2"),
        ({"windows": torch.zeros(2, 8)}, "integer token ids"),
        ({"windows": [[1, 2, 3]]}, "tensor of token ids"),
    ],
)
def test_bad_settings_change_nothing(tiny_model, kwargs, match):
    model = tiny_model
    w = _windows(model)
    spec = _spec(model, w)
    before = {l: d.clone() for l, d in spec.delta_out.items()}
    weights = [p.detach().clone() for p in model.parameters()]
    kwargs = {"windows": w.tokens, **kwargs}
    with pytest.raises(ValueError, match=match):
        distill.distill_spec(model, spec, **kwargs)
    with pytest.raises(ValueError, match="distillation epochs"):
        recipes.Recipe("obs", "mean", "sequential", "auto", distill=-2)
    assert hook_count(model) == 0
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters()))
    assert all(torch.equal(before[l], spec.delta_out[l]) for l in spec.delta_out)


def test_prune_and_curve_commands_take_distill(tmp_path):
    """``prune --distill N`` records N epochs and the saved model equals the distilled spec simulated with hooks
    (recomputed here from the recipe's parts: selection, then distill_spec); ``curve --distill 1`` measures the
    distilled point; a bad epoch count is refused before anything is written."""
    import json

    from neuronscope_tl import cli, evaluation

    path = save_tiny(tmp_path / "model", "llama", max_position_embeddings=1024)  # one-shot texts fit its context
    out = tmp_path / "pruned"
    base = ["--model", path, "--method", "wanda", "--ablation", "mean", "--calib-tokens", "1024", "--no-evaluate"]
    base += ["--distill-tokens", "2048"]  # the calibration's 1024 tokens, then as many again
    assert cli.main(["prune", "--sparsity", "0.25", "--out", str(out), "--distill", "2", *base]) == 0
    report = json.loads((out / "pruning_report.json").read_text())
    assert report["recipe"]["distill"] == 2 and len(report["calibration"]["distillation"]["epoch_kl"]) == 2

    model = ns.load_model(path)
    wins = sequential.calibration_windows(model, sequential.sequential_sources(), 2048)
    cal = selection.calibrate_for(model, ["wanda"], None, 1024, refit=False)
    spec = selection.build_spec(model, cal, "wanda", 0.25, "per_layer", "mean")
    trained = distill.distill_spec(model, spec, wins.tokens, 2).spec
    tokens = wins.tokens[:1]
    from neuronscope_tl.hooks import attached_hooks

    with torch.no_grad(), attached_hooks(model, surgery.simulation_hooks(trained)):
        simulated = model(tokens).double()
    with torch.no_grad():
        saved = load_hf(out)(tokens).logits.double()
        dense = model(tokens).double()
    # two fp32 routes, each within the forward's measured fp32 error of the exact logits (floored at 4 ulps of the
    # largest): twice that, doubled as a margin (as in test_prune_command)
    atol = 4 * max(fp32_forward_error(load_hf(path), [tokens[0]]), 4 * FP32_EPS * float(simulated.abs().max()))
    torch.testing.assert_close(saved, simulated, atol=atol, rtol=0)
    assert float((saved - dense).abs().max()) > 100 * atol

    curve = tmp_path / "curve"
    argv = ["curve", "--model", path, "--methods", "wanda", "--sparsities", "0.25", "--ablations", "mean"]
    argv += ["--calib-tokens", "1024", "--no-domains", "--every", "1", "--precision", "fp32", "--distill", "2"]
    argv += ["--distill-tokens", "2048"]
    assert cli.main(argv + ["--out", str(curve)]) == 0
    point = float(pd.read_csv(curve / "curve.csv")["perplexity"].iloc[0])
    window = min(evaluation.DEFAULT_WINDOW, int(model.cfg.n_ctx))
    fp32 = distill.distill_spec(model, spec, wins.tokens, 2, bf16=False).spec  # the windows prune trains on
    ppl = evaluation.evaluate_perplexity(model, window=window, hooks=surgery.simulation_hooks(fp32)).perplexity
    assert point == pytest.approx(ppl, rel=1e-6)

    for cmd in (["prune", "--sparsity", "0.25", "--out", str(tmp_path / "bad"), *base], argv + ["--out", str(tmp_path / "bad")]):
        for bad in ("-1", "1.5", "101"):
            try:
                code = cli.main(cmd + ["--distill", bad])
            except SystemExit as exc:  # argparse refuses a non-integer itself
                code = exc.code
            assert code == 2
            assert not (tmp_path / "bad").exists()
        assert cli.main(cmd + ["--distill", "1", "--distill-tokens", "0"]) == 2 and not (tmp_path / "bad").exists()
