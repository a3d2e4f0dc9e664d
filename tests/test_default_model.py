"""Integration tests on the embedded default model (SmolLM2-135M-Instruct) and the Lee corpus."""

import re
from pathlib import Path

import numpy as np
import pytest
import torch

import neuronscope_tl as ns
from neuronscope_tl import cli

pytestmark = pytest.mark.default_model
README = Path(__file__).resolve().parents[1] / "README.md"


def test_lee_splits():
    arts = ns.lee_articles()
    assert len(arts) == 300
    cal, ev = ns.calibration_texts(), ns.evaluation_texts()
    assert (len(cal), len(ev)) == (200, 100)
    assert cal[0] == arts[0] and ev[0] == arts[200] and not set(cal) & set(ev)


def test_readme_seed_usage_runs_verbatim(default_model, tmp_path, monkeypatch, capsys):
    """The README's seed example, executed as written (it loads the default model itself)."""
    block = README.read_text().split("## Python usage (the seed's API)")[1]
    code = re.search(r"```python\n(.*?)```", block, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    out = capsys.readouterr().out
    assert "Overall sparsity:" in out and "Impact score:" in out and "Safe to prune:" in out
    assert namespace["sparsity"]["total_parameters"] == 134_515_008
    assert 0 <= namespace["result"]["impact_score"] < 10
    assert (tmp_path / "weight_analysis.json").is_file()


def test_default_zero_ablation_equals_hf_zeroed_weights(default_model):
    from transformers import AutoModelForCausalLM

    from neuronscope_tl.models import default_model_dir
    from conftest import zero_output_weights

    text = ns.evaluation_texts()[0][:200]
    layer, neurons = 7, [11, 500, 1400]
    r = ns.simulate_pruning(default_model, layer, neurons, text)
    hf = AutoModelForCausalLM.from_pretrained(str(default_model_dir()), attn_implementation="eager").eval()
    toks = default_model.to_tokens(text)
    with torch.no_grad():
        p = torch.softmax(hf(toks).logits[0].double(), -1)
        zero_output_weights(hf, layer, neurons)
        q = torch.softmax(hf(toks).logits[0].double(), -1)
    kl = (p * (p.log() - q.log())).sum(-1).mean().item()
    assert r.impact_score == pytest.approx(kl, rel=1e-3, abs=1e-6)
    assert r.n_tokens == toks.shape[1]


def test_default_cli_report(tmp_path):
    out = tmp_path / "r"
    assert cli.main(["analyze", "--out", str(out), "--max-texts", "1", "--n-candidates", "2"]) == 0
    assert (out / "report.json").is_file() and (out / "batch_analysis_cumulative.csv").is_file()
