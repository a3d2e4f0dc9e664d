"""A hook ablation equals the same neurons removed in the raw HF weights."""

import pytest
import torch

import neuronscope_tl as ns
from neuronscope_tl.hooks import ablation_hook, attached_hooks, mlp_post_name

from conftest import PROBE_TEXT, zero_output_weights


@pytest.mark.parametrize("layer,neurons", [(0, [3]), (1, [0, 7, 11]), (2, [5, 6])])
def test_zero_ablation_equals_zeroed_output_weights(tiny_model, fresh_hf, layer, neurons):
    toks = tiny_model.to_tokens(PROBE_TEXT)
    with torch.no_grad(), attached_hooks(tiny_model, [(mlp_post_name(layer), ablation_hook(neurons))]):
        hooked = tiny_model(toks)
    zero_output_weights(fresh_hf, layer, neurons)
    with torch.no_grad():
        reference = fresh_hf(toks).logits
    torch.testing.assert_close(hooked, reference, atol=1e-4, rtol=0)
    assert (hooked - tiny_model(toks)).abs().max() > 1e-3  # the ablation did change something


def test_mean_ablation_equals_bias_folded_weights(tiny_dirs):
    """GPT-2: activation := mean  <=>  zero the c_proj rows and add mean * row to c_proj.bias."""
    from transformers import AutoModelForCausalLM

    model = ns.load_model(tiny_dirs["gpt2"])
    layer, neurons = 1, [2, 9]
    means = torch.tensor([0.37, -0.21])
    toks = model.to_tokens(PROBE_TEXT)
    with torch.no_grad(), attached_hooks(model, [(mlp_post_name(layer), ablation_hook(neurons, means))]):
        hooked = model(toks)
    hf = AutoModelForCausalLM.from_pretrained(tiny_dirs["gpt2"], attn_implementation="eager").eval()
    proj = hf.transformer.h[layer].mlp.c_proj
    with torch.no_grad():
        proj.bias += (means[:, None] * proj.weight[neurons, :]).sum(0)
        proj.weight[neurons, :] = 0.0
        reference = hf(toks).logits
    torch.testing.assert_close(hooked, reference, atol=1e-4, rtol=0)


def test_simulate_pruning_kl_matches_zeroed_weight_model(tiny_model, fresh_hf):
    """impact_score, loss change and top-1 recomputed from two plain HF runs with numpy."""
    import numpy as np

    layer, neurons = 1, [1, 4, 8]
    result = ns.simulate_pruning(tiny_model, layer, neurons, PROBE_TEXT)
    toks = tiny_model.to_tokens(PROBE_TEXT)
    with torch.no_grad():
        p = torch.softmax(fresh_hf(toks).logits[0].double(), -1).numpy()
        zero_output_weights(fresh_hf, layer, neurons)
        q = torch.softmax(fresh_hf(toks).logits[0].double(), -1).numpy()
    kl = (p * (np.log(p) - np.log(q))).sum(-1)
    assert result.impact_score == pytest.approx(kl.mean(), rel=1e-4, abs=1e-7)
    t = toks[0].numpy()
    nll = lambda dist: -np.log(dist[np.arange(len(t) - 1), t[1:]]).mean()
    assert result.loss_original == pytest.approx(nll(p), rel=1e-5)
    assert result.loss_change == pytest.approx(nll(q) - nll(p), abs=1e-5)
    assert result.top1_agreement == pytest.approx((p.argmax(-1) == q.argmax(-1)).mean())
    per_token = np.array(result.token_kl[0]["kl"])
    np.testing.assert_allclose(per_token, kl, rtol=1e-3, atol=1e-6)
