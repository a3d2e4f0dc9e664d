"""Bad input raises ValueError naming the valid range; no hook stays attached, logits stay bit-identical."""

import pytest
import torch

import neuronscope_tl as ns
from neuronscope_tl.hooks import hook_count

from conftest import probe_logits

OK = "The council met on Tuesday."
LONG = "word " * 400  # > 128 tokens, the tiny models' context


def cases(model):
    d_mlp = ns.mlp_info(model).d_mlp
    analyzer = ns.PruningImpactAnalyzer(model, model.tokenizer)
    return {
        "layer too high": (lambda: ns.simulate_pruning(model, 3, [0], OK), r"0\.\.2"),
        "layer negative": (lambda: ns.simulate_pruning(model, -1, [0], OK), r"0\.\.2"),
        "layer not int": (lambda: ns.simulate_pruning(model, 1.5, [0], OK), r"0\.\.2"),
        "neuron too high": (lambda: ns.simulate_pruning(model, 0, [d_mlp], OK), rf"0\.\.{d_mlp - 1}"),
        "neuron negative": (lambda: ns.simulate_pruning(model, 0, [-1], OK), rf"0\.\.{d_mlp - 1}"),
        "duplicate neurons": (lambda: ns.simulate_pruning(model, 0, [1, 1], OK), "duplicates"),
        "empty neurons": (lambda: ns.simulate_pruning(model, 0, [], OK), rf"at least one neuron in \[0, {d_mlp - 1}\]"),
        "empty text": (lambda: ns.simulate_pruning(model, 0, [1], ""), "empty or whitespace"),
        "whitespace text": (lambda: ns.simulate_pruning(model, 0, [1], " \n\t "), "empty or whitespace"),
        "empty text list": (lambda: ns.simulate_pruning(model, 0, [1], []), "non-empty list"),
        "text too long": (lambda: ns.simulate_pruning(model, 0, [1], LONG), r"1\.\.128"),
        "unknown ablation": (lambda: ns.simulate_pruning(model, 0, [1], OK, ablation="noise"), "zero, mean"),
        "batch size 0": (lambda: ns.simulate_pruning(model, 0, [1], OK, batch_size=0), ">= 1"),
        "threshold 0": (lambda: ns.pruning_candidates(model, 0), r"\(0, 100\]"),
        "threshold 101": (lambda: ns.WeightAnalyzer(model).identify_pruning_candidates(101), r"\(0, 100\]"),
        "threshold nan": (lambda: ns.pruning_candidates(model, float("nan")), r"\(0, 100\]"),
        "seed: neuron out of range": (lambda: analyzer.simulate_neuron_pruning(0, [d_mlp + 5], OK), "out of range"),
        "seed: empty text": (lambda: analyzer.simulate_neuron_pruning(0, [0], "   "), "empty"),
        "batch: empty candidates": (lambda: ns.batch_analysis(model, [], [OK]), "at least one"),
        "batch: candidate out of range": (
            lambda: ns.batch_analysis(model, [{"layer_index": 9, "neuron_index": 0}], [OK]),
            r"0\.\.2",
        ),
        "batch: duplicate candidates": (lambda: ns.batch_analysis(model, [(0, 1), (0, 1)], [OK]), "duplicates"),
        "batch: missing keys": (lambda: ns.batch_analysis(model, [{"layer": 0}], [OK]), "layer_index and neuron_index"),
        "batch: long text among good": (lambda: ns.batch_analysis(model, [(0, 1)], [OK, LONG]), "context"),
        "importance: bad layer": (lambda: ns.neuron_importance(model, [OK], layer_index=7), r"0\.\.2"),
        "importance: empty texts": (lambda: ns.neuron_importance(model, []), "non-empty"),
        "mean ablation: empty calibration": (
            lambda: ns.simulate_pruning(model, 0, [1], OK, ablation="mean", calib_texts=[""]),
            "empty",
        ),
        "export before analysis": (lambda: analyzer.export_impact_analysis("never.json"), "no impact analysis"),
    }


def test_each_bad_input_raises_and_changes_nothing(tiny_model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = probe_logits(tiny_model)
    for name, (call, pattern) in cases(tiny_model).items():
        with pytest.raises(ValueError, match=pattern):
            call()
        assert hook_count(tiny_model) == 0, name
    assert torch.equal(probe_logits(tiny_model), before)
    assert list(tmp_path.iterdir()) == []


def test_successful_analyses_leave_logits_bit_identical(tiny_model, tmp_path):
    before = probe_logits(tiny_model)
    params = [p.detach().clone() for p in tiny_model.parameters()]
    ns.analyze_weights(tiny_model)
    ns.simulate_pruning(tiny_model, 1, [0, 3], [OK, "Another text."], ablation="mean", calib_texts=[OK])
    ns.neuron_importance(tiny_model, [OK], progress=False)
    ns.batch_analysis(tiny_model, [(0, 1), (2, 2)], [OK], progress=False)
    assert torch.equal(probe_logits(tiny_model), before)
    assert all(torch.equal(a, b) for a, b in zip(params, tiny_model.parameters()))
    assert hook_count(tiny_model) == 0
