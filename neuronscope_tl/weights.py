"""Weight statistics, sparsity and weight-based pruning candidates.

Statistics are taken on the MLP weights in TransformerLens's conventions, ``W_in`` [layer, d_model, d_mlp],
``W_gate`` (gated MLPs) and ``W_out`` [layer, d_mlp, d_model], read through the model kind's adapter
(:mod:`neuronscope_tl.arch`). Every result says which weights it was taken on (``weights``): ``raw``, the
checkpoint's own numbers (a bridge, which is booted without LayerNorm folding; a HookedTransformer loaded without
processing), or ``processed`` (a HookedTransformer from ``from_pretrained``, whose ``W_in`` has the norm weights
folded in and whose writing weights are centred). ``weights="raw"`` on a processed model is refused with a message
saying how to load it instead.

Neuron n of layer l owns column n of ``W_in`` (and ``W_gate``) and row n of ``W_out``. Its *weight score* is the
mean |w| over all those weights; NeuronScope's bands apply to it (< 0.01 very low, 0.01-0.05 low, > 0.05 normal).
Beware: on SmolLM2 low weight magnitude is a poor guide to what can be pruned (worse than random in our pruning
curves); the activation-aware scores are better.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Union

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from .arch import check_weight_source, mlp_input_bias, mlp_weights
from .arch import parameters as arch_parameters
from .export import Result, report_document, write_set
from .models import mlp_info, model_name
from .texts import as_finite_real, show

QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)
BANDS = ((0.01, "very_low"), (0.05, "low"), (math.inf, "normal"))


def band_of(mean_abs: float) -> str:
    """The weight band of a neuron's mean |w|: < 0.01 very_low, 0.01-0.05 low, >= 0.05 normal."""
    for upper, name in BANDS:
        if mean_abs < upper:
            return name
    return "normal"


def check_percentile(threshold_percentile: float) -> float:
    value = as_finite_real(threshold_percentile)
    if value is None or not 0.0 < value <= 100.0:
        raise ValueError(f"threshold_percentile must be in (0, 100], got {show(threshold_percentile)}.")
    return value


def unique_parameters(model) -> List[Tensor]:
    """The model's parameters, each storage counted once (through the model kind's adapter): a bridge's wrapped HF
    model's tensors, where tied matrices share one storage and the bridge's split views (GPT-2's fused ``c_attn``
    as q/k/v) share their base's; a HookedTransformer's own parameters."""
    return arch_parameters(model)


def _count_below(sorted_values: Tensor, x: float, inclusive: bool = False) -> int:
    return int(torch.searchsorted(sorted_values, torch.tensor([x], dtype=sorted_values.dtype), right=inclusive))


def histogram(sorted_values: Tensor, bins: int, upper: float) -> Dict[str, list]:
    """Histogram of sorted ``values`` on ``bins`` equal bins over [0, upper], as ``numpy.histogram`` counts:
    each bin is [left, right) except the last, which also holds its right edge."""
    edges = torch.linspace(0.0, upper, bins + 1, dtype=torch.float64)
    below = torch.searchsorted(sorted_values, edges.to(sorted_values.dtype))
    below[-1] = _count_below(sorted_values, float(edges[-1]), inclusive=True)
    return {"edges": edges.tolist(), "counts": (below[1:] - below[:-1]).tolist()}


def matrix_stats(w: Tensor, near_zero: float, bins: int, upper: float) -> dict:
    """Mean, std, quantiles (linear interpolation, as numpy), zero and near-zero fractions and histogram of |w|.

    One sort of |w| serves the quantiles, the fractions and the histogram.
    """
    a = w.abs().reshape(-1).float().sort().values.double()
    n = a.numel()
    var, mean = torch.var_mean(a, correction=0)
    pos = torch.tensor(QUANTILES, dtype=torch.float64) * (n - 1)
    lo = pos.floor().long()
    hi = (lo + 1).clamp(max=n - 1)
    quant = a[lo] + (a[hi] - a[lo]) * (pos - lo)
    return {
        "mean_abs": float(mean),
        "std_abs": float(var.sqrt()),
        "max_abs": float(a[-1]),
        "quantiles_abs": {str(q): float(v) for q, v in zip(QUANTILES, quant)},
        "zero_fraction": _count_below(a, 0.0, inclusive=True) / n,
        "near_zero_fraction": _count_below(a, near_zero) / n,
        "histogram_abs": histogram(a, bins, upper),
    }


def neuron_weight_table(model, weights: str = "auto") -> pd.DataFrame:
    """One row per MLP neuron: norms of its input side (W_in, W_gate) and output side (W_out), mean |w|, bias.

    ``weights``: ``auto`` (the weights the model holds), ``raw`` or ``processed``; ValueError when the model holds
    the other kind (see :func:`neuronscope_tl.arch.check_weight_source`).

    Columns: layer, neuron, label (``L{l}N{n}``), w_in_norm, w_gate_norm (NaN without a gate), w_out_norm,
    input_norm (sqrt of w_in_norm^2 + w_gate_norm^2), mean_abs_weight, bias (NaN when the MLP has no input bias),
    band.
    """
    info = mlp_info(model)
    check_weight_source(model, weights)
    w = mlp_weights(model)
    w_in_norm = w["in"].norm(dim=1)  # [L, d_mlp]
    w_out_norm = w["out"].norm(dim=2)  # [L, d_mlp]
    abs_sum = w["in"].abs().sum(1) + w["out"].abs().sum(2)
    count = w["in"].shape[1] + w["out"].shape[2]
    if "gate" in w:
        w_gate_norm = w["gate"].norm(dim=1)
        abs_sum = abs_sum + w["gate"].abs().sum(1)
        count += w["gate"].shape[1]
        input_norm = (w_in_norm.square() + w_gate_norm.square()).sqrt()
    else:
        w_gate_norm = torch.full_like(w_in_norm, float("nan"))
        input_norm = w_in_norm
    bias = mlp_input_bias(model)
    if bias is None:
        bias = torch.full_like(w_in_norm, float("nan"))
    mean_abs = abs_sum / count
    layers = np.repeat(np.arange(info.n_layers), info.d_mlp)
    neurons = np.tile(np.arange(info.d_mlp), info.n_layers)
    table = pd.DataFrame(
        {
            "layer": layers,
            "neuron": neurons,
            "label": [f"L{l}N{n}" for l, n in zip(layers, neurons)],
            "w_in_norm": w_in_norm.reshape(-1).numpy(),
            "w_gate_norm": w_gate_norm.reshape(-1).numpy(),
            "w_out_norm": w_out_norm.reshape(-1).numpy(),
            "input_norm": input_norm.reshape(-1).numpy(),
            "mean_abs_weight": mean_abs.reshape(-1).numpy(),
            "bias": bias.reshape(-1).numpy(),
        }
    )
    table["band"] = [band_of(v) for v in table["mean_abs_weight"]]
    return table


@dataclass
class WeightAnalysis(Result):
    """Weight statistics of a model.

    Attributes:
        model: model name.
        total_parameters: unique parameters of the model (tied matrices counted once).
        zero_parameters: parameters exactly equal to 0.
        overall_sparsity: zero_parameters / total_parameters.
        near_zero_threshold: the |w| threshold for near_zero_fraction (seed guideline 0.01).
        near_zero_fraction: fraction of all parameters with |w| < near_zero_threshold.
        layers: per layer, for each MLP matrix (``W_in``, ``W_gate`` when gated, ``W_out``): mean, std and
            quantiles of |w|, zero and near-zero fractions, and a histogram of |w| on shared bins.
        neurons: the per-neuron table of :func:`neuron_weight_table`.
        low_weight_neurons: the neurons whose mean |w| falls in the ``very_low`` or ``low`` band.
        weights: ``raw`` (the checkpoint's own numbers) or ``processed`` (TransformerLens-processed weights of a
            HookedTransformer: norms folded into W_in, writing weights centred).
    """

    model: str
    total_parameters: int
    zero_parameters: int
    overall_sparsity: float
    near_zero_threshold: float
    near_zero_fraction: float
    mlp_parameters: int
    layers: List[dict]
    neurons: pd.DataFrame = field(repr=False)
    low_weight_neurons: pd.DataFrame = field(repr=False)
    weights: str = "raw"

    def summary(self) -> dict:
        d = self.to_dict()
        d.pop("neurons")
        d["low_weight_neurons"] = len(self.low_weight_neurons)
        d["band_counts"] = self.neurons["band"].value_counts().to_dict()
        return d


def analyze_weights(model, near_zero_threshold: float = 0.01, bins: int = 50, weights: str = "auto") -> WeightAnalysis:
    """Sparsity over all parameters, and per-layer and per-neuron statistics of the MLP weights.

    ``weights``: ``auto`` (the weights the model holds, named in the result's ``weights``), ``raw`` or
    ``processed``: asking for raw statistics of a HookedTransformer holding processed weights is a ValueError saying
    how to load it instead. A HookedTransformer's parameters are its own tensors: the zero biases TransformerLens's
    conversion adds and an untied copy of a tied unembedding count in the sparsity.
    """
    source = check_weight_source(model, weights)
    threshold = as_finite_real(near_zero_threshold)
    if threshold is None or threshold <= 0:
        raise ValueError(f"near_zero_threshold must be a finite number > 0, got {show(near_zero_threshold)}.")
    near_zero_threshold = threshold
    if isinstance(bins, bool) or not (isinstance(bins, int) and 1 <= bins <= 10_000):
        raise ValueError(f"bins must be an integer in [1, 10000], got {bins!r}.")
    total = zero = near = 0
    with torch.no_grad():
        for p in unique_parameters(model):
            total += p.numel()
            zero += int(torch.count_nonzero(p == 0))
            near += int(torch.count_nonzero(p.abs() < near_zero_threshold))
    w = mlp_weights(model)
    upper = max(float(m.abs().max()) for m in w.values())
    names = {"in": "W_in", "gate": "W_gate", "out": "W_out"}
    layers = []
    for layer in range(mlp_info(model).n_layers):
        entry = {"layer": layer}
        for key, mat in w.items():
            entry[names[key]] = matrix_stats(mat[layer], near_zero_threshold, bins, upper)
        layers.append(entry)
    neurons = neuron_weight_table(model, source)
    low = neurons[neurons["band"] != "normal"].reset_index(drop=True)
    return WeightAnalysis(
        model=model_name(model),
        total_parameters=total,
        zero_parameters=zero,
        overall_sparsity=zero / total,
        near_zero_threshold=near_zero_threshold,
        near_zero_fraction=near / total,
        mlp_parameters=sum(m.numel() for m in w.values()),
        layers=layers,
        neurons=neurons,
        low_weight_neurons=low,
        weights=source,
    )


def rank_within_layer(table: pd.DataFrame, score: str) -> pd.DataFrame:
    """Add ``rank_in_layer``: the position in the layer's ascending order of ``score`` (0 = lowest; ties keep
    neuron order)."""
    out = table.copy()
    out["rank_in_layer"] = out.groupby("layer")[score].rank(method="first").astype(int) - 1
    return out


def select_candidates(table: pd.DataFrame, score: str, threshold_percentile: float) -> pd.DataFrame:
    """Neurons whose ``score`` is at or below the layer's ``threshold_percentile``-th percentile (linear).

    Returns them sorted by layer, then ``rank_in_layer`` (see :func:`rank_within_layer`).
    """
    p = check_percentile(threshold_percentile)
    ranked = rank_within_layer(table, score)
    cutoff = ranked.groupby("layer")[score].transform(lambda s: np.percentile(s.to_numpy(), p))
    cand = ranked[ranked[score] <= cutoff]
    return cand.sort_values(["layer", "rank_in_layer"]).reset_index(drop=True)


def pruning_candidates(model, threshold_percentile: float = 10.0, table: Optional[pd.DataFrame] = None) -> pd.DataFrame:
    """The weight-only ranking: neurons at or below the percentile of mean |w| within their layer, lowest first.

    Weight magnitude says nothing about how strongly a neuron fires; :func:`neuronscope_tl.candidates.assess_candidates`
    adds the activation evidence that decides ``is_pruning_candidate``.
    """
    check_percentile(threshold_percentile)
    table = neuron_weight_table(model) if table is None else table
    return select_candidates(table, "mean_abs_weight", threshold_percentile)


def weight_document(analysis: WeightAnalysis, settings: Optional[dict] = None) -> dict:
    """The JSON document of a weight analysis (what :func:`export_weights` writes and the REST export returns)."""
    return report_document(
        "weight_analysis",
        analysis.model,
        settings or {"near_zero_threshold": analysis.near_zero_threshold},
        None,
        analysis.to_dict(),
    )


def export_weights(analysis: WeightAnalysis, path: Union[str, Path], settings: Optional[dict] = None) -> List[Path]:
    """Write the weight analysis as JSON at ``path`` and its per-neuron table as CSV beside it (``*_neurons.csv``)."""
    path = Path(path)
    return write_set({path: weight_document(analysis, settings), path.with_name(path.stem + "_neurons.csv"): analysis.neurons})
