"""Streaming, mergeable statistics of MLP neuron activations, and neuron importance over many texts.

All requested layers are read in the same forward passes: one hook per ``blocks.{l}.mlp.hook_post`` feeds a
running accumulator, and the forward stops after the last requested block (``stop_at_layer``), so no logits and
no activation cache are ever materialised. Memory is O(layers x d_mlp), independent of the number of tokens.

Variance uses Chan et al.'s parallel update of (count, mean, M2), so accumulators built on separate shards of
texts merge into exactly the single-pass result (up to float64 rounding).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from . import engine
from .export import Result
from .models import mlp_info, model_name
from .texts import (
    DEFAULT_BATCH_SIZE,
    as_finite_real,
    calibration_texts,
    calibration_tokens,
    check_batch_size,
    check_int,
    check_max_tokens,
    check_texts,
    show,
    tokenize,
)

DEFAULT_ACTIVE_THRESHOLD = 0.01


def check_active_threshold(active_threshold) -> float:
    """The |a| above which a neuron counts as active: a finite number >= 0."""
    value = as_finite_real(active_threshold)
    if value is None or value < 0:
        raise ValueError(f"active_threshold must be a finite number >= 0, got {show(active_threshold)}.")
    return value


# Calibration tokens for mean values and candidate evidence: the first 8,192 tokens of the calibration texts.
DEFAULT_CALIB_TOKENS = 8192


def check_index(index: Any, n: int, what: str = "layer", valid: str = "layers", where: str = "") -> int:
    """An integer index in [0, n) (``what`` and ``where`` name it in the error, ``valid`` the range)."""
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or not 0 <= index < n:
        raise ValueError(f"{what} index {index!r}{where} is out of range; valid {valid} are 0..{n - 1}.")
    return int(index)


def check_layers(model, layers: Optional[Sequence[int]]) -> List[int]:
    """Validate layer indices; ``None`` means every layer."""
    n = mlp_info(model).n_layers
    if layers is None:
        return list(range(n))
    if not isinstance(layers, (list, tuple, range, np.ndarray)):
        raise ValueError(f"layers must be a list of layer indices in [0, {n - 1}], got {type(layers).__name__}.")
    layers = list(layers)
    if not layers:
        raise ValueError(f"layers must name at least one layer in [0, {n - 1}].")
    for layer in layers:
        check_index(layer, n)
    if len(set(layers)) != len(layers):
        raise ValueError(f"layers contains duplicates: {layers}.")
    return sorted(int(l) for l in layers)


class NeuronAccumulator:
    """Running per-neuron statistics for several layers: count, mean, M2 (Chan), sum |a|, sum a^2, active, max.

    ``update(layer, acts)`` takes the real-token activations of one layer, [n_tokens, d_mlp].
    ``merge(other)`` combines two accumulators built on disjoint token sets.
    """

    def __init__(self, layers: Sequence[int], d_mlp: int, active_threshold: float = DEFAULT_ACTIVE_THRESHOLD):
        self.layers = list(layers)
        self.d_mlp = d_mlp
        self.active_threshold = check_active_threshold(active_threshold)
        shape = (len(self.layers), d_mlp)
        z = lambda: torch.zeros(shape, dtype=torch.float64)
        self.count = torch.zeros(len(self.layers), dtype=torch.float64)
        self.mean, self.m2, self.sum_abs, self.sum_sq, self.active = z(), z(), z(), z(), z()
        self.max = torch.full(shape, -torch.inf, dtype=torch.float64)
        self._row = {layer: i for i, layer in enumerate(self.layers)}

    needs_grad = False

    def observe(self, obs) -> None:
        """Engine entry point (:mod:`neuronscope_tl.engine`)."""
        self.update(obs.layer, obs.acts)

    def update(self, layer: int, acts: Tensor) -> None:
        i = self._row[layer]
        a = acts.detach().reshape(-1, self.d_mlp).double().cpu()
        n_b = a.shape[0]
        if n_b == 0:
            return
        mean_b = a.mean(0)
        m2_b = (a - mean_b).square().sum(0)
        self._combine(i, float(n_b), mean_b, m2_b)
        self.sum_abs[i] += a.abs().sum(0)
        self.sum_sq[i] += a.square().sum(0)
        self.active[i] += (a.abs() > self.active_threshold).double().sum(0)
        self.max[i] = torch.maximum(self.max[i], a.max(0).values)

    def _combine(self, i: int, n_b: float, mean_b: Tensor, m2_b: Tensor) -> None:
        n_a = float(self.count[i])
        n = n_a + n_b
        delta = mean_b - self.mean[i]
        self.mean[i] = self.mean[i] + delta * (n_b / n)
        self.m2[i] = self.m2[i] + m2_b + delta.square() * (n_a * n_b / n)
        self.count[i] = n

    def merge(self, other: "NeuronAccumulator") -> "NeuronAccumulator":
        """Fold ``other`` (same layers, d_mlp and threshold) into this accumulator; returns self."""
        if other.layers != self.layers or other.d_mlp != self.d_mlp or other.active_threshold != self.active_threshold:
            raise ValueError("can only merge accumulators over the same layers, d_mlp and active_threshold.")
        for i in range(len(self.layers)):
            if other.count[i] > 0:
                self._combine(i, float(other.count[i]), other.mean[i], other.m2[i])
        self.sum_abs += other.sum_abs
        self.sum_sq += other.sum_sq
        self.active += other.active
        self.max = torch.maximum(self.max, other.max)
        return self

    @property
    def n_tokens(self) -> int:
        return int(self.count[0]) if len(self.count) else 0

    def table(self) -> pd.DataFrame:
        """One row per (layer, neuron): mean, mean_abs, var (population), rms, frac_active, max."""
        c = self.count[:, None].clamp_min(1.0)
        layers = np.repeat(np.array(self.layers), self.d_mlp)
        neurons = np.tile(np.arange(self.d_mlp), len(self.layers))
        return pd.DataFrame(
            {
                "layer": layers,
                "neuron": neurons,
                "label": [f"L{l}N{n}" for l, n in zip(layers, neurons)],
                "mean": self.mean.reshape(-1).numpy(),
                "mean_abs": (self.sum_abs / c).reshape(-1).numpy(),
                "var": (self.m2 / c).reshape(-1).numpy(),
                "rms": (self.sum_sq / c).sqrt().reshape(-1).numpy(),
                "frac_active": (self.active / c).reshape(-1).numpy(),
                "max": self.max.reshape(-1).numpy(),
            }
        )


def stream_activations(
    model,
    texts: Sequence[str],
    layers: Optional[Sequence[int]] = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_tokens: Optional[int] = None,
    active_threshold: float = DEFAULT_ACTIVE_THRESHOLD,
    progress: bool = True,
) -> NeuronAccumulator:
    """One streaming pass over ``texts``: per-neuron activation statistics for all requested layers."""
    layers = check_layers(model, layers)
    batch_size = check_batch_size(batch_size)
    return stream_tokens(model, tokenize(model, texts, max_tokens=max_tokens), layers, batch_size, active_threshold, progress)


def stream_tokens(
    model,
    token_lists: Sequence[Tensor],
    layers: Sequence[int],
    batch_size: int = DEFAULT_BATCH_SIZE,
    active_threshold: float = DEFAULT_ACTIVE_THRESHOLD,
    progress: bool = False,
) -> NeuronAccumulator:
    """The pass behind :func:`stream_activations`, over already tokenized sequences (validated layers)."""
    acc = NeuronAccumulator(layers, mlp_info(model).d_mlp, active_threshold)
    engine.run(model, token_lists, [acc], batch_size, progress=progress, desc="activations")
    return acc


class GramAccumulator:
    """Per layer, the running sum of ``ã ã^T`` over tokens, with ``ã`` = [activations, 1] ([d_mlp + 1] wide),
    in float32, and the token count; mergeable across shards.

    ``grams()`` gives ``E[ã ã^T]``, whose last row holds the mean activations: what the least-squares refit and
    OBS selection of :mod:`neuronscope_tl.obs` need.
    """

    needs_grad = False
    summed = True  # the state is sums and a count: reduced across torchrun ranks by all_reduce, not gathered

    def __init__(self, layers: Sequence[int], d_mlp: int):
        self.layers = list(layers)
        self.d_mlp = d_mlp
        self.sums = {l: torch.zeros(d_mlp + 1, d_mlp + 1) for l in self.layers}
        self.count = 0

    def observe(self, obs) -> None:
        a = obs.acts.reshape(-1, self.d_mlp).float().cpu()
        a = torch.cat([a, torch.ones(a.shape[0], 1)], dim=1)
        self.sums[obs.layer] += a.t() @ a
        if obs.layer == self.layers[0]:
            self.count += a.shape[0]

    def merge(self, other: "GramAccumulator") -> "GramAccumulator":
        if (other.layers, other.d_mlp) != (self.layers, self.d_mlp):
            raise ValueError("can only merge Gram accumulators over the same layers and d_mlp.")
        for l in self.layers:
            self.sums[l] += other.sums[l]
        self.count += other.count
        return self

    def grams(self) -> Dict[int, Tensor]:
        return {l: s / max(self.count, 1) for l, s in self.sums.items()}


def activation_grams(
    model, texts: Sequence[str], layers: Sequence[int], max_tokens: Optional[int] = DEFAULT_CALIB_TOKENS
) -> Dict[int, Tensor]:
    """Per layer, the Gram matrix ``E[ã ã^T]`` [d_mlp + 1, d_mlp + 1] of the MLP activations augmented with a
    constant 1 (its last row holds the mean activations), over the first ``max_tokens`` tokens of ``texts`` (texts
    longer than the model's context are cut into context-sized pieces)."""
    acc = GramAccumulator(check_layers(model, layers), mlp_info(model).d_mlp)
    engine.run(model, calibration_tokens(model, texts, max_tokens), [acc], by_length=False, desc="grams")
    return acc.grams()


@dataclass
class NeuronImportance(Result):
    """Neuron importance over many texts.

    Attributes:
        table: per neuron: mean, mean_abs, var, rms, frac_active (|a| > active_threshold), max, w_out_norm and
            ``importance`` = rms x w_out_norm, the root-mean-square norm of what the neuron writes into the
            residual stream.
        critical: the ``top_k`` most important neurons of each analysed layer, most important first.
    """

    model: str
    layers: List[int]
    n_texts: int
    n_tokens: int
    active_threshold: float
    table: pd.DataFrame = field(repr=False)
    critical: pd.DataFrame = field(repr=False)


def neuron_importance(
    model,
    texts: Sequence[str],
    layer_index: Optional[int] = None,
    layers: Optional[Sequence[int]] = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    top_k: int = 10,
    active_threshold: float = DEFAULT_ACTIVE_THRESHOLD,
    max_tokens: Optional[int] = None,
    progress: bool = True,
) -> NeuronImportance:
    """Per-neuron activation statistics and importance for one layer (``layer_index``) or several (all by default)."""
    if layer_index is not None and layers is not None:
        raise ValueError("give layer_index or layers, not both.")
    chosen = check_layers(model, [layer_index] if layer_index is not None else layers)
    top_k = check_int(top_k, "top_k", 1)
    batch_size = check_batch_size(batch_size)
    active_threshold = check_active_threshold(active_threshold)
    max_tokens = check_max_tokens(max_tokens)
    texts = check_texts(texts)
    if chosen == check_layers(model, None) and active_threshold == DEFAULT_ACTIVE_THRESHOLD:
        acc = calibration_stats(model, texts, max_tokens)  # the same pass as mean values and candidate evidence
    else:
        acc = stream_activations(model, texts, chosen, batch_size, max_tokens, active_threshold, progress)
    table = acc.table()
    w_out = model.W_out.detach().float().cpu().norm(dim=2)  # [L, d_mlp]
    table["w_out_norm"] = w_out[chosen].reshape(-1).numpy()
    table["importance"] = table["rms"] * table["w_out_norm"]
    critical = (
        table.sort_values(["layer", "importance"], ascending=[True, False]).groupby("layer").head(top_k).reset_index(drop=True)
    )
    return NeuronImportance(
        model=model_name(model),
        layers=chosen,
        n_texts=len(texts),
        n_tokens=acc.n_tokens,
        active_threshold=active_threshold,
        table=table,
        critical=critical,
    )


_CALIBRATION_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def calibration_stats(
    model, texts: Optional[Sequence[str]] = None, max_tokens: Optional[int] = DEFAULT_CALIB_TOKENS
) -> NeuronAccumulator:
    """Activation statistics of every layer over the calibration texts (default: the Lee calibration split),
    first ``max_tokens`` tokens (texts longer than the model's context are cut into context-sized pieces);
    computed once per model and text set, then served from a cache.

    Mean-ablation values and the candidates' activation evidence both come from here, so one pass serves both.
    """
    chosen = tuple(check_texts(list(texts))) if texts is not None else tuple(calibration_texts())
    cache = _CALIBRATION_CACHE.setdefault(model, {})
    key = (chosen, max_tokens)
    if key not in cache:
        tokens = calibration_tokens(model, list(chosen), max_tokens)
        cache[key] = stream_tokens(model, tokens, check_layers(model, None))
    return cache[key]


def forget_calibration(model) -> None:
    """Drop the model's cached calibration statistics (after editing its weights in place, say)."""
    _CALIBRATION_CACHE.pop(model, None)
