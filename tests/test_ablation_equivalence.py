"""A hook ablation equals the same neurons removed in the raw HF weights: zero ablation = zeroed output weights,
mean ablation = zeroed output weights plus the means folded into the output bias, for both MLP kinds. Metrics are
recomputed in float64; tolerances are derived from fp32 rounding (conftest)."""

import numpy as np
import pytest
import torch

import neuronscope_tl as ns
from neuronscope_tl.hooks import ablation_hook, attached_hooks, mlp_post_name

from conftest import (
    FP32_EPS,
    PROBE_TEXT,
    fold_mean_into_bias,
    fp32_forward_error,
    hf_logits,
    kl64,
    kl_tolerance,
    load_hf,
    logit_noise,
    nll64,
    nll_tolerance,
    zero_output_weights,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def hooked(model, toks, layer, neurons, values=None):
    with torch.no_grad(), attached_hooks(model, [(mlp_post_name(layer), ablation_hook(neurons, values))]):
        return model(toks)[0].detach().clone()


@pytest.mark.parametrize("layer,neurons", [(0, [3]), (1, [0, 7, 11]), (2, [5, 6])])
def test_zero_ablation_equals_zeroed_output_weights(tiny_model, tiny_dirs, tiny_kind, layer, neurons):
    toks = tiny_model.to_tokens(PROBE_TEXT)
    with torch.no_grad():
        clean = tiny_model(toks)[0]
    # a zero activation and a zero weight column give the same products; what is left is the rounding the bridge
    # and plain HF differ by on the clean forward (measured), doubled as a margin
    atol = 2 * logit_noise(clean, hf_logits(load_hf(tiny_dirs[tiny_kind]), toks[0]))
    reference = hf_logits(zero_output_weights(load_hf(tiny_dirs[tiny_kind]), layer, neurons), toks[0])
    got = hooked(tiny_model, toks, layer, neurons)
    torch.testing.assert_close(got, reference, atol=atol, rtol=0)
    assert (got - clean).abs().max() > 1000 * atol  # the ablation did change something


@pytest.mark.parametrize("layer,neurons,means", [(1, [2, 9], [0.37, -0.21]), (0, [0, 5, 40], [1.5, -0.8, 0.05])])
def test_mean_ablation_equals_bias_folded_weights(tiny_model, tiny_dirs, tiny_kind, layer, neurons, means):
    """activation := mean  <=>  output weights of the neurons zeroed and sum_i mean_i * w_i added to the output bias
    (Llama: down_proj gains a bias, down_proj.weight[:, neurons] @ means; GPT-2: c_proj.bias)."""
    toks = tiny_model.to_tokens(PROBE_TEXT)
    means = torch.tensor(means)
    got = hooked(tiny_model, toks, layer, neurons, means)
    hf = fold_mean_into_bias(load_hf(tiny_dirs[tiny_kind]), layer, neurons, means)
    if tiny_kind == "llama":
        assert hf.model.layers[layer].mlp.down_proj.bias is not None
    reference = hf_logits(hf, toks[0])
    # two routes (means through the matmul, or a bias added after it) round differently: each is within the
    # forward's measured fp32 error of the exact logits (floored at 4 ulps), doubled for two routes and again
    dense = load_hf(tiny_dirs[tiny_kind])
    atol = 4 * max(fp32_forward_error(dense, [toks[0]]), 4 * FP32_EPS * float(reference.abs().max()))
    torch.testing.assert_close(got, reference, atol=atol, rtol=0)
    zero = hf_logits(zero_output_weights(load_hf(tiny_dirs[tiny_kind]), layer, neurons), toks[0])
    assert (reference - zero).abs().max() > 1000 * atol  # the folded means matter: this is not zero ablation


def test_simulate_pruning_metrics_match_zeroed_weight_model(tiny_model, tiny_dirs, tiny_kind):
    """impact_score, per-token KL, losses and top-1 recomputed in float64 from two plain HF runs."""
    layer, neurons = 1, [1, 4, 8]
    result = ns.simulate_pruning(tiny_model, layer, neurons, PROBE_TEXT)
    toks = tiny_model.to_tokens(PROBE_TEXT)
    clean_hf = load_hf(tiny_dirs[tiny_kind])
    p_logits = hf_logits(clean_hf, toks[0])
    q_logits = hf_logits(zero_output_weights(load_hf(tiny_dirs[tiny_kind]), layer, neurons), toks[0])
    with torch.no_grad():
        eta = logit_noise(tiny_model(toks)[0], p_logits)
    kl = kl64(p_logits, q_logits)
    kl_tol = kl_tolerance(p_logits, q_logits, eta)
    assert abs(result.impact_score - float(kl.mean())) <= float(kl_tol.mean())
    per_token = torch.tensor(result.token_kl[0]["kl"], dtype=torch.float64)
    assert ((per_token - kl).abs() <= kl_tol).all(), float(((per_token - kl).abs() - kl_tol).max())
    nll_p, nll_q = nll64(p_logits, toks[0]), nll64(q_logits, toks[0])
    assert abs(result.loss_original - float(nll_p.mean())) <= float(nll_tolerance(p_logits, toks[0], eta).mean())
    loss_tol = float((nll_tolerance(p_logits, toks[0], eta) + nll_tolerance(q_logits, toks[0], eta)).mean())
    assert abs(result.loss_change - float((nll_q - nll_p).mean())) <= loss_tol
    top = np.array((p_logits.argmax(-1) == q_logits.argmax(-1)).double())
    # a fraction of positions; only a position whose top two logits are within rounding could flip
    gaps = torch.stack([l.double().topk(2, -1).values for l in (p_logits, q_logits)])
    near_ties = int(((gaps[..., 0] - gaps[..., 1]) <= 4 * eta + 4 * FP32_EPS * gaps[..., 0].abs()).any(0).sum())
    assert abs(result.top1_agreement - top.mean()) <= (near_ties + 0.5) / len(top)
    assert float(kl.mean()) > 20 * float(kl_tol.mean())
