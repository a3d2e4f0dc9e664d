"""Metric definitions, each defined once and used by the library, CLI, REST API, UI and benchmarks.

* **KL (the impact score)**: for each position t, ``KL(P_orig(.|x_<=t) || P_pruned(.|x_<=t))`` in nats, over the
  full next-token vocabulary; the impact score is its mean over all real (non-pad) positions.
* **Loss change**: mean next-token cross-entropy of the pruned model minus that of the original, over every
  position that has a real next token. Positive = pruning hurts.
* **Top-1 agreement**: fraction of real positions where the pruned model's arg-max next token equals the
  original's.
* **Relative residual change** of block k: ``||R_pruned - R_orig||_F / ||R_orig||_F`` over all real positions of
  ``blocks.{k}.hook_resid_post``.
* **Verdict**: ``safe`` if impact < safe_below (0.1), ``moderate`` if < risky_from (0.3), else ``high``
  (NeuronScope's interpretation guideline).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .texts import as_finite_real, show

SAFE = "safe"
MODERATE = "moderate"
HIGH = "high"


def log_probs(logits: Tensor) -> Tensor:
    """Next-token log-probabilities in fp32 (float64 for a float64 model)."""
    return F.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)


def kl_from_log_probs(logp_orig: Tensor, logp_pruned: Tensor) -> Tensor:
    """Per-position KL(P_orig || P_pruned) = sum_v p_orig (log p_orig - log p_pruned), in nats."""
    return F.kl_div(logp_pruned, logp_orig, reduction="none", log_target=True).sum(-1).clamp_min(0.0)


def token_kl(logits_orig: Tensor, logits_pruned: Tensor) -> Tensor:
    """Per-position KL(P_orig || P_pruned) in nats: [..., vocab] -> [...]. Computed in fp32."""
    return kl_from_log_probs(log_probs(logits_orig), log_probs(logits_pruned))


def nll_from_log_probs(logp: Tensor, tokens: Tensor) -> Tensor:
    """Per-position next-token cross-entropy: log-probs [b, p, v], tokens [b, p] -> [b, p-1] (p predicts p+1)."""
    return -logp[:, :-1].gather(-1, tokens[:, 1:, None].to(logp.device)).squeeze(-1)


def token_nll(logits: Tensor, tokens: Tensor) -> Tensor:
    """Per-position next-token cross-entropy from logits [b, p, v] and tokens [b, p] -> [b, p-1]."""
    return nll_from_log_probs(log_probs(logits), tokens)


def top1_agree(logits_orig: Tensor, logits_pruned: Tensor) -> Tensor:
    """Per-position 1.0 where both arg-max next tokens agree, else 0.0 (logits or log-probs alike)."""
    return (logits_orig.argmax(-1) == logits_pruned.argmax(-1)).float()


def perplexity(total_nll: float, n_tokens: int) -> float:
    return math.exp(total_nll / max(n_tokens, 1))


@dataclass
class ImpactThresholds:
    """Verdict thresholds on the impact score (mean per-token KL, nats).

    Args:
        safe_below: impact strictly below this is ``safe`` (seed guideline 0.1).
        risky_from: impact at or above this is ``high`` (seed guideline 0.3); in between is ``moderate``.
    """

    safe_below: float = 0.1
    risky_from: float = 0.3

    def __post_init__(self):
        safe, risky = as_finite_real(self.safe_below), as_finite_real(self.risky_from)
        if safe is None or risky is None:  # also integers too large for a float: float() would overflow
            raise ValueError(
                f"verdict thresholds must be finite numbers with 0 < safe_below <= risky_from, got "
                f"safe_below={show(self.safe_below)}, risky_from={show(self.risky_from)}."
            )
        if not (0.0 < safe <= risky):
            raise ValueError(
                f"verdict thresholds must satisfy 0 < safe_below <= risky_from, got safe_below={show(self.safe_below)}, "
                f"risky_from={show(self.risky_from)}."
            )
        self.safe_below, self.risky_from = safe, risky

    def verdict(self, impact: float) -> str:
        if impact < self.safe_below:
            return SAFE
        if impact < self.risky_from:
            return MODERATE
        return HIGH


class RunningMean:
    """Sum and count of per-position values over masked positions; mergeable."""

    def __init__(self):
        self.total = 0.0
        self.count = 0

    def add(self, values: Tensor, mask: Optional[Tensor] = None) -> None:
        if mask is not None:
            values = values[mask]
        self.total += float(values.double().sum())
        self.count += int(values.numel())

    def merge(self, other: "RunningMean") -> None:
        self.total += other.total
        self.count += other.count

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else float("nan")
