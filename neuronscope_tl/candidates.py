"""Pruning candidates: ranked by weight magnitude within each layer, flagged safe only on activation evidence.

Candidates are the neurons at or below the ``threshold_percentile`` of their layer's weight score (mean |w|, see
:mod:`neuronscope_tl.weights`). That ranking alone says little about what pruning a neuron costs: a neuron with
small weights can fire rarely but hugely (on SmolLM2 the lowest-weight tenth of a layer holds neurons whose
activation RMS is tens of times the layer's median). So every candidate also carries evidence from one cached
calibration pass (:func:`neuronscope_tl.activations.calibration_stats`):

* ``activation_score``: ``rms(a) x ||W_out row||``, the root-mean-square norm of what the neuron writes into the
  residual stream over the calibration tokens: the structured Wanda score (Sun et al. 2023), which is also what
  zero-ablating the neuron removes from the residual stream;
* ``safety_score``: the fraction of the layer's neurons whose activation score is higher (1.0 = the smallest
  write of its layer, 0.0 = the largest);
* ``is_pruning_candidate``: the activation score is within the lowest ``safe_percentile`` percent of the layer.

:func:`weight_candidates` keeps the weight-only ranking (no calibration pass); :data:`WEIGHT_ONLY_LIMITS` is the
caveat every front end shows beside it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

import numpy as np
import pandas as pd

from .activations import DEFAULT_CALIB_TOKENS, calibration_stats
from .export import Result
from .weights import check_percentile, neuron_weight_table, pruning_candidates as weight_candidates

DEFAULT_THRESHOLD_PERCENTILE = 10.0
DEFAULT_SAFE_PERCENTILE = 25.0

WEIGHT_ONLY_LIMITS = (
    "Ranked by weight magnitude (mean |w|) within each layer. Weight magnitude alone is a poor guide to what can "
    "be pruned: some low-weight neurons fire rarely but strongly and matter. is_pruning_candidate is True only "
    "where the calibration activations confirm a small output (activation_score in the lowest "
    "{safe:g}% of the layer); confirm with simulate_pruning or batch_analysis on your own texts."
)

CANDIDATE_COLUMNS = (
    "layer",
    "neuron",
    "label",
    "weight_score",
    "band",
    "rank_in_layer",
    "activation_rms",
    "w_out_norm",
    "activation_score",
    "safety_score",
    "is_pruning_candidate",
)


@dataclass
class PruningCandidate(Result):
    """One weight-ranked pruning candidate and the activation evidence for or against pruning it.

    Attributes:
        layer_index / neuron_index: where the neuron is (``blocks.{layer}.mlp.hook_post``, index ``neuron``).
        weight_score: mean |w| over the neuron's W_in (and W_gate) column and W_out row.
        band: ``very_low`` (< 0.01), ``low`` (< 0.05) or ``normal`` weight band.
        rank_in_layer: position in the layer's weight ranking (0 = lowest mean |w|).
        activation_rms: RMS of the neuron's activation over the calibration tokens.
        w_out_norm: L2 norm of the neuron's W_out row.
        activation_score: activation_rms x w_out_norm (structured Wanda).
        safety_score: fraction of the layer's neurons with a larger activation score, in [0, 1].
        is_pruning_candidate: activation_score within the layer's lowest ``safe_percentile`` percent.
    """

    layer_index: int
    neuron_index: int
    label: str
    weight_score: float
    band: str
    rank_in_layer: int
    activation_rms: float
    w_out_norm: float
    activation_score: float
    safety_score: float
    is_pruning_candidate: bool


def check_safe_percentile(safe_percentile: float) -> float:
    try:
        return check_percentile(safe_percentile)
    except ValueError:
        raise ValueError(f"safe_percentile must be in (0, 100], got {safe_percentile!r}.") from None


def activation_evidence(
    model,
    calib_texts: Optional[Sequence[str]] = None,
    calib_tokens: int = DEFAULT_CALIB_TOKENS,
    safe_percentile: float = DEFAULT_SAFE_PERCENTILE,
) -> pd.DataFrame:
    """Per neuron of every layer: activation_rms, w_out_norm, activation_score, safety_score, is_pruning_candidate.

    ``safety_score`` = (number of the layer's neurons with a strictly larger activation score) / (d_mlp - 1);
    a neuron is flagged when its activation score is at or below the layer's ``safe_percentile``-th percentile
    (linear interpolation, as ``numpy.percentile``).
    """
    safe = check_safe_percentile(safe_percentile)
    stats = calibration_stats(model, calib_texts, calib_tokens).table()
    weights = neuron_weight_table(model)
    table = stats[["layer", "neuron"]].copy()
    table["activation_rms"] = stats["rms"].to_numpy()
    table["w_out_norm"] = weights["w_out_norm"].to_numpy()
    table["activation_score"] = table["activation_rms"] * table["w_out_norm"]
    by_layer = table.groupby("layer")["activation_score"]
    larger = by_layer.rank(method="max", ascending=False) - 1  # neurons strictly above, ties counted once
    size = by_layer.transform("size")
    table["safety_score"] = (larger / (size - 1).clip(lower=1)).to_numpy(dtype=float)
    cutoff = by_layer.transform(lambda s: np.percentile(s.to_numpy(), safe))
    table["is_pruning_candidate"] = table["activation_score"] <= cutoff
    return table


def assess_candidates(
    model,
    threshold_percentile: float = DEFAULT_THRESHOLD_PERCENTILE,
    safe_percentile: float = DEFAULT_SAFE_PERCENTILE,
    calib_texts: Optional[Sequence[str]] = None,
    calib_tokens: int = DEFAULT_CALIB_TOKENS,
    weight_table: Optional[pd.DataFrame] = None,
) -> pd.DataFrame:
    """Weight-ranked candidates with their activation evidence (columns :data:`CANDIDATE_COLUMNS`).

    The rows are :func:`weight_candidates` (layer by layer, lowest mean |w| first); the evidence columns come from
    :func:`activation_evidence` over the calibration texts (default: the Lee calibration split, first
    ``calib_tokens`` tokens), computed once per model and text set.
    """
    check_percentile(threshold_percentile)
    check_safe_percentile(safe_percentile)
    weight_table = neuron_weight_table(model) if weight_table is None else weight_table
    cands = weight_candidates(model, threshold_percentile, weight_table)
    evidence = activation_evidence(model, calib_texts, calib_tokens, safe_percentile).drop(columns=["w_out_norm"])
    out = cands.merge(evidence, on=["layer", "neuron"], how="left")
    out = out.rename(columns={"mean_abs_weight": "weight_score"})
    return out[list(CANDIDATE_COLUMNS)]


def candidate_objects(table: pd.DataFrame) -> List[PruningCandidate]:
    """The rows of :func:`assess_candidates` as :class:`PruningCandidate` objects."""
    return [
        PruningCandidate(
            layer_index=int(r.layer),
            neuron_index=int(r.neuron),
            label=str(r.label),
            weight_score=float(r.weight_score),
            band=str(r.band),
            rank_in_layer=int(r.rank_in_layer),
            activation_rms=float(r.activation_rms),
            w_out_norm=float(r.w_out_norm),
            activation_score=float(r.activation_score),
            safety_score=float(r.safety_score),
            is_pruning_candidate=bool(r.is_pruning_candidate),
        )
        for r in table.itertuples(index=False)
    ]


def candidate_records(table: pd.DataFrame) -> List[dict]:
    """The rows of :func:`assess_candidates` as JSON-able dicts (``layer_index``, ``neuron_index``, ...)."""
    return [c.to_dict() for c in candidate_objects(table)]


def candidates_document(
    table: pd.DataFrame, threshold_percentile: float, safe_percentile: float = DEFAULT_SAFE_PERCENTILE
) -> dict:
    """What every front end reports about a candidate set: counts, the rule and its limits, and the records."""
    return {
        "threshold": threshold_percentile,
        "safe_percentile": safe_percentile,
        "total_candidates": int(len(table)),
        "safe_candidates": int(table["is_pruning_candidate"].sum()),
        "limits": WEIGHT_ONLY_LIMITS.format(safe=safe_percentile),
        "candidates": candidate_records(table),
    }


def first_candidates(table: pd.DataFrame, n: int, safe_only: bool = True) -> pd.DataFrame:
    """``n`` candidates spread over the layers: the lowest weight rank of each layer first, then the next rank.

    With ``safe_only`` only flagged candidates (``is_pruning_candidate``) are taken.
    """
    chosen = table[table["is_pruning_candidate"]] if safe_only else table
    by_layer_rank = chosen.groupby("layer").cumcount()
    return (
        chosen.assign(_order=by_layer_rank.to_numpy())
        .sort_values(["_order", "layer"])
        .head(max(int(n), 0))
        .drop(columns="_order")
    )
