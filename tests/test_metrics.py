"""Metric definitions against direct numpy computations."""

import numpy as np
import pytest
import torch

from neuronscope_tl import metrics


def test_token_kl_matches_numpy():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 5, 17, generator=g) * 3, torch.randn(2, 5, 17, generator=g) * 3
    p = torch.softmax(a.double(), -1).numpy()
    q = torch.softmax(b.double(), -1).numpy()
    expected = (p * (np.log(p) - np.log(q))).sum(-1)
    np.testing.assert_allclose(metrics.token_kl(a, b).numpy(), expected, rtol=1e-4, atol=1e-6)
    assert torch.all(metrics.token_kl(a, a) < 1e-6)


def test_token_nll_matches_numpy():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 6, 11, generator=g)
    tokens = torch.randint(0, 11, (2, 6), generator=g)
    p = torch.softmax(logits.double(), -1).numpy()
    expected = -np.log(np.take_along_axis(p[:, :-1], tokens[:, 1:, None].numpy(), -1))[..., 0]
    np.testing.assert_allclose(metrics.token_nll(logits, tokens).numpy(), expected, rtol=1e-5)
    # the same as torch's cross entropy, a third way
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 11), tokens[:, 1:].reshape(-1), reduction="none")
    np.testing.assert_allclose(metrics.token_nll(logits, tokens).reshape(-1).numpy(), ce.numpy(), rtol=1e-5)


def test_top1_agreement():
    a = torch.tensor([[[1.0, 2.0, 0.0], [3.0, 0.0, 0.0]]])
    b = torch.tensor([[[0.0, 5.0, 0.0], [0.0, 1.0, 0.0]]])
    assert metrics.top1_agree(a, b).tolist() == [[1.0, 0.0]]


@pytest.mark.parametrize("impact,verdict", [(0.0, "safe"), (0.0999, "safe"), (0.1, "moderate"), (0.2999, "moderate"), (0.3, "high"), (5.0, "high")])
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
    assert m.mean == pytest.approx(2.0) and m.count == 3
