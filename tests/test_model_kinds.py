"""The mechanics on every model kind: bridges over tiny Llama and GPT-2 models, and TransformerLens 3.x
HookedTransformers built from a HookedTransformerConfig (skipped under TransformerLens 4, which removed them).

Each number the library reports is checked against an independent computation on a plain reference model whose
weights are edited (HF models for bridges, a deep copy for HookedTransformers; no hooks): hook ablation against
zeroed output weights or folded biases, impact and loss against float64 metrics of the edited reference, exact
tail ablation against the same, weight statistics against the matrices read by hand, and pruned models (HF
directories, smaller HookedTransformers reloaded by TransformerLens alone) against the hook simulation. Tolerances
are derived from fp32 rounding (conftest)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import neuronscope_tl as ns
from neuronscope_tl import arch, distill, surgery
from neuronscope_tl.activations import activation_grams
from neuronscope_tl.hooks import ablation_hook, attached_hooks, hook_count, mlp_post_name

from conftest import (
    FP32_EPS,
    HAS_HOOKED,
    PROBE_TEXT,
    build_hooked,
    kl64,
    kl_tolerance,
    load_hf,
    logit_noise,
    nll64,
    nll_tolerance,
    stat_tolerances,
    processed_copy,
    requires_hooked,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CALIB = ns.lee_articles()[:2]
EXPECTED = {
    "bridge-llama": arch.LlamaArch,
    "bridge-gpt2": arch.GPT2Arch,
    "hooked-llama": arch.HookedArch,
    "hooked-gpt2": arch.HookedArch,
}


def hooked_logits(model, tokens, hooks):
    with torch.no_grad(), attached_hooks(model, hooks):
        return model(tokens)[0].detach().clone()


def test_adapter_weights_and_source(kind_model):
    km, model = kind_model, kind_model.model
    assert type(arch.arch_for(model)) is EXPECTED[km.kind]
    assert arch.weight_source(model) == "raw"
    ref = km.reference()
    w = arch.mlp_weights(model)
    n_layers, d_mlp, d_model = int(model.cfg.n_layers), int(model.cfg.d_mlp), int(model.cfg.d_model)
    assert w["out"].shape == (n_layers, d_mlp, d_model) and w["in"].shape == (n_layers, d_model, d_mlp)
    assert ("gate" in w) == (km.family == "llama") == ns.mlp_info(model).gated
    for layer in range(n_layers):
        assert torch.equal(w["out"][layer], km.output_weights(ref, layer).float())
    assert torch.equal(arch.output_matrix(model), w["out"])
    wa = ns.analyze_weights(model)
    assert wa.weights == "raw" and wa.to_dict()["weights"] == "raw"
    norms = torch.stack([km.output_weights(ref, l).double().norm(dim=1) for l in range(n_layers)]).reshape(-1)
    np.testing.assert_allclose(wa.neurons["w_out_norm"].to_numpy(), norms.numpy(), rtol=4 * d_model * FP32_EPS)


@pytest.mark.parametrize("layer,neurons", [(0, [3]), (2, [5, 6, 40])])
def test_zero_ablation_equals_zeroed_output_weights(kind_model, layer, neurons):
    km, model = kind_model, kind_model.model
    toks = model.to_tokens(PROBE_TEXT)
    with torch.no_grad():
        clean = model(toks)[0]
    atol = 2 * logit_noise(clean, km.logits(km.reference(), toks[0]))
    reference = km.logits(km.zero(km.reference(), layer, neurons), toks[0])
    got = hooked_logits(model, toks, [(mlp_post_name(layer), ablation_hook(neurons))])
    torch.testing.assert_close(got, reference, atol=atol, rtol=0)
    assert (got - clean).abs().max() > 1000 * atol


def test_mean_ablation_equals_folded_bias(kind_model):
    km, model = kind_model, kind_model.model
    layer, neurons, means = 1, [2, 9], torch.tensor([0.37, -0.21])
    toks = model.to_tokens(PROBE_TEXT)
    got = hooked_logits(model, toks, [(mlp_post_name(layer), ablation_hook(neurons, means))])
    reference = km.logits(km.fold_mean(km.reference(), layer, neurons, means), toks[0])
    atol = 4 * max(km.forward_error(km.reference(), [toks[0]]), 4 * FP32_EPS * float(reference.abs().max()))
    torch.testing.assert_close(got, reference, atol=atol, rtol=0)


def test_impact_and_exact_tail_equal_float64_metrics_of_the_edited_reference(kind_model):
    """simulate_pruning's impact score and loss change, and ablate_each's per-neuron kl and loss change, against
    KL and NLL computed in float64 from the reference with the neuron's output weights zeroed."""
    km, model = kind_model, kind_model.model
    toks = model.to_tokens(PROBE_TEXT)
    p_logits = km.logits(km.reference(), toks[0])
    with torch.no_grad():
        eta = logit_noise(model(toks)[0], p_logits)
    result = ns.simulate_pruning(model, 1, [1, 4, 8], PROBE_TEXT)
    q_logits = km.logits(km.zero(km.reference(), 1, [1, 4, 8]), toks[0])
    kl, kl_tol = kl64(p_logits, q_logits), kl_tolerance(p_logits, q_logits, eta)
    assert abs(result.impact_score - float(kl.mean())) <= float(kl_tol.mean())
    assert float(kl.mean()) > 20 * float(kl_tol.mean())
    nll_p, nll_q = nll64(p_logits, toks[0]), nll64(q_logits, toks[0])
    loss_tol = float((nll_tolerance(p_logits, toks[0], eta) + nll_tolerance(q_logits, toks[0], eta)).mean())
    assert abs(result.loss_change - float((nll_q - nll_p).mean())) <= loss_tol

    pairs = [(0, 3), (2, 7), (2, 11)]
    table = ns.ablate_each(model, pairs, [PROBE_TEXT])
    assert hook_count(model) == 0
    for row, (layer, n) in zip(table.itertuples(), pairs):
        q = km.logits(km.zero(km.reference(), layer, [n]), toks[0])
        # the tail and the full forward are two fp32 routes: both within eta of the float64 truth
        tol = kl_tolerance(p_logits, q, eta, runs=2)
        assert abs(row.kl - float(kl64(p_logits, q).mean())) <= float(tol.mean()), (layer, n)
        ltol = float((nll_tolerance(p_logits, toks[0], eta, 2) + nll_tolerance(q, toks[0], eta, 2)).mean())
        assert abs(row.loss_change - float((nll64(q, toks[0]) - nll_p).mean())) <= ltol, (layer, n)


def test_one_pass_scores_equal_cached_activations(kind_model):
    """score_neurons's rms and wanda against the activations TransformerLens's own run_with_cache returns."""
    model = kind_model.model
    table = ns.score_neurons(model, [PROBE_TEXT], top_k_contexts=1)
    _, cache = model.run_with_cache(model.to_tokens(PROBE_TEXT), names_filter=lambda n: n.endswith("mlp.hook_post"))
    w_out = arch.output_matrix(model).double()
    for layer in range(int(model.cfg.n_layers)):
        a = cache[mlp_post_name(layer)][0].double()
        rms = a.square().mean(0).sqrt()
        rows = table[table["layer"] == layer].sort_values("neuron")
        # one text per forward in both: the same fp32 activations up to 4 ulps (conftest.stat_tolerances), the
        # RMS within that, wanda within ||w|| times it plus the fp32 norm's (d_model + 2) eps
        rms_tol = stat_tolerances(a, logit_noise(a, a), 0.01)["rms"]
        norm = w_out[layer].norm(dim=1)
        assert ((torch.tensor(rows["rms"].to_numpy()) - rms).abs() <= rms_tol).all()
        wanda_tol = norm * rms_tol + rms * norm * (w_out.shape[-1] + 2) * FP32_EPS
        assert ((torch.tensor(rows["wanda"].to_numpy()) - rms * norm).abs() <= wanda_tol).all()


@pytest.mark.parametrize("mode", ["mean", "refit", "uneven refit", "distilled"])
def test_pruned_model_equals_hook_simulation(kind_model, tmp_path, mode):
    """prune_model's saved directory, reloaded without neuronscope_tl (transformers for an HF directory;
    HookedTransformer + safetensors for a HookedTransformer), gives the hook simulation's logits. Uneven: odd
    layers lose 12 neurons, even ones 8, so every layer is stored 8 narrower, odd ones padded with 4 zeroed
    neurons. Distilled: the refit, then trained by distillation (which must run on every kind)."""
    km, model = kind_model, kind_model.model
    toks = model.to_tokens(PROBE_TEXT)
    n_layers = int(model.cfg.n_layers)
    neurons = {l: list(range(l, 48, 6)) for l in range(n_layers)}  # 8 per layer
    if mode == "uneven refit":
        neurons = {l: list(range(l, 4 * (8 + 4 * (l % 2)), 4)) for l in range(n_layers)}
    if mode == "mean":
        means = ns.impact.ablation_values(model, sorted(neurons), "mean", CALIB)
        spec = surgery.make_spec(model, neurons, "mean", means)
    else:
        spec = surgery.make_spec(model, neurons, "mean", grams=activation_grams(model, CALIB, sorted(neurons), 256))
    if mode == "distilled":
        wins = torch.stack([w for w in ns.texts.windows(model, CALIB, 32) if w.numel() == 32][:4])
        trained = distill.distill_spec(model, spec, wins, epochs=2, lr=1e-2, bf16=False).spec
        assert hook_count(model) == 0
        assert all(not torch.equal(trained.delta_out[l], spec.delta_out[l]) for l in spec.delta_out)
        spec = trained
    result = surgery.prune_model(model, None, out=tmp_path / "pruned", spec=spec, measure_latency=False)
    sim = hooked_logits(model, toks, surgery.simulation_hooks(spec))
    assert hook_count(model) == 0 and result.d_mlp_after == int(model.cfg.d_mlp) - 8
    assert result.masked == (mode == "uneven refit")
    ref = km.reference()
    atol = 4 * max(km.forward_error(ref, [toks[0]]), 4 * FP32_EPS * float(km.logits(ref, toks[0]).abs().max()))
    if km.hooked:
        assert result.format == "hooked" and result.hf_out is None  # no HF checkpoint behind a config-built model
        reloaded = reload_with_transformer_lens_alone(result.out)
        assert int(reloaded.cfg.d_mlp) == int(model.cfg.d_mlp) - 8
        with torch.no_grad():
            plain = reloaded(toks)[0]
        assert result.mlp_parameters_after < result.mlp_parameters_before
    else:
        with torch.no_grad():
            plain = load_hf(result.out)(toks).logits[0]
    torch.testing.assert_close(plain, sim, atol=atol, rtol=0)


def reload_with_transformer_lens_alone(path):
    """The reload recipe of surgery.load_hooked, written out with TransformerLens, safetensors and transformers only."""
    from pathlib import Path

    from safetensors.torch import load_file
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformers import AutoTokenizer

    path = Path(path)
    cfg = json.loads((path / "tl_config.json").read_text())
    cfg["dtype"] = getattr(torch, cfg["dtype"])
    model = HookedTransformer(HookedTransformerConfig.from_dict(cfg), AutoTokenizer.from_pretrained(path))
    model.load_state_dict(load_file(str(path / "model.safetensors")))
    return model.eval()


def test_wrong_hook_post_width_is_refused(tiny_dirs):
    """A TransformerLens model whose mlp.hook_post is not d_mlp wide (here: a config that disagrees with the MLP)."""
    model = ns.load_model(tiny_dirs["llama"])
    model.cfg.d_mlp = 40
    with pytest.raises(
        ValueError,
        match=r"not a supported model kind \(mlp.hook_post is \[48\] wide, not d_mlp=40\); supported: .*HookedTransformer.*Gemma 3.*Llama-style.*GPT-2-style",
    ):
        ns.analyze_weights(model)


def test_encoder_bridge_is_refused(tmp_path):
    from transformers import BertConfig, BertForMaskedLM

    from conftest import build_tokenizer

    tok = build_tokenizer()
    BertForMaskedLM(
        BertConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    ).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    try:
        model = ns.load_model(str(tmp_path))
    except Exception as exc:  # a TransformerLens release that cannot bridge BERT refuses it itself
        pytest.skip(f"TransformerLens did not bridge BERT: {exc}")
    with pytest.raises(ValueError, match=r"Bert\w+ is not a supported model kind .*supported: "):
        ns.simulate_pruning(model, 0, [0], PROBE_TEXT)


# ---------------------------------------------------------------------------------------------- HookedTransformer only


@pytest.mark.hooked
@requires_hooked
def test_processed_weights_are_labelled_and_raw_statistics_refused(hooked_models):
    raw = hooked_models["gpt2"]
    proc = processed_copy(raw)
    assert arch.weight_source(proc) == "processed" and arch.weight_source(raw) == "raw"
    wa = ns.analyze_weights(proc)
    assert wa.weights == "processed"
    with pytest.raises(ValueError, match=r"holds processed weights.*from_pretrained_no_processing.*kind='hooked'"):
        ns.analyze_weights(proc, weights="raw")
    with pytest.raises(ValueError, match="for processed-weight statistics load it with HookedTransformer.from_pretrained"):
        ns.analyze_weights(raw, weights="processed")
    # processing changes weights, not activations: hook_post and the impact of an ablation are the same
    toks = raw.to_tokens(PROBE_TEXT)
    a = ns.simulate_pruning(raw, 1, [3, 5], PROBE_TEXT).impact_score
    b = ns.simulate_pruning(proc, 1, [3, 5], PROBE_TEXT).impact_score
    assert abs(a - b) <= 1e-4 * max(a, 1e-6) + 1e-6
    del toks


@pytest.mark.hooked
@requires_hooked
def test_hooked_model_without_mlps_is_refused():
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(
        n_layers=1, d_model=16, d_head=4, n_heads=4, d_vocab=64, n_ctx=16, attn_only=True, act_fn="relu"
    )
    with pytest.raises(ValueError, match="HookedTransformer is not a supported model kind .*supported: "):
        ns.mlp_info(HookedTransformer(cfg))


@pytest.mark.hooked
@requires_hooked
def test_hooked_kind_loads_a_local_checkpoint_with_transformer_lens_conversion(tiny_dirs):
    """load_model(dir, kind='hooked') on a saved Llama checkpoint: logits equal plain transformers, weights raw, the
    checkpoint directory recorded; 'hooked:' as a name prefix does the same (the command line's way)."""
    model = ns.load_model(tiny_dirs["llama"], kind="hooked")
    assert type(arch.arch_for(model)) is arch.HookedArch and arch.weight_source(model) == "raw"
    assert getattr(model, arch.SOURCE_ATTR).endswith(tiny_dirs["llama"].rstrip("/").split("/")[-1])
    toks = model.to_tokens(PROBE_TEXT)
    hf = load_hf(tiny_dirs["llama"])
    with torch.no_grad():
        got, want = model(toks)[0], hf(toks).logits[0]
    torch.testing.assert_close(got, want, atol=2 * logit_noise(got, want) + 1e-5, rtol=0)
    again = ns.load_model("hooked:" + tiny_dirs["llama"])
    assert type(again).__name__ == "HookedTransformer"


def test_hooked_kind_without_transformer_lens_3_says_what_to_install(tiny_dirs):
    if HAS_HOOKED:
        pytest.skip("TransformerLens 3.x is installed: HookedTransformer is available")
    with pytest.raises(RuntimeError, match=r"kind='hooked' needs TransformerLens 3.x.*transformer-lens>=3.0,<4"):
        ns.load_model(tiny_dirs["llama"], kind="hooked")


@pytest.mark.hooked
@requires_hooked
def test_pruned_hooked_model_from_a_checkpoint_also_writes_the_hf_directory(tiny_dirs, tmp_path):
    model = ns.load_model(tiny_dirs["llama"], kind="hooked")
    toks = model.to_tokens(PROBE_TEXT)
    neurons = {l: [0, 5, 9, 30] for l in range(3)}
    means = ns.impact.ablation_values(model, sorted(neurons), "mean", CALIB)
    spec = surgery.make_spec(model, neurons, "mean", means)
    result = surgery.prune_model(model, None, out=tmp_path / "p", spec=spec, measure_latency=False)
    assert result.hf_out is not None
    sim = hooked_logits(model, toks, surgery.simulation_hooks(spec))
    hf = load_hf(result.hf_out)
    assert hf.config.intermediate_size == 44
    with torch.no_grad():
        plain = hf(toks).logits[0]
    tol = 4 * max(logit_noise(sim, plain), 4 * FP32_EPS * float(sim.abs().max()))
    torch.testing.assert_close(plain, sim, atol=tol, rtol=0)
    reloaded = surgery.load_hooked(result.out)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(toks)[0], sim, atol=tol, rtol=0)


@pytest.mark.hooked
@requires_hooked
def test_build_hooked_is_deterministic():
    a, b = build_hooked("llama", seed=3), build_hooked("llama", seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_search_and_candidates_on_every_kind(kind_model):
    """search_pruning's chosen set, measured again on the reference with those neurons' output weights zeroed,
    gives its reported perplexity ratio (float64, fp32 bound) within the budget; assess_candidates runs on every
    kind and its activation scores equal RMS x ||W_out row|| from run_with_cache."""
    import math

    from neuronscope_tl.evaluation import eval_windows
    from neuronscope_tl.texts import calibration_tokens

    km, model = kind_model, kind_model.model
    evalt = ns.lee_articles()[200:202]
    res = ns.search_pruning(
        model,
        0.5,
        "wanda",
        "zero",
        eval_texts=evalt,
        calib_texts=CALIB,
        calib_tokens=128,
        window=32,
        every=1,
        bf16=False,
        step=0.2,
        min_step=0.1,
    )
    assert res.perplexity <= res.budget_perplexity
    wins = eval_windows(model, evalt, 32, 1)
    ref, pruned = km.reference(), km.reference()
    for layer, ns_ in res.neurons.items():
        km.zero(pruned, layer, ns_)

    with torch.no_grad():  # how far the library's fp32 forward and the reference's are apart, measured
        eta = max(logit_noise(model(w[None])[0], km.logits(ref, w)) for w in wins.tokens)

    def log_ppl(m):
        total = count = tol = 0.0
        for w in wins.tokens:
            logits = km.logits(m, w)
            total += float(nll64(logits, w).sum())
            tol += float(nll_tolerance(logits, w, eta, runs=2).sum())
            count += int(w.numel()) - 1
        return total / count, tol / count

    d, dt = log_ppl(ref)
    p, pt = log_ppl(pruned)
    assert abs(math.log(res.dense_perplexity) - d) <= dt and abs(math.log(res.perplexity) - p) <= pt

    cands = ns.assess_candidates(model, 10.0, calib_texts=CALIB, calib_tokens=128)
    assert len(cands) > 0
    toks = calibration_tokens(model, CALIB, 128)
    sq = None
    for ids in toks:
        _, cache = model.run_with_cache(ids[None], names_filter=lambda n: n.endswith("mlp.hook_post"))
        s = torch.stack([cache[mlp_post_name(l)][0].double().square().sum(0) for l in range(int(model.cfg.n_layers))])
        sq = s if sq is None else sq + s
    n_tok = sum(int(t.numel()) for t in toks)
    score = (sq / n_tok).sqrt() * arch.output_matrix(model).double().norm(dim=2)
    for row in cands.head(5).itertuples():
        assert row.activation_score == pytest.approx(float(score[row.layer, row.neuron]), rel=1e-5, abs=1e-9)
