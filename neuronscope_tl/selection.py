"""Which neurons to prune: the calibration context, and selection by a registered score at a sparsity and scope.

:func:`calibrate` runs one scoring pass (:func:`~neuronscope_tl.scoring.score_neurons`) over the calibration
tokens (default: 32,768 tokens of the news + forum + docs mix) and, when a method needs them, one pass for the activation
Gram matrices; the resulting :class:`Calibration` serves every method of :mod:`neuronscope_tl.scores`.
:func:`select_neurons` turns a method's scores into neuron sets:

* **Scope** ``per_layer`` removes the same fraction from every layer. ``global`` ranks all neurons together on
  scores made comparable across layers (z-scored within each layer, as FLAP does, An et al. 2024; ``obs`` uses its
  cumulative reconstruction error divided by the layer's output energy). ``owl`` gives each layer its own fraction
  from its share of outlier neurons (:func:`owl_layer_counts`, OWL, Yin et al. 2024), then selects per layer by the
  method's score. Every layer keeps at least one neuron.
* **Ablation** ``zero``, or ``mean``: the neuron's mean calibration activation, carried by the exported model as an
  output bias (FLAP's bias compensation).

:func:`build_spec` makes the :class:`~neuronscope_tl.surgery.PruneSpec` of a selection; methods with ``refit``
(``obs``) carry the least-squares refit of the kept neurons' output weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from . import scores as registry
from . import engine
from .activations import GramAccumulator, NeuronAccumulator
from .domains import DEFAULT_CALIBRATION_DOMAINS, mixed_calibration_texts
from .evaluation import check_seed, texts_record
from .impact import check_ablation
from .models import mlp_info
from .scoring import accumulate_scores, score_table
from .obs import DEFAULT_DAMP
from .surgery import Neurons, PruneSpec, make_spec
from .texts import as_finite_real, calibration_tokens, check_max_tokens, show
from .weights import neuron_weight_table

SCOPES = ("per_layer", "global", "owl")
# Calibration tokens for pruning: 32,768 tokens of the default mix. The refit fits a 1,537-wide Gram matrix per
# layer; on the default model 8,192 tokens overfit it (benchmarks/bench_domains.py: 1.74x dense in-domain at 20%
# one-shot against 1.63x with 32,768 tokens).
PRUNE_CALIB_TOKENS = 32768


def check_scope(scope: str) -> str:
    """``per_layer``, ``global`` or ``owl``."""
    if not isinstance(scope, str) or scope not in SCOPES:
        raise ValueError(f"unknown scope {show(scope)}; valid scopes are {', '.join(SCOPES)}.")
    return scope


def check_sparsity(sparsity: Any, name: str = "sparsity") -> float:
    """A fraction of neurons: a real number in [0, 1)."""
    value = as_finite_real(sparsity)
    if value is None or not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be a number in [0, 1), got {show(sparsity)}.")
    return value


def check_sparsities(sparsities: Any) -> List[float]:
    """A non-empty list of sparsities, each in [0, 1)."""
    if isinstance(sparsities, (str, bytes)) or not isinstance(sparsities, (list, tuple, np.ndarray, range)):
        raise ValueError(f"sparsities must be a non-empty list of numbers in [0, 1), got {show(sparsities)}.")
    if len(sparsities) == 0:
        raise ValueError("sparsities must be a non-empty list of numbers in [0, 1).")
    return [check_sparsity(s) for s in sparsities]


@dataclass
class Calibration:
    """Everything the methods need, from one scoring pass (and a Gram pass for methods that need Gram matrices).

    Attributes:
        scores: the score table of :func:`~neuronscope_tl.scoring.score_neurons`, sorted by (layer, neuron).
        magnitude: [n_layers, d_mlp] mean |w| per neuron (:func:`~neuronscope_tl.weights.neuron_weight_table`).
        means: {layer: [d_mlp] mean activation} (mean ablation).
        grams: {layer: activation Gram matrix}, or None when not collected.
        obs: removal orders cached by the ``obs`` method, per (ablation, layer).
        record: the calibration texts and token budget, for the protocol.
    """

    scores: pd.DataFrame
    magnitude: Tensor  # [L, d_mlp]
    means: Dict[int, Tensor]
    grams: Optional[Dict[int, Tensor]] = None
    obs: Dict[Tuple[str, int], Tuple[List[int], List[float]]] = field(default_factory=dict)
    record: dict = field(default_factory=dict)

    @property
    def shape(self) -> Tuple[int, int]:
        """(n_layers, d_mlp)."""
        return tuple(self.magnitude.shape)

    def column(self, name: str) -> Tensor:
        """A column of the score table as a [n_layers, d_mlp] float64 tensor."""
        return torch.tensor(self.scores[name].to_numpy(), dtype=torch.float64).reshape(self.shape)


def pruning_calibration_texts(calib_texts: Optional[Sequence[str]] = None) -> Tuple[List[str], dict]:
    """The texts pruning calibrates on and their record: the user's texts, or by default the documented mix of
    :data:`~neuronscope_tl.domains.DEFAULT_CALIBRATION_DOMAINS` (news, forum posts and Python documentation,
    interleaved so that every token budget draws on each about equally)."""
    if calib_texts is not None:
        return texts_record(calib_texts, "calibration")
    texts, record = texts_record(mixed_calibration_texts(DEFAULT_CALIBRATION_DOMAINS), "calibration")
    record["name"] = "mix(" + "+".join(DEFAULT_CALIBRATION_DOMAINS) + ")"
    return texts, record


def calibrate_for(
    model,
    methods: Sequence[str],
    calib_texts: Optional[Sequence[str]] = None,
    calib_tokens: int = PRUNE_CALIB_TOKENS,
    refit: bool = False,
) -> Calibration:
    """:func:`calibrate` with exactly what ``methods`` (registered names) need: Gram matrices when one of them
    (or a ``refit``) needs them, the backward pass when one needs gradients."""
    return calibrate(
        model,
        calib_texts,
        calib_tokens,
        with_grams=registry.needs_grams(methods) or refit,
        with_gradients=registry.needs_gradients(methods),
    )


def calibrate(
    model,
    calib_texts: Optional[Sequence[str]] = None,
    calib_tokens: int = PRUNE_CALIB_TOKENS,
    with_grams: bool = True,
    scores: Optional[pd.DataFrame] = None,
    with_gradients: bool = True,
) -> Calibration:
    """The calibration context of every method, over the first ``calib_tokens`` tokens of the calibration texts
    (texts longer than the model's context are cut into context-sized pieces).

    With ``with_gradients`` the score table comes from the scoring pass (:func:`~neuronscope_tl.scoring.accumulate_scores`:
    a forward and a backward per batch); without, from a forward-only statistics pass, and the gradient columns
    (``taylor``) are NaN. ``with_grams`` also collects the activation Gram matrices, in the same forward pass when
    there is no backward. ``scores`` reuses a score table already computed on the same texts.
    """
    calib_tokens = check_max_tokens(calib_tokens, "calib_tokens")
    texts, record = pruning_calibration_texts(calib_texts)
    record["max_tokens"] = calib_tokens
    info = mlp_info(model)
    tokens = calibration_tokens(model, texts, calib_tokens)
    weights = neuron_weight_table(model)
    if scores is None and with_gradients:
        scores = accumulate_scores(model, tokens).table(model)
    accs: list = []
    stats = NeuronAccumulator(list(range(info.n_layers)), info.d_mlp) if scores is None else None
    grams = GramAccumulator(list(range(info.n_layers)), info.d_mlp) if with_grams else None
    accs = [a for a in (stats, grams) if a is not None]
    if accs:
        engine.run(model, tokens, accs, by_length=False, desc="calibration")
    if scores is None:
        scores = score_table(stats.table(), weights)
    scores = scores.sort_values(["layer", "neuron"]).reset_index(drop=True)
    mag = torch.tensor(weights["mean_abs_weight"].to_numpy()).reshape(info.n_layers, info.d_mlp)
    mean = torch.tensor(scores["mean"].to_numpy(), dtype=torch.float32).reshape(info.n_layers, info.d_mlp)
    return Calibration(scores, mag, {l: mean[l] for l in range(info.n_layers)}, grams.grams() if grams else None, record=record)


OWL_OUTLIER_FACTOR = 5.0
OWL_SPREAD = 0.08


def owl_outlier_scores(cal: Calibration) -> Tensor:
    """``[n_layers, d_mlp]`` scores whose outliers OWL counts: structured Wanda (||W_out row|| x RMS activation)."""
    return registry.get("wanda").scores(cal, "zero")


def owl_layer_counts(
    outlier_scores: Tensor, sparsity: float, factor: float = OWL_OUTLIER_FACTOR, spread: float = OWL_SPREAD
) -> List[int]:
    """Neurons to remove per layer under outlier-weighted layer sparsity (OWL, Yin et al. 2024), for neurons.

    A layer's outlier ratio is the fraction of its neurons whose score exceeds ``factor`` times the layer's mean.
    Keep ratios grow linearly with it over a range of ``2 * spread`` centred on ``1 - sparsity`` (so the mean
    sparsity is kept), are clipped so every layer keeps at least one neuron, and are rounded to counts that sum to
    ``round(sparsity * n_layers * d_mlp)`` (largest remainders; at most ``d_mlp - 1`` per layer). Equal outlier
    ratios give equal fractions: counts that differ by at most one.
    """
    sparsity = check_sparsity(sparsity)
    if isinstance(factor, bool) or not (isinstance(factor, (int, float)) and factor > 0 and math.isfinite(factor)):
        raise ValueError(f"factor must be a finite number > 0, got {show(factor)}.")
    if isinstance(spread, bool) or not (isinstance(spread, (int, float)) and 0 <= spread < 0.5):
        raise ValueError(f"spread must be a number in [0, 0.5), got {show(spread)}.")
    score = outlier_scores.double()
    n_layers, d = score.shape
    ratio = (score > factor * score.mean(1, keepdim=True)).double().mean(1)
    span = float(ratio.max() - ratio.min())
    keep = (ratio - ratio.min()) / span * 2 * spread if span > 0 else torch.zeros(n_layers, dtype=torch.float64)
    keep = keep - keep.mean() + (1 - sparsity)
    raw = ((1 - keep) * d).clamp(0, d - 1)
    counts = raw.floor().long().tolist()
    total = min(int(round(sparsity * d * n_layers)), n_layers * (d - 1))
    order = (raw - raw.floor()).argsort(descending=True, stable=True).tolist()
    deficit = total - sum(counts)
    step = 1 if deficit > 0 else -1
    order = order if step > 0 else order[::-1]
    i = 0
    while deficit:
        layer = order[i % n_layers]
        if 0 <= counts[layer] + step <= d - 1:
            counts[layer] += step
            deficit -= step
        i += 1
    return counts


def select_neurons(
    model, cal: Calibration, method: str, sparsity: float, scope: str = "per_layer", ablation: str = "zero", seed: int = 0
) -> Neurons:
    """The neurons to prune: the lowest-scored fraction per layer, or globally on comparable scores."""
    score_def = registry.get(method)
    sparsity = check_sparsity(sparsity)
    check_scope(scope)
    check_ablation(ablation)
    seed = check_seed(seed)
    info = mlp_info(model)
    d, n_layers = info.d_mlp, info.n_layers
    k = int(round(sparsity * d))
    if scope == "per_layer":
        return score_def.per_layer(model, cal, k, ablation, seed) if k else {}
    if scope == "owl":
        counts = owl_layer_counts(owl_outlier_scores(cal), sparsity)
        chosen = score_def.per_layer(model, cal, counts, ablation, seed)
        return {l: v for l, v in chosen.items() if v}
    score = score_def.comparable(model, cal, sparsity, ablation, seed)
    total = int(round(sparsity * d * n_layers))
    flat = score.reshape(-1).argsort(stable=True).tolist()
    chosen: Neurons = {}
    for idx in flat:
        if total == 0:
            break
        l, n = divmod(idx, d)
        if not math.isfinite(float(score[l, n])):
            break
        if len(chosen.get(l, ())) < d - 1:
            chosen.setdefault(l, []).append(n)
            total -= 1
    return {l: sorted(v) for l, v in sorted(chosen.items())}


def build_spec(
    model, cal: Calibration, method: str, sparsity: float, scope: str, ablation: str, seed: int = 0, refit: Optional[float] = None
) -> Optional[PruneSpec]:
    """The :class:`PruneSpec` of one selection (None when it selects nothing). Refit methods carry their refit;
    ``refit`` (a damping) adds a least-squares refit to any method, or sets the damping of a refit method's."""
    neurons = select_neurons(model, cal, method, sparsity, scope, ablation, seed)
    if not neurons:
        return None
    with_refit = registry.get(method).refit or refit is not None
    if with_refit and cal.grams is None:
        raise ValueError("a refit needs the calibration Gram matrices (calibrate(..., with_grams=True)).")
    return make_spec(
        model, neurons, ablation, cal.means, cal.grams if with_refit else None, DEFAULT_DAMP if refit is None else refit
    )
