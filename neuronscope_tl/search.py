"""The pruning search: the largest sparsity whose held-out perplexity stays within a loss budget.

:func:`search_pruning` grows the sparsity in steps, measuring each step on the evaluation protocol's windows
(:mod:`neuronscope_tl.evaluation`) with pruning simulated through hooks; a step over the budget is undone and the
step halved, down to ``min_step``. The result carries the chosen :class:`~neuronscope_tl.surgery.PruneSpec` for
:func:`~neuronscope_tl.surgery.prune_model`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import pandas as pd

from . import scores as registry
from .curves import RECOMMENDED_ABLATION, RECOMMENDED_METHOD
from .domains import TextSet
from .evaluation import (
    DEFAULT_EVERY,
    DEFAULT_WINDOW,
    domain_perplexities,
    domain_windows,
    eval_windows,
    geometric_mean,
    protocol_record,
    window_nll,
)
from .export import Result
from .impact import check_ablation
from .metrics import perplexity
from .selection import PRUNE_CALIB_TOKENS, Calibration, build_spec, calibrate_for, check_scope, check_sparsity
from .surgery import PruneSpec, simulation_hooks
from .texts import as_finite_real, check_max_tokens, show


def check_step(step: Any, name: str) -> float:
    """A search step: a real number in (0, 1)."""
    value = as_finite_real(step)
    if value is None or not 0.0 < value < 1.0:
        raise ValueError(f"{name} must be a number in (0, 1), got {show(step)}.")
    return value


def check_budget(loss_budget: Any) -> float:
    """The allowed relative perplexity increase: a finite number > 0."""
    value = as_finite_real(loss_budget)
    if value is None or not value > 0:
        raise ValueError(
            f"loss_budget must be a finite relative perplexity increase > 0 (e.g. 0.05 for +5%), got {show(loss_budget)}."
        )
    return value


@dataclass
class SearchResult(Result):
    """The largest pruning found within the budget.

    Attributes:
        sparsity: the chosen per-layer (or global) fraction of MLP neurons.
        neurons: {layer: pruned neurons} of the chosen set; spec: its :class:`PruneSpec` (for ``prune_model``).
        perplexity / dense_perplexity / budget_perplexity: measured, dense, and dense x (1 + loss_budget).
        steps: every evaluated sparsity with its perplexity and whether it was accepted.
    """

    method: str
    ablation: str
    scope: str
    loss_budget: float
    sparsity: float
    perplexity: float
    dense_perplexity: float
    budget_perplexity: float
    steps: pd.DataFrame
    neurons: Dict[int, List[int]] = field(repr=False, default_factory=dict)
    spec: Optional[PruneSpec] = field(repr=False, default=None)
    protocol: dict = field(default_factory=dict)


def search_pruning(
    model,
    loss_budget: float = 0.05,
    method: str = RECOMMENDED_METHOD,
    ablation: str = RECOMMENDED_ABLATION,
    scope: str = "per_layer",
    step: float = 0.05,
    min_step: float = 0.0125,
    max_sparsity: float = 0.9,
    calib_texts: Optional[Sequence[str]] = None,
    eval_texts: Optional[Sequence[str]] = None,
    calib_tokens: int = PRUNE_CALIB_TOKENS,
    window: int = DEFAULT_WINDOW,
    every: int = DEFAULT_EVERY,
    bf16: bool = True,
    calibration: Optional[Calibration] = None,
    domains: Optional[Sequence[TextSet]] = None,
) -> SearchResult:
    """Grow the sparsity in steps of ``step``, re-evaluating after each; when a step goes over the budget, back off
    and halve the step, until it is below ``min_step``.

    ``loss_budget`` is the allowed relative perplexity increase on the held-out windows (0.05 = +5%). With
    ``domains`` (named evaluation sets) the budget applies to the geometric mean over the out-of-domain sets (all
    sets when none is out-of-domain), and each step records every set's ratio to dense.
    """
    budget = check_budget(loss_budget)
    registry.check_method(method)
    check_scope(scope)
    check_ablation(ablation)
    step, min_step = check_step(step, "step"), check_step(min_step, "min_step")
    if min_step > step:
        raise ValueError(f"min_step must be in (0, step] = (0, {step}], got {show(min_step)}.")
    max_sparsity = check_sparsity(max_sparsity, "max_sparsity")
    calib_tokens = check_max_tokens(calib_tokens, "calib_tokens")
    sets = domain_windows(model, domains, window) if domains is not None else None
    wins = eval_windows(model, eval_texts, window, every) if sets is None else sets[0].wins
    judged = None if sets is None else ([d for d in sets if not d.in_domain] or sets)
    cal = calibration or calibrate_for(model, [method], calib_texts, calib_tokens)

    def measure(hooks) -> Tuple[float, dict]:
        """The perplexity the budget applies to, and each set's perplexity."""
        if sets is None:
            return perplexity(*window_nll(model, wins, hooks, bf16)), {}
        ppl = domain_perplexities(model, sets, hooks, bf16)
        return geometric_mean([ppl[d.name] for d in judged]), ppl

    dense, dense_sets = measure([])
    limit = dense * (1 + budget)
    current, best_ppl, best_spec, steps = 0.0, dense, None, []
    while step >= min_step:
        trial = round(current + step, 6)
        if trial > max_sparsity:
            step /= 2
            continue
        spec = build_spec(model, cal, method, trial, scope, ablation)
        ppl, per_set = measure(simulation_hooks(spec)) if spec else (dense, dense_sets)
        ok = ppl <= limit
        steps.append(
            {
                "sparsity": trial,
                "perplexity": ppl,
                "ratio": ppl / dense,
                "accepted": ok,
                **{f"ratio_{name}": value / dense_sets[name] for name, value in per_set.items()},
            }
        )
        if ok:
            current, best_ppl, best_spec = trial, ppl, spec
        else:
            step /= 2
    return SearchResult(
        method=method,
        ablation=ablation,
        scope=scope,
        loss_budget=budget,
        sparsity=current,
        perplexity=best_ppl,
        dense_perplexity=dense,
        budget_perplexity=limit,
        steps=pd.DataFrame(steps),
        neurons=best_spec.neurons if best_spec else {},
        spec=best_spec,
        protocol={
            **protocol_record(model, wins, 0, "bf16-autocast" if bf16 else "fp32", cal.record),
            **({"domains": [d.wins.texts for d in sets], "budget_on": [d.name for d in judged]} if sets else {}),
        },
    )
