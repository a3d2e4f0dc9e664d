"""Exact ablation on the model's tail: equal to the naive one-run-per-neuron simulate_pruning, for both MLP kinds."""

from __future__ import annotations

import pytest
import torch

import neuronscope_tl as ns
from neuronscope_tl import ablation, hooks
from neuronscope_tl.texts import tokenize

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Prices rose sharply on Monday, the agency said."]
PAIRS = [(2, 7), (0, 1), (1, 5), (2, 3), (0, 30), (2, 0), (1, 40)]  # uneven per layer, given out of layer order

@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on a shared, loaded 2-core machine two OpenMP threads can make
    each tiny matmul 100x slower (barrier waits)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)



def test_tail_from_layer_zero_reproduces_the_model(tiny_model):
    ids = tokenize(tiny_model, TEXTS[:1])[0][None]
    store: dict = {}
    with torch.no_grad():
        with hooks.attached_hooks(tiny_model, [("blocks.0.hook_resid_pre", hooks.capture_hook(store, "r"))]):
            logits = tiny_model(ids)
        tail = ablation.model_tail(tiny_model)
        mine = tail.head(tail.norm(ablation.run_body(tail, store["r"], 0)))
    torch.testing.assert_close(mine, logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["zero", "mean"])
def test_matches_naive_simulate_pruning(tiny_model, mode):
    before = hooks.hook_count(tiny_model)
    df = ablation.ablate_each(tiny_model, PAIRS, TEXTS, mode, calib_texts=TEXTS, stack=2)
    assert hooks.hook_count(tiny_model) == before
    assert list(zip(df["layer"], df["neuron"])) == PAIRS  # rows in the given order
    for (layer, neuron), row in zip(PAIRS, df.itertuples()):
        naive = ns.simulate_pruning(tiny_model, layer, [neuron], TEXTS, mode, calib_texts=TEXTS)
        assert row.loss_change == pytest.approx(naive.loss_change, abs=1e-4)
        assert row.kl == pytest.approx(naive.impact_score, abs=1e-4)
        assert row.loss_original == pytest.approx(naive.loss_original, abs=1e-5)
    assert df["kl"].gt(0).all()  # every ablation changed something, so the check above has teeth


@pytest.mark.default_model
def test_default_model_matches_naive(default_model):
    pairs = [(29, 5), (3, 100), (15, 1535)]
    df = ablation.ablate_each(default_model, pairs, TEXTS[:1])
    for (layer, neuron), row in zip(pairs, df.itertuples()):
        naive = ns.simulate_pruning(default_model, layer, [neuron], TEXTS[:1])
        assert row.loss_change == pytest.approx(naive.loss_change, abs=1e-4)
        assert row.kl == pytest.approx(naive.impact_score, abs=1e-4)


@pytest.mark.parametrize("tiny_kind", ["llama"])
def test_bad_input(tiny_model):
    with pytest.raises(ValueError, match="unknown ablation"):
        ablation.ablate_each(tiny_model, [(0, 1)], TEXTS, "half")
    with pytest.raises(ValueError, match="out of range"):
        ablation.ablate_each(tiny_model, [(0, 10_000)], TEXTS)
    with pytest.raises(ValueError, match="out of range"):
        ablation.ablate_each(tiny_model, [(7, 1)], TEXTS)
    with pytest.raises(ValueError, match="at least one"):
        ablation.ablate_each(tiny_model, [], TEXTS)
    with pytest.raises(ValueError, match="non-empty"):
        ablation.ablate_each(tiny_model, [(0, 1)], [])
    with pytest.raises(ValueError, match="stack"):
        ablation.ablate_each(tiny_model, [(0, 1)], TEXTS, stack=0)


@pytest.mark.parametrize("tiny_kind", ["gpt2"])
def test_exception_in_the_tail_leaves_no_hooks(tiny_model, monkeypatch):
    before = hooks.hook_count(tiny_model)

    def boom(*args, **kwargs):
        assert hooks.hook_count(tiny_model) > before
        raise RuntimeError("interrupted")

    monkeypatch.setattr(ablation, "run_body", boom)
    with pytest.raises(RuntimeError, match="interrupted"):
        ablation.ablate_each(tiny_model, PAIRS, TEXTS)
    assert hooks.hook_count(tiny_model) == before
    assert all(p.grad is None for p in tiny_model.parameters())
