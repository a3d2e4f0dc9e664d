"""Pruning curves: perplexity against sparsity for each registered method, against a random baseline.

:func:`prune_curve` calibrates once (:func:`~neuronscope_tl.selection.calibrate`: one scoring pass serves every
method of :mod:`neuronscope_tl.scores`), selects each point's neurons (:func:`~neuronscope_tl.selection.build_spec`)
and measures it on the evaluation protocol's windows (:mod:`neuronscope_tl.evaluation`), with pruning simulated
through hooks (the core's :func:`~neuronscope_tl.impact.make_plan` / :func:`~neuronscope_tl.hooks.ablation_hooks`,
via :func:`~neuronscope_tl.surgery.simulation_hooks`). Random methods run once per seed and are reported as mean
and min-max spread (the baseline of Santacroce et al. 2023). ``precision="auto"`` uses bf16 autocast only after
measuring that dense bf16 is within 0.5% of fp32. :func:`recommend` names the best (method, ablation) of a curve.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Union

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from . import scores as registry
from .activations import DEFAULT_CALIB_TOKENS
from .evaluation import DEFAULT_EVERY, DEFAULT_WINDOW, check_seeds, eval_windows, protocol_record, window_nll
from .export import Result
from .impact import check_ablation
from .metrics import perplexity
from .selection import Calibration, build_spec, calibrate, check_scope, check_sparsities
from .surgery import simulation_hooks
from .texts import check_max_tokens, show

DEFAULT_SPARSITIES = (0.1, 0.2, 0.3, 0.5)
RANDOM_SEEDS = (0, 1, 2)
BF16_TOLERANCE = 0.005
# The best method on its own curve of the default model (README, benchmarks/bench_curves_result.json).
RECOMMENDED_METHOD = "obs"
RECOMMENDED_ABLATION = "mean"


@dataclass
class CurveResult(Result):
    """A pruning curve.

    Attributes:
        table: one row per (method, sparsity, scope, ablation): perplexity (random methods: mean over seeds),
            ratio = perplexity / dense, perplexity_min / perplexity_max / n_seeds.
        runs: every evaluated run, random seeds separately.
        dense_perplexity: the unpruned model on the same windows and precision.
        dense_fp32 / dense_bf16: the dense check that decides the precision (bf16 only within 0.5%).
        recommended: the best (method, ablation) on this curve: lowest mean log-perplexity over the sparsities.
        protocol: the evaluation protocol (see :func:`~neuronscope_tl.evaluation.evaluate_perplexity`).
    """

    table: pd.DataFrame
    runs: pd.DataFrame
    dense_perplexity: float
    dense_fp32: float
    dense_bf16: Optional[float]
    recommended: dict
    protocol: dict
    timings: dict = field(default_factory=dict)


def prune_curve(
    model,
    methods: Optional[Sequence[str]] = None,
    sparsities: Sequence[float] = DEFAULT_SPARSITIES,
    scope: str = "per_layer",
    ablation: Union[str, Sequence[str]] = "zero",
    calib_texts: Optional[Sequence[str]] = None,
    eval_texts: Optional[Sequence[str]] = None,
    calib_tokens: int = DEFAULT_CALIB_TOKENS,
    window: int = DEFAULT_WINDOW,
    every: int = DEFAULT_EVERY,
    seeds: Sequence[int] = RANDOM_SEEDS,
    precision: str = "auto",
    calibration: Optional[Calibration] = None,
    progress: bool = False,
    on_run: Optional[Callable[[dict], None]] = None,
) -> CurveResult:
    """Perplexity against sparsity for each method (and ablation), with pruning simulated through hooks.

    ``methods``: registered method names; None for every one. ``precision``: ``fp32``, ``bf16`` or ``auto`` (bf16
    when dense bf16 is within 0.5% of dense fp32). ``on_run`` is called with each run's row as soon as it is
    measured (progress reporting).
    """
    if methods is None:
        methods = registry.method_names()
    if isinstance(methods, str) or not isinstance(methods, (list, tuple)) or len(methods) == 0:
        raise ValueError(f"methods must be a non-empty list of {', '.join(registry.method_names())}; got {show(methods)}.")
    methods = [registry.check_method(m) for m in methods]
    sparsities = check_sparsities(sparsities)
    check_scope(scope)
    ablations = [ablation] if isinstance(ablation, str) else ablation
    if not isinstance(ablations, (list, tuple)) or len(ablations) == 0:
        raise ValueError(f"ablation must be zero, mean or a non-empty list of them; got {show(ablation)}.")
    ablations = [check_ablation(a) for a in ablations]
    seeds = check_seeds(seeds)
    calib_tokens = check_max_tokens(calib_tokens, "calib_tokens")
    if precision not in ("auto", "fp32", "bf16"):
        raise ValueError(f"precision must be one of auto, fp32, bf16; got {precision!r}.")
    t0 = time.perf_counter()
    wins = eval_windows(model, eval_texts, window, every)
    cal = calibration or calibrate(model, calib_texts, calib_tokens, with_grams=registry.needs_grams(methods))
    t_cal = time.perf_counter() - t0

    fp32 = perplexity(*window_nll(model, wins))
    bf16_ppl = perplexity(*window_nll(model, wins, bf16=True)) if precision != "fp32" else None
    use_bf16 = precision == "bf16" or (precision == "auto" and abs(bf16_ppl / fp32 - 1) < BF16_TOLERANCE)
    dense = bf16_ppl if use_bf16 else fp32

    runs = []
    jobs = [(m, s, a, seed) for a in ablations for m in methods for s in sparsities
            for seed in (seeds if registry.get(m).random else [0])]
    for method, sparsity, abl, seed in tqdm(jobs, desc="curve", disable=not progress):
        spec = build_spec(model, cal, method, sparsity, scope, abl, seed)
        hooks = simulation_hooks(spec) if spec is not None else []
        ppl = perplexity(*window_nll(model, wins, hooks, use_bf16))
        runs.append({"method": method, "sparsity": sparsity, "scope": scope, "ablation": abl, "seed": seed,
                     "n_pruned": spec.n_pruned if spec else 0, "perplexity": ppl})
        if on_run is not None:
            on_run(dict(runs[-1], dense=dense))
    runs_df = pd.DataFrame(runs)
    table = summarise_runs(runs_df, dense)
    protocol = protocol_record(model, wins, int(seeds[0]) if len(seeds) else 0, "bf16-autocast" if use_bf16 else "fp32", cal.record)
    protocol["random_seeds"] = list(seeds)
    return CurveResult(
        table=table, runs=runs_df, dense_perplexity=dense, dense_fp32=fp32, dense_bf16=bf16_ppl,
        recommended=recommend(table), protocol=protocol,
        timings={"calibration_s": t_cal, "total_s": time.perf_counter() - t0},
    )


def summarise_runs(runs: pd.DataFrame, dense: float) -> pd.DataFrame:
    """Collapse seeds: mean perplexity, min and max (the spread shown for random methods), ratio to dense."""
    keys = ["method", "sparsity", "scope", "ablation"]
    g = runs.groupby(keys, sort=False)["perplexity"]
    table = g.mean().rename("perplexity").reset_index()
    table["perplexity_min"] = g.min().to_numpy()
    table["perplexity_max"] = g.max().to_numpy()
    table["n_seeds"] = g.size().to_numpy()
    table["ratio"] = table["perplexity"] / dense
    return table


def recommend(table: pd.DataFrame) -> dict:
    """The (method, ablation) with the lowest mean log-perplexity over the curve's sparsities (random methods
    excluded)."""
    t = table[~table["method"].map(registry.is_random).astype(bool)].copy()
    if t.empty:
        return {}
    t["log_ppl"] = np.log(t["perplexity"])
    best = t.groupby(["method", "ablation"])["log_ppl"].mean().idxmin()
    return {"method": best[0], "ablation": best[1]}
