"""Metric definitions against direct numpy computations."""

import numpy as np
import pytest
import torch

from neuronscope_tl import metrics

from conftest import kl_tolerance, nll_tolerance


def test_token_kl_matches_numpy():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 5, 17, generator=g) * 3, torch.randn(2, 5, 17, generator=g) * 3
    p = torch.softmax(a.double(), -1).numpy()
    q = torch.softmax(b.double(), -1).numpy()
    expected = (p * (np.log(p) - np.log(q))).sum(-1)
    # fp32 log-softmax, exp and vocabulary sum: the bound of conftest.kl_tolerance (exact inputs: eta = 0)
    tol = kl_tolerance(a, b, 0.0).numpy()
    assert (np.abs(metrics.token_kl(a, b).numpy() - expected) <= tol).all()
    reverse = (q * (np.log(q) - np.log(p))).sum(-1)
    assert (np.abs(reverse - expected) > 100 * tol).all()  # KL(P || Q), not KL(Q || P): the test tells them apart
    # KL(P || P) = 0 up to the same rounding (clamped at 0: never negative)
    same = metrics.token_kl(a, a).numpy()
    assert (same >= 0).all() and (same <= kl_tolerance(a, a, 0.0).numpy()).all()


def test_token_nll_matches_numpy():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 6, 11, generator=g)
    tokens = torch.randint(0, 11, (2, 6), generator=g)
    p = torch.softmax(logits.double(), -1).numpy()
    expected = -np.log(np.take_along_axis(p[:, :-1], tokens[:, 1:, None].numpy(), -1))[..., 0]
    # an fp32 log-softmax rounds each log-prob at its own magnitude: eps |log p| (conftest.nll_tolerance)
    tol = torch.stack([nll_tolerance(l, t, 0.0) for l, t in zip(logits, tokens)]).numpy()
    assert (np.abs(metrics.token_nll(logits, tokens).numpy() - expected) <= tol).all()
    # the same as torch's fp32 cross entropy, a third way: two fp32 computations, twice the bound
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 11), tokens[:, 1:].reshape(-1), reduction="none")
    assert (np.abs(metrics.token_nll(logits, tokens).reshape(-1).numpy() - ce.numpy()) <= 2 * tol.reshape(-1)).all()


def test_top1_agreement():
    a = torch.tensor([[[1.0, 2.0, 0.0], [3.0, 0.0, 0.0]]])
    b = torch.tensor([[[0.0, 5.0, 0.0], [0.0, 1.0, 0.0]]])
    assert metrics.top1_agree(a, b).tolist() == [[1.0, 0.0]]


@pytest.mark.parametrize(
    "impact,verdict", [(0.0, "safe"), (0.0999, "safe"), (0.1, "moderate"), (0.2999, "moderate"), (0.3, "high"), (5.0, "high")]
)
def test_default_verdicts(impact, verdict):
    assert metrics.ImpactThresholds().verdict(impact) == verdict


def test_custom_thresholds_and_validation():
    t = metrics.ImpactThresholds(safe_below=0.01, risky_from=0.02)
    assert [t.verdict(x) for x in (0.005, 0.015, 0.02)] == ["safe", "moderate", "high"]
    for bad in [(0.0, 0.3), (0.4, 0.3), (float("nan"), 0.3), (0.1, float("inf"))]:
        with pytest.raises(ValueError, match="safe_below"):
            metrics.ImpactThresholds(*bad)


def test_running_mean_masks():
    m = metrics.RunningMean()
    m.add(torch.tensor([[1.0, 2.0, 100.0]]), torch.tensor([[True, True, False]]))
    m.add(torch.tensor([3.0]))
    assert m.mean == 2.0 and m.count == 3  # (1 + 2 + 3) / 3 is exact in float64
