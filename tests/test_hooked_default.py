"""The embedded default model (SmolLM2-135M-Instruct) as a TransformerLens 3.x HookedTransformer, built offline with
TransformerLens's own config builder and Llama weight conversion: logits against plain transformers, a hook
zero-ablation against the neuron's output weights zeroed in raw HF, and the analysis workflow and
``neuronscope-tl analyze`` on it. Skipped under TransformerLens 4, which has no HookedTransformer."""

from __future__ import annotations

import json

import pytest
import torch

import neuronscope_tl as ns
from neuronscope_tl import arch, cli

from conftest import FP32_EPS, kl64, kl_tolerance, logit_noise, requires_hooked, zero_output_weights

pytestmark = [pytest.mark.default_model, pytest.mark.hooked, requires_hooked]

TEXT_CHARS = 1200


@pytest.fixture(scope="module")
def hooked_default():
    return ns.load_model(kind="hooked")


@pytest.fixture(scope="module")
def hf_default():
    from transformers import AutoModelForCausalLM

    from neuronscope_tl.models import default_model_dir

    return AutoModelForCausalLM.from_pretrained(str(default_model_dir()), attn_implementation="eager").eval()


def test_hooked_default_logits_equal_hf(hooked_default, hf_default):
    """atol 1e-3 in fp32: TransformerLens's einsum attention and plain transformers' eager attention are two fp32
    routes through 30 layers; measured 9.0e-5 on 431 tokens."""
    model = hooked_default
    assert type(arch.arch_for(model)) is arch.HookedArch and arch.weight_source(model) == "raw"
    assert model.cfg.d_mlp == 1536 and model.cfg.n_layers == 30 and model.cfg.model_name == "SmolLM2-135M-Instruct"
    toks = model.to_tokens(ns.evaluation_texts()[0][:TEXT_CHARS])
    with torch.no_grad():
        got, want = model(toks)[0], hf_default(toks).logits[0]
    assert float((got - want).abs().max()) <= 1e-3


def test_hooked_default_zero_ablation_equals_zeroed_down_proj_column(hooked_default, hf_default):
    """The impact score of a hook zero-ablation on the HookedTransformer against KL(P || Q) in float64 where Q is
    plain HF with the neurons' down_proj columns zeroed."""
    import copy

    model = hooked_default
    text = ns.evaluation_texts()[0][:TEXT_CHARS]
    layer, neurons = 7, [11, 500, 1400]
    r = ns.simulate_pruning(model, layer, neurons, text)
    toks = model.to_tokens(text)
    with torch.no_grad():
        p = hf_default(toks).logits[0]
        q = zero_output_weights(copy.deepcopy(hf_default), layer, neurons)(toks).logits[0]
        eta = logit_noise(model(toks)[0], p)
    kl = kl64(p, q)
    assert abs(r.impact_score - float(kl.mean())) <= float(kl_tolerance(p, q, eta).mean())
    assert r.impact_score > 0


def test_analysis_workflow_and_analyze_command_on_hooked_default(hooked_default, tmp_path):
    model = hooked_default
    wa = ns.analyze_weights(model)
    assert wa.weights == "raw" and wa.neurons.shape[0] == 30 * 1536
    cands = ns.pruning_candidates(model, threshold_percentile=10)
    assert len(cands) > 0
    b = ns.batch_analysis(model, [(3, 5), (4, 7)], ns.EXAMPLE_TEXTS[:2])
    assert len(b.individual) == 2
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(t[:400] for t in ns.evaluation_texts()[:2]) + "\n")
    out = tmp_path / "report"
    rc = cli.main(
        [
            "analyze",
            "--model",
            "hooked:default",
            "--texts",
            str(texts),
            "--out",
            str(out),
            "--n-candidates",
            "2",
            "--max-texts",
            "2",
        ]
    )
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert report
    assert FP32_EPS > 0
