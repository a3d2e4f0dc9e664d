"""Pruning curves: perplexity against sparsity for each registered method, against a random baseline.

:func:`prune_curve` calibrates once (:func:`~neuronscope_tl.selection.calibrate`: one scoring pass serves every
method of :mod:`neuronscope_tl.scores`; or the windows of sequential calibration), prunes each point by its recipe
(:func:`~neuronscope_tl.recipes.recipe_spec`) and measures it on the evaluation protocol's windows
(:mod:`neuronscope_tl.evaluation`), with pruning simulated through hooks (the core's
:func:`~neuronscope_tl.impact.make_plan` / :func:`~neuronscope_tl.hooks.ablation_hooks`, via
:func:`~neuronscope_tl.surgery.simulation_hooks`). Random methods run once per seed and are reported as mean and
min-max spread (the baseline of Santacroce et al. 2023). ``precision="auto"`` uses bf16 autocast only after
measuring that dense bf16 is within 0.5% of fp32. :func:`recommend` names the best (method, ablation) of a curve.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from . import scores as registry
from .domains import TextSet
from .evaluation import (
    DEFAULT_EVERY,
    DEFAULT_WINDOW,
    check_seeds,
    domain_perplexities,
    domain_summary,
    domain_windows,
    eval_windows,
    geometric_mean,
    protocol_record,
    window_nll,
)
from .export import Result
from .distill import DEFAULT_DISTILL_LR
from .recipes import (
    DISTILL_TOKENS,
    RECOMMENDED,
    Recipe,
    check_recipe_scope,
    distill_windows,
    recipe_spec,
    recipe_windows,
    resolve_recipe,
)
from .impact import check_ablation
from .metrics import perplexity
from .selection import PRUNE_CALIB_TOKENS, Calibration, calibrate_for, check_scope, check_sparsities
from .surgery import simulation_hooks
from .texts import check_max_tokens, show

DEFAULT_SPARSITIES = (0.1, 0.2, 0.3, 0.5)
# Windows of each evaluation domain that a curve point is measured on (a prune report measures 12): with the
# default methods and the recommended ablation, a whole curve of the default model takes about 7 minutes on 2 cores.
CURVE_DOMAIN_WINDOWS = 4
RANDOM_SEEDS = (0, 1, 2)
BF16_TOLERANCE = 0.005
# The recommended recipe's method and ablation (neuronscope_tl.recipes.RECOMMENDED, chosen on out-of-domain text).
RECOMMENDED_METHOD = RECOMMENDED.method
RECOMMENDED_ABLATION = RECOMMENDED.ablation


def curve_methods() -> List[str]:
    """The methods a curve measures unless told: every registered method that needs no gradients. The gradient pass
    that ``taylor`` needs triples the calibration time; ask for it by name."""
    return [s.name for s in registry.registered() if s.needs != "gradients"]


def resolve_method(method: Optional[str], ablation: Optional[str]) -> Tuple[str, str]:
    """(method, ablation) with the recommendation filled in (:func:`~neuronscope_tl.recipes.resolve_recipe`): no
    method means the recommended method and, unless given, its ablation; a given method without an ablation means
    zero ablation."""
    recipe = resolve_recipe(method, ablation)
    return recipe.method, recipe.ablation


@dataclass
class CurveResult(Result):
    """A pruning curve.

    Attributes:
        table: one row per (method, sparsity, scope, ablation): perplexity (random methods: mean over seeds),
            ratio = perplexity / dense, perplexity_min / perplexity_max / n_seeds.
        runs: every evaluated run, random seeds separately.
        dense_perplexity: the unpruned model on the same windows and precision.
        dense_fp32 / dense_bf16: the dense check that decides the precision (bf16 only within 0.5%).
        recommended: the best (method, ablation) on this curve, and on which data it was chosen: with evaluation
            domains, the lowest mean log of the out-of-domain ratio (geometric mean over the sets the calibration
            never saw); otherwise the lowest mean log-perplexity over the sparsities.
        protocol: the evaluation protocol (see :func:`~neuronscope_tl.evaluation.evaluate_perplexity`); with
            domains, ``domains`` lists every set with its source, licence, token count and hash.
        domains: with evaluation domains, one row per (method, sparsity, scope, ablation, domain): perplexity
            (mean over seeds), dense perplexity of that domain and their ratio. The table then also holds
            ``ratio_in_domain`` / ``ratio_out_of_domain``: geometric means of those ratios, and ``perplexity`` /
            ``ratio`` are geometric means over all domains.
    """

    table: pd.DataFrame
    runs: pd.DataFrame
    dense_perplexity: float
    dense_fp32: float
    dense_bf16: Optional[float]
    recommended: dict
    protocol: dict
    timings: dict = field(default_factory=dict)
    domains: Optional[pd.DataFrame] = None


def prune_curve(
    model,
    methods: Optional[Sequence[str]] = None,
    sparsities: Sequence[float] = DEFAULT_SPARSITIES,
    scope: str = "per_layer",
    ablation: Union[str, Sequence[str]] = "zero",
    calib_texts: Optional[Sequence[str]] = None,
    eval_texts: Optional[Sequence[str]] = None,
    calib_tokens: int = PRUNE_CALIB_TOKENS,
    window: int = DEFAULT_WINDOW,
    every: int = DEFAULT_EVERY,
    seeds: Sequence[int] = RANDOM_SEEDS,
    precision: str = "auto",
    calibration: Optional[Calibration] = None,
    progress: bool = False,
    on_run: Optional[Callable[[dict], None]] = None,
    domains: Optional[Sequence[TextSet]] = None,
    domain_windows_max: int = CURVE_DOMAIN_WINDOWS,
    sequential: bool = False,
    refit: Union[str, float, None] = "auto",
    distill: int = 0,
    distill_tokens: int = DISTILL_TOKENS,
    calib_sources: Optional[Dict[str, Sequence[str]]] = None,
) -> CurveResult:
    """Perplexity against sparsity for each method (and ablation), with pruning simulated through hooks.

    ``methods``: registered method names; None for :func:`curve_methods`. ``precision``: ``fp32``, ``bf16`` or ``auto`` (bf16
    when dense bf16 is within 0.5% of dense fp32). ``on_run`` is called with each run's row as soon as it is
    measured (progress reporting). ``domains``: named evaluation sets (:mod:`neuronscope_tl.domains`), each
    measured separately on up to ``domain_windows_max`` windows, instead of ``eval_texts``.

    ``sequential=True`` selects and refits every point layer by layer on the model pruned so far
    (:mod:`neuronscope_tl.sequential`), calibrating on ``calib_tokens`` tokens of ``calib_sources`` ({name: texts},
    one fold per source; default: the calibration parts of the default domains) or of ``calib_texts`` (one source
    in four folds); ``refit`` is its damping (``"auto"``: chosen per layer on held-out folds; a number; None for no
    refit on methods without one). ``distill``: epochs of distillation of every point's kept output weights on
    ``distill_tokens`` tokens of the same sources (:func:`~neuronscope_tl.recipes.distill_windows`; 0: none).
    """
    if methods is None:
        methods = curve_methods()
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
    sets = domain_windows(model, domains, window, domain_windows_max) if domains is not None else None
    wins = eval_windows(model, eval_texts, window, every) if sets is None else None
    # Each point is pruned by its (method, ablation) recipe; a one-shot point keeps the method's own refit.
    mode = "sequential" if sequential else "oneshot"
    recipes = {(m, a): Recipe(m, a, mode, refit if sequential else None, distill) for a in ablations for m in methods}
    for recipe in recipes.values():
        check_recipe_scope(recipe, scope)
    seq_windows = recipe_windows(model, calib_texts, calib_sources, calib_tokens) if sequential else None
    # Distilled points (distill epochs) train on distill_tokens tokens of the same sources, as prune does.
    train = distill_windows(model, calib_texts, calib_sources, calib_tokens, distill_tokens) if distill else None
    cal = None if sequential else calibration or calibrate_for(model, methods, calib_texts, calib_tokens)
    t_cal = time.perf_counter() - t0

    def measure(hooks, bf16: bool) -> Dict[str, float]:
        if sets is None:
            return {"": perplexity(*window_nll(model, wins, hooks, bf16))}
        return domain_perplexities(model, sets, hooks, bf16)

    fp32 = measure([], False)
    bf16_ppl = measure([], True) if precision != "fp32" else None
    use_bf16 = precision == "bf16" or (precision == "auto" and all(abs(bf16_ppl[k] / fp32[k] - 1) < BF16_TOLERANCE for k in fp32))
    dense = bf16_ppl if use_bf16 else fp32

    runs, domain_runs = [], []
    jobs = [
        (m, s, a, seed)
        for a in ablations
        for m in methods
        for s in sparsities
        for seed in (seeds if registry.get(m).random else [0])
    ]
    for method, sparsity, abl, seed in tqdm(jobs, desc="curve", disable=not progress):
        spec, _ = recipe_spec(
            model,
            recipes[method, abl],
            sparsity,
            scope,
            calibration=cal,
            windows=seq_windows,
            seed=seed,
            bf16=use_bf16,
            train_windows=train,
        )
        hooks = simulation_hooks(spec) if spec is not None else []
        ppl = measure(hooks, use_bf16)
        row = {
            "method": method,
            "sparsity": sparsity,
            "scope": scope,
            "ablation": abl,
            "seed": seed,
            "n_pruned": spec.n_pruned if spec else 0,
            "perplexity": geometric_mean(ppl.values()),
        }
        if sets is not None:
            summary = domain_summary(ppl, dense, sets)
            row.update(ratio_in_domain=summary["in_domain"], ratio_out_of_domain=summary["out_of_domain"])
            domain_runs += [
                {
                    **{k: row[k] for k in ("method", "sparsity", "scope", "ablation", "seed")},
                    "domain": d.name,
                    "in_domain": d.in_domain,
                    "perplexity": ppl[d.name],
                    "dense": dense[d.name],
                }
                for d in sets
            ]
        runs.append(row)
        if on_run is not None:
            on_run(dict(row, dense=geometric_mean(dense.values())))
    runs_df = pd.DataFrame(runs)
    dense_all = geometric_mean(dense.values())
    table = summarise_runs(runs_df, dense_all)
    per_domain = None
    if sets is not None:
        keys = ["method", "sparsity", "scope", "ablation"]
        extra = (
            runs_df.groupby(keys, sort=False)[["ratio_in_domain", "ratio_out_of_domain"]]
            .agg(lambda v: geometric_mean(v) if v.notna().all() else None)
            .reset_index()
        )
        table = table.merge(extra, on=keys, how="left")
        d = pd.DataFrame(domain_runs)
        per_domain = (
            d.groupby(keys + ["domain", "in_domain"], sort=False)
            .agg(perplexity=("perplexity", "mean"), dense=("dense", "first"))
            .reset_index()
        )
        per_domain["ratio"] = per_domain["perplexity"] / per_domain["dense"]
    first = wins if sets is None else sets[0].wins
    precision_name = "bf16-autocast" if use_bf16 else "fp32"
    calib_record = {"mode": "sequential", "refit": refit, **seq_windows.record} if sequential else dict(cal.record)
    if distill:  # every point's output weights trained on these windows (neuronscope_tl.distill)
        calib_record["distillation"] = {"epochs": distill, "lr": DEFAULT_DISTILL_LR, "windows": train.record}
    protocol = protocol_record(model, first, int(seeds[0]) if len(seeds) else 0, precision_name, calib_record)
    protocol["random_seeds"] = list(seeds)
    if sets is not None:
        protocol["eval_texts"] = None
        protocol["domains"] = [d.wins.texts for d in sets]
        protocol["windows_per_domain"] = domain_windows_max
        protocol["n_tokens_scored"] = sum(d.wins.n_scored for d in sets)
        protocol["n_windows"] = sum(len(d.wins.tokens) for d in sets)
    fp32_all = geometric_mean(fp32.values())
    return CurveResult(
        table=table,
        runs=runs_df,
        dense_perplexity=dense_all,
        dense_fp32=fp32_all,
        dense_bf16=geometric_mean(bf16_ppl.values()) if bf16_ppl else None,
        recommended=recommend(table),
        protocol=protocol,
        timings={"calibration_s": t_cal, "total_s": time.perf_counter() - t0},
        domains=per_domain,
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
    """The best (method, ablation) of a curve (random methods excluded), and the data it was chosen on.

    With a ``ratio_out_of_domain`` column (a curve over evaluation domains), the lowest mean over the sparsities
    of the log out-of-domain ratio: the choice is made on text the calibration never saw. Otherwise the lowest
    mean log-perplexity over the sparsities of the single evaluation set.
    """
    t = table[~table["method"].map(registry.is_random).astype(bool)].copy()
    if t.empty:
        return {}
    ood = "ratio_out_of_domain" in t and t["ratio_out_of_domain"].notna().all()
    t["key"] = np.log(t["ratio_out_of_domain"].astype(float)) if ood else np.log(t["perplexity"])
    best = t.groupby(["method", "ablation"])["key"].mean().idxmin()
    return {"method": best[0], "ablation": best[1], "chosen_on": "out_of_domain" if ood else "evaluation_set"}
