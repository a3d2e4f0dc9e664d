"""How to prune: a :class:`Recipe` (ranking method, ablation, calibration mode and refit), the recommended recipe,
and :func:`recipe_spec`, which turns a recipe and a sparsity into a :class:`~neuronscope_tl.surgery.PruneSpec`.

* ``method``: a registered ranking method (:mod:`neuronscope_tl.scores`).
* ``ablation``: ``zero``, or ``mean`` (the pruned neurons' mean activation folded into an output bias).
* ``calibration``: ``oneshot`` (every layer measured on the dense model, :func:`~neuronscope_tl.selection.calibrate`)
  or ``sequential`` (layer groups measured on the model pruned so far, :mod:`neuronscope_tl.sequential`).
* ``refit``: the least-squares refit of the kept output weights: ``auto`` (damping chosen per layer on held-out
  calibration folds; sequential only), a damping, or None (the method's own: ``obs`` refits at the default
  damping, the others do not refit).
* ``distill``: epochs of distillation of the kept output weights and biases against the dense model's next-token
  distributions (:mod:`neuronscope_tl.distill`), after selection and refit, on :func:`distill_windows`; 0: none.

:data:`RECOMMENDED` is the recipe the command line and the app use when no method is given. It was chosen on the
out-of-domain evaluation sets (text from sources the calibration never saw) by ``benchmarks/bench_domains.py``;
the README's per-domain table holds the numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Dict, Optional, Sequence, Tuple, Union

from . import scores as registry
from .distill import check_epochs, distill_spec
from .impact import check_ablation
from .obs import DEFAULT_DAMP
from .selection import PRUNE_CALIB_TOKENS, Calibration, build_spec, calibrate_for, check_scope, check_sparsity
from .sequential import (
    CalibrationWindows,
    calibration_windows,
    check_refit,
    check_sequential_method,
    check_sequential_scope,
    sequential_sources,
    sequential_spec,
)
from .surgery import PruneSpec
from .texts import check_int, show

CALIBRATION_MODES = ("oneshot", "sequential")
# Calibration tokens of the recommended recipe (selection.PRUNE_CALIB_TOKENS).
RECOMMENDED_CALIB_TOKENS = PRUNE_CALIB_TOKENS
# Tokens distillation trains on, from the same sources (the calibration windows first). Measured on the default
# model (benchmarks/bench_domains.py): 65,536 beat 32,768 on every evaluation set for 2.3x the training time.
DISTILL_TOKENS = 65536


def check_calibration_mode(mode: str) -> str:
    if mode not in CALIBRATION_MODES:
        raise ValueError(f"unknown calibration mode {show(mode)}; valid modes are {', '.join(CALIBRATION_MODES)}.")
    return mode


def parse_refit(value) -> Union[str, float, None]:
    """A refit setting from the command line or the API: ``auto``, ``none``/None, or a positive damping."""
    if value is None or (isinstance(value, str) and value.strip().lower() == "none"):
        return None
    if isinstance(value, str) and value.strip().lower() != "auto":
        try:
            value = float(value)
        except ValueError:
            raise ValueError(f"refit must be auto, none or a positive damping such as 0.01, got {value!r}.") from None
    return check_refit(value.strip().lower() if isinstance(value, str) else value)


@dataclass(frozen=True)
class Recipe:
    """How neurons are chosen and what makes up for them (see the module docstring)."""

    method: str
    ablation: str = "zero"
    calibration: str = "oneshot"
    refit: Union[str, float, None] = None
    distill: int = 0

    def __post_init__(self):
        registry.check_method(self.method)
        object.__setattr__(self, "distill", check_epochs(self.distill))
        check_ablation(self.ablation)
        check_calibration_mode(self.calibration)
        object.__setattr__(self, "refit", parse_refit(self.refit))
        if self.calibration == "sequential":
            check_sequential_method(self.method)
        elif self.refit == "auto":
            raise ValueError(
                "refit 'auto' chooses the damping on held-out calibration folds, which only sequential "
                "calibration keeps; use calibration 'sequential' or a damping such as 0.01."
            )

    def describe(self) -> str:
        refit = {
            None: "no refit" if not registry.get(self.method).refit else f"refit (damping {DEFAULT_DAMP})",
            "auto": "refit (damping chosen on held-out folds)",
        }.get(self.refit, f"refit (damping {self.refit})")
        distill = f", distilled for {self.distill} epoch{'s' if self.distill > 1 else ''}" if self.distill else ""
        return f"{self.method}, {self.ablation} ablation, {self.calibration} calibration, {refit}{distill}"


# The recommendation: best geometric-mean perplexity ratio on the out-of-domain sets at 20% per layer
# (benchmarks/bench_domains.py; README "Pruning that holds off its calibration domain").
RECOMMENDED = Recipe("obs", "mean", "sequential", "auto", distill=1)


def resolve_recipe(
    method: Optional[str] = None,
    ablation: Optional[str] = None,
    calibration: Optional[str] = None,
    refit=None,
    distill: Optional[int] = None,
) -> Recipe:
    """The recipe of a user's choices: no method means the recommended recipe with any given field replaced; a given
    method means that method with zero ablation, one-shot calibration, the method's own refit and no distillation
    unless given."""
    if method is None:
        given = (("ablation", ablation), ("calibration", calibration), ("refit", refit), ("distill", distill))
        return replace(RECOMMENDED, **{k: v for k, v in given if v is not None})
    return Recipe(method, ablation or "zero", calibration or "oneshot", refit, distill or 0)


def check_recipe_scope(recipe: Recipe, scope: str) -> str:
    """A selection scope the recipe can use: sequential calibration selects layer by layer (no ``global``)."""
    scope = check_scope(scope)
    return check_sequential_scope(scope) if recipe.calibration == "sequential" else scope


def recipe_windows(
    model,
    calib_texts: Optional[Sequence[str]] = None,
    calib_sources: Optional[Dict[str, Sequence[str]]] = None,
    calib_tokens: int = RECOMMENDED_CALIB_TOKENS,
) -> CalibrationWindows:
    """The calibration windows of sequential recipes: ``calib_tokens`` tokens of ``calib_sources`` (one fold per
    source; default: the default domains) or of ``calib_texts`` (one source in four folds)."""
    return calibration_windows(model, sequential_sources(calib_texts, calib_sources), calib_tokens)


def distill_windows(
    model,
    calib_texts: Optional[Sequence[str]] = None,
    calib_sources: Optional[Dict[str, Sequence[str]]] = None,
    calib_tokens: int = RECOMMENDED_CALIB_TOKENS,
    distill_tokens: int = DISTILL_TOKENS,
) -> CalibrationWindows:
    """The windows distillation trains on: ``max(calib_tokens, distill_tokens)`` tokens of the same sources as
    :func:`recipe_windows` (each source's windows start with the calibration's own), or just the calibration
    windows when a source holds too little text for more (too little for those fails as calibration does)."""
    distill_tokens = check_int(distill_tokens, "distillation tokens", 1)
    sources = sequential_sources(calib_texts, calib_sources)
    if distill_tokens > calib_tokens:
        try:
            return calibration_windows(model, sources, distill_tokens)
        except ValueError:
            pass  # a source too small for the larger budget: train on the calibration windows
    return calibration_windows(model, sources, calib_tokens)


def recipe_spec(
    model,
    recipe: Recipe,
    sparsity: float,
    scope: str = "per_layer",
    calib_texts: Optional[Sequence[str]] = None,
    calib_sources: Optional[Dict[str, Sequence[str]]] = None,
    calib_tokens: int = RECOMMENDED_CALIB_TOKENS,
    calibration: Optional[Calibration] = None,
    windows: Optional[CalibrationWindows] = None,
    seed: int = 0,
    progress: bool = False,
    bf16: bool = True,
    distill_tokens: int = DISTILL_TOKENS,
    train_windows: Optional[CalibrationWindows] = None,
) -> Tuple[Optional[PruneSpec], dict]:
    """The pruning of ``recipe`` at ``sparsity`` (None when it removes nothing) and the calibration record.

    One-shot recipes calibrate on ``calib_texts`` (default: the token-balanced mix of the default domains) unless
    ``calibration`` is given; sequential recipes fold over ``calib_sources`` (default: the default domains, one
    fold each) or ``calib_texts`` (one source in four folds) unless ``windows`` is given. Sequential calibration
    selects layer by layer: ``scope`` is ``per_layer`` or ``owl``; its forwards run under bf16 autocast unless
    ``bf16=False`` (statistics still accumulate in fp32 / fp64). A recipe with ``distill`` then trains the
    pruning's output weights and biases on ``train_windows`` (default: :func:`distill_windows`, ``distill_tokens``
    tokens of the same sources); the record's ``distillation`` says how, and on which windows.
    """
    sparsity, scope = check_sparsity(sparsity), check_recipe_scope(recipe, scope)
    if recipe.calibration == "sequential":
        if windows is None:
            windows = recipe_windows(model, calib_texts, calib_sources, calib_tokens)
        spec = sequential_spec(
            model,
            windows,
            recipe.method,
            sparsity,
            recipe.ablation,
            recipe.refit,
            seed,
            bf16=bf16,
            progress=progress,
            scope=scope,
        ).spec
        spec, record = (spec if spec.neurons else None), {"mode": "sequential", **windows.record}
    else:
        if calibration is None:
            calibration = calibrate_for(model, [recipe.method], calib_texts, calib_tokens, refit=recipe.refit is not None)
        spec = build_spec(model, calibration, recipe.method, sparsity, scope, recipe.ablation, seed, recipe.refit)
        record = {"mode": "oneshot", **calibration.record}
    if spec is not None and recipe.distill:
        if train_windows is None:
            train_windows = distill_windows(model, calib_texts, calib_sources, calib_tokens, distill_tokens)
        result = distill_spec(model, spec, train_windows.tokens, recipe.distill, seed=seed, bf16=bf16, progress=progress)
        spec, record = result.spec, {**record, "distillation": {**result.record(), "windows": train_windows.record}}
    return spec, record
