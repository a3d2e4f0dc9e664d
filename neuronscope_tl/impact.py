"""Simulated pruning: ablate MLP neurons through ``blocks.{l}.mlp.hook_post`` and measure what changes.

Nothing here edits weights. :func:`measure_plans` streams the texts through the engine (:mod:`neuronscope_tl.engine`)
once clean and once per ablation plan, batch by batch, so a batch analysis of N candidates costs 2N + 1 forwards per
batch, and the clean output is never stored beyond the batch. Metric definitions live in
:mod:`neuronscope_tl.metrics`.

* :func:`simulate_pruning`: one set of neurons in one layer (``PruningImpactAnalyzer.simulate_neuron_pruning``).
* :func:`batch_analysis`: each candidate alone, then cumulatively in the given order, with recommendations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from collections import Counter
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from . import engine
from .activations import DEFAULT_CALIB_TOKENS, calibration_stats, check_index, check_layers
from .export import Result, report_document, write_set
from .hooks import ablation_hooks, resid_post_name
from .metrics import (
    HIGH,
    MODERATE,
    SAFE,
    ImpactThresholds,
    RunningMean,
    kl_from_log_probs,
    nll_from_log_probs,
    top1_agree,
)
from .models import mlp_info, model_name
from .texts import DEFAULT_BATCH_SIZE, TokenBatch, check_batch_size, check_texts, tokenize

ABLATIONS = ("zero", "mean")
Plan = Dict[int, Tuple[List[int], Optional[Tensor]]]  # {layer: (neurons, replacement values or None)}


# ---------------------------------------------------------------------------------------------- validation


def check_ablation(ablation: str) -> str:
    if ablation not in ABLATIONS:
        raise ValueError(f"unknown ablation mode {ablation!r}; valid modes are {', '.join(ABLATIONS)}.")
    return ablation


def check_layer(model, layer_index: Any) -> int:
    return check_layers(model, [layer_index])[0]


def check_neurons(model, neuron_indices: Any, layer_index: Optional[int] = None) -> List[int]:
    """Validate a non-empty list of distinct neuron indices in [0, d_mlp)."""
    d_mlp = mlp_info(model).d_mlp
    where = f" of layer {layer_index}" if layer_index is not None else ""
    if isinstance(neuron_indices, (int, np.integer)) and not isinstance(neuron_indices, bool):
        neuron_indices = [neuron_indices]
    if neuron_indices is not None and not isinstance(neuron_indices, (list, tuple, np.ndarray, torch.Tensor)):
        raise ValueError(f"neuron_indices must be a list of integers in [0, {d_mlp - 1}], got {type(neuron_indices).__name__}.")
    if neuron_indices is None or len(neuron_indices) == 0:
        raise ValueError(f"neuron_indices must list at least one neuron in [0, {d_mlp - 1}].")
    out = [check_index(n, d_mlp, "neuron", "neurons", where) for n in neuron_indices]
    if len(set(out)) != len(out):
        dup = sorted({n for n in out if out.count(n) > 1})
        raise ValueError(f"neuron_indices contains duplicates {dup}; each neuron may be listed once.")
    return out


def check_candidates(model, candidates: Any) -> List[Tuple[int, int]]:
    """Normalise candidates (dicts with layer_index/neuron_index, (layer, neuron) pairs, or a DataFrame)."""
    if isinstance(candidates, pd.DataFrame):
        cols = ("layer", "neuron") if "layer" in candidates.columns else ("layer_index", "neuron_index")
        candidates = list(zip(candidates[cols[0]], candidates[cols[1]]))
    if candidates is not None and not isinstance(candidates, (list, tuple)):
        raise ValueError(
            f"pruning_candidates must be a list of {{layer_index, neuron_index}} dicts or (layer, neuron) pairs, got {type(candidates).__name__}."
        )
    if candidates is None or len(candidates) == 0:
        raise ValueError("pruning_candidates must list at least one {layer_index, neuron_index}.")
    info = mlp_info(model)
    pairs = []
    for i, c in enumerate(candidates):
        if isinstance(c, dict):
            if "layer_index" not in c or "neuron_index" not in c:
                raise ValueError(f"candidate {i} must have layer_index and neuron_index, got keys {sorted(c)}.")
            layer, neuron = c["layer_index"], c["neuron_index"]
        else:
            try:
                layer, neuron = c
            except (TypeError, ValueError):
                raise ValueError(
                    f"candidate {i} must be a {{layer_index, neuron_index}} dict or a (layer, neuron) pair."
                ) from None
        layer = check_index(layer, info.n_layers)
        pairs.append((layer, check_index(neuron, info.d_mlp, "neuron", "neurons", f" of layer {layer}")))
    if len(set(pairs)) != len(pairs):
        dup = sorted(p for p, count in Counter(pairs).items() if count > 1)
        raise ValueError(f"pruning_candidates contains duplicates {dup}; each neuron may be listed once.")
    return pairs


# ---------------------------------------------------------------------------------------------- mean values


def ablation_values(
    model,
    layers: Sequence[int],
    ablation: str,
    calib_texts: Optional[Sequence[str]] = None,
    max_tokens: Optional[int] = DEFAULT_CALIB_TOKENS,
) -> Dict[int, Optional[Tensor]]:
    """Replacement values per layer: None for zero ablation; each neuron's mean activation for mean ablation.

    Means come from :func:`~neuronscope_tl.activations.calibration_stats` over ``calib_texts`` (default: the Lee
    calibration split, first ``max_tokens`` tokens), cached per model and text set, so repeated mean ablations pay
    for the calibration pass once.
    """
    check_ablation(ablation)
    if ablation == "zero":
        return {layer: None for layer in layers}
    stats = calibration_stats(model, calib_texts, max_tokens)
    return {layer: stats.mean[stats.layers.index(layer)].float() for layer in layers}


def make_plan(pairs: Sequence[Tuple[int, int]], values: Dict[int, Optional[Tensor]]) -> Plan:
    """Group (layer, neuron) pairs into an ablation plan with each neuron's replacement value."""
    plan: Dict[int, List[int]] = {}
    for layer, neuron in pairs:
        plan.setdefault(layer, []).append(neuron)
    return {
        layer: (neurons, None if values[layer] is None else values[layer][torch.tensor(neurons)])
        for layer, neurons in plan.items()
    }


# ---------------------------------------------------------------------------------------------- engine


@dataclass
class Measurement:
    """Raw accumulated metrics of one ablation plan over a set of texts."""

    kl: RunningMean = field(default_factory=RunningMean)
    nll_orig: RunningMean = field(default_factory=RunningMean)
    nll_pruned: RunningMean = field(default_factory=RunningMean)
    top1: RunningMean = field(default_factory=RunningMean)
    resid_delta_sq: Dict[int, float] = field(default_factory=dict)
    resid_sq: Dict[int, float] = field(default_factory=dict)
    token_detail: List[dict] = field(default_factory=list)

    def relative_changes(self) -> Dict[int, float]:
        return {
            l: math.sqrt(self.resid_delta_sq[l]) / math.sqrt(self.resid_sq[l]) if self.resid_sq[l] > 0 else 0.0
            for l in sorted(self.resid_sq)
        }


class PlanMetrics:
    """Each ablation plan's metrics against the clean model on the same batch: a streaming-engine accumulator that
    reads the output of every forward (:mod:`neuronscope_tl.engine`), variant 0 being the clean model and variant
    ``i + 1`` plan ``i``.

    The clean forward's NLL, real-position log-probabilities and residual streams are kept until the batch ends.
    """

    layers = ()
    needs_grad = False

    def __init__(self, model, n_plans: int, resid_layers: Sequence[int] = (), token_detail: bool = False):
        self.model = model
        self.results = [Measurement() for _ in range(n_plans)]
        self.resid = {l: resid_post_name(l) for l in resid_layers}
        self.captures = list(self.resid.values())
        self.token_detail = token_detail
        self.clean: Optional[tuple] = None

    def output(self, out: engine.Output) -> None:
        batch, real = out.batch, out.batch.mask
        nll = nll_from_log_probs(out.logp, batch.tokens)
        logp = out.logp[real]  # [n_real, vocab]: KL and top-1 only on real positions
        if out.variant == 0:
            self.clean = (nll, logp, out.captured)
            return
        nll_orig, logp_orig, clean_resid = self.clean
        res = self.results[out.variant - 1]
        tmask = batch.target_mask()
        res.nll_orig.add(nll_orig, tmask)
        res.nll_pruned.add(nll, tmask)
        kl = kl_from_log_probs(logp_orig, logp)
        res.kl.add(kl)
        res.top1.add(top1_agree(logp_orig, logp))
        del logp
        m = real[..., None]
        for l, name in self.resid.items():
            r0, r1 = clean_resid[name].float(), out.captured[name].float()
            res.resid_delta_sq[l] = res.resid_delta_sq.get(l, 0.0) + float(((r1 - r0) * m).double().square().sum())
            res.resid_sq[l] = res.resid_sq.get(l, 0.0) + float((r0 * m).double().square().sum())
        if self.token_detail:
            kl_full = torch.zeros(real.shape, dtype=kl.dtype, device=kl.device)
            kl_full[real] = kl
            for row, length in enumerate(batch.lengths):
                ids = batch.tokens[row, :length]
                res.token_detail.append(
                    {
                        "text_index": batch.text_index[row],
                        "tokens": [self.model.tokenizer.decode([int(t)]) for t in ids],
                        "kl": kl_full[row, :length].tolist(),
                    }
                )

    def end_batch(self, batch: TokenBatch) -> None:
        self.clean = None


def measure_plans(
    model,
    token_lists: Sequence[Tensor],
    plans: Sequence[Plan],
    batch_size: int = DEFAULT_BATCH_SIZE,
    resid_from: Optional[int] = None,
    token_detail: bool = False,
    progress: bool = False,
) -> List[Measurement]:
    """Run every batch clean, then under each plan; accumulate KL, losses, top-1 and residual changes.

    ``resid_from``: record the relative change of ``hook_resid_post`` for blocks resid_from..L-1.
    ``token_detail``: keep each text's per-token KL (position t = the prediction after token t).
    Under torchrun every rank measures every batch (the result is the one process's, on every rank).
    """
    resid_layers = range(resid_from, mlp_info(model).n_layers) if resid_from is not None else ()
    acc = PlanMetrics(model, len(plans), resid_layers, token_detail)
    variants = [[]] + [ablation_hooks(plan) for plan in plans]
    engine.run(model, token_lists, [acc], batch_size, progress=progress, desc="impact", variants=variants, shard=False)
    return acc.results


# ---------------------------------------------------------------------------------------------- results


@dataclass
class ImpactResult(Result):
    """Measured impact of ablating ``neuron_indices`` of ``layer_index`` (see README for definitions).

    Attributes:
        impact_score: mean per-token KL(original || pruned) in nats.
        verdict: ``safe`` / ``moderate`` / ``high`` by the thresholds; ``safe_to_prune`` = verdict == ``safe``.
        loss_original / loss_pruned / loss_change: mean next-token cross-entropy (nats) and their difference.
        top1_agreement: fraction of positions whose arg-max next token is unchanged.
        activation_changes: per block from the ablated one on, relative L2 change of the residual stream after
            the block (``blocks.{k}.hook_resid_post``); the first entry is the ablated block itself.
        token_kl: per text, its tokens and each position's KL (kept for small inputs).
    """

    model: str
    layer_index: int
    neuron_indices: List[int]
    ablation: str
    impact_score: float
    verdict: str
    safe_to_prune: bool
    loss_original: float
    loss_pruned: float
    loss_change: float
    top1_agreement: float
    activation_changes: List[dict]
    n_texts: int
    n_tokens: int
    thresholds: ImpactThresholds
    token_kl: List[dict] = field(default_factory=list, repr=False)


def _summarise(m: Measurement, thresholds: ImpactThresholds) -> dict:
    impact = m.kl.mean
    return {
        "impact_score": impact,
        "verdict": thresholds.verdict(impact),
        "safe_to_prune": thresholds.verdict(impact) == SAFE,
        "loss_original": m.nll_orig.mean,
        "loss_pruned": m.nll_pruned.mean,
        "loss_change": m.nll_pruned.mean - m.nll_orig.mean,
        "top1_agreement": m.top1.mean,
    }


def simulate_pruning(
    model,
    layer_index: int,
    neuron_indices: Sequence[int],
    texts: Union[str, Sequence[str]],
    ablation: str = "zero",
    batch_size: int = DEFAULT_BATCH_SIZE,
    thresholds: Optional[ImpactThresholds] = None,
    calib_texts: Optional[Sequence[str]] = None,
    token_detail: Optional[bool] = None,
    progress: bool = False,
) -> ImpactResult:
    """Ablate the neurons of one layer on ``texts`` and measure the impact against the unpruned model."""
    layer = check_layer(model, layer_index)
    neurons = check_neurons(model, neuron_indices, layer)
    check_ablation(ablation)
    batch_size = check_batch_size(batch_size)
    thresholds = thresholds or ImpactThresholds()
    texts = check_texts(texts)
    token_lists = tokenize(model, texts)
    values = ablation_values(model, [layer], ablation, calib_texts)
    plan = make_plan([(layer, n) for n in neurons], values)
    detail = len(texts) == 1 if token_detail is None else token_detail
    (m,) = measure_plans(model, token_lists, [plan], batch_size, resid_from=layer, token_detail=detail, progress=progress)
    changes = [{"layer": l, "relative_change": v} for l, v in m.relative_changes().items()]
    return ImpactResult(
        model=model_name(model),
        layer_index=layer,
        neuron_indices=neurons,
        ablation=ablation,
        activation_changes=changes,
        n_texts=len(texts),
        n_tokens=sum(int(t.numel()) for t in token_lists),
        thresholds=thresholds,
        token_kl=m.token_detail,
        **_summarise(m, thresholds),
    )


@dataclass
class BatchAnalysis(Result):
    """Individual and cumulative impact of a list of candidates, with recommendations.

    Attributes:
        individual: per candidate, its own impact, loss change, top-1 agreement and verdict.
        cumulative: after step k, the impact of pruning candidates 0..k together (in the given order).
        recommendations: ``safe_to_prune`` / ``moderate`` / ``risky_to_prune`` lists by each candidate's own
            verdict, and ``max_safe_prefix``: how many candidates, in order, can be pruned together while the
            cumulative impact stays safe.
    """

    model: str
    ablation: str
    n_texts: int
    n_tokens: int
    thresholds: ImpactThresholds
    individual: pd.DataFrame = field(repr=False)
    cumulative: pd.DataFrame = field(repr=False)
    recommendations: dict = field(default_factory=dict)


def batch_analysis(
    model,
    candidates: Any,
    texts: Union[str, Sequence[str]],
    batch_size: int = DEFAULT_BATCH_SIZE,
    ablation: str = "zero",
    thresholds: Optional[ImpactThresholds] = None,
    calib_texts: Optional[Sequence[str]] = None,
    progress: bool = True,
) -> BatchAnalysis:
    """Measure each candidate alone, then the candidates pruned together cumulatively, in order."""
    pairs = check_candidates(model, candidates)
    check_ablation(ablation)
    batch_size = check_batch_size(batch_size)
    thresholds = thresholds or ImpactThresholds()
    texts = check_texts(texts)
    token_lists = tokenize(model, texts)
    values = ablation_values(model, sorted({l for l, _ in pairs}), ablation, calib_texts)
    individual_plans = [make_plan([p], values) for p in pairs]
    cumulative_plans = [make_plan(pairs[: k + 1], values) for k in range(1, len(pairs))]
    measured = measure_plans(model, token_lists, individual_plans + cumulative_plans, batch_size, progress=progress)
    ind, cum = measured[: len(pairs)], [measured[0]] + measured[len(pairs) :]

    ind_rows = []
    for (layer, neuron), m in zip(pairs, ind):
        s = _summarise(m, thresholds)
        ind_rows.append({"layer": layer, "neuron": neuron, "label": f"L{layer}N{neuron}", **s})
    cum_rows = []
    for k, ((layer, neuron), m) in enumerate(zip(pairs, cum)):
        s = _summarise(m, thresholds)
        cum_rows.append({"step": k + 1, "layer": layer, "neuron": neuron, "label": f"L{layer}N{neuron}", "n_pruned": k + 1, **s})
    individual = pd.DataFrame(ind_rows)
    cumulative = pd.DataFrame(cum_rows)

    def pick(verdict):
        rows = individual[individual["verdict"] == verdict]
        return [
            {"layer_index": int(r.layer), "neuron_index": int(r.neuron), "impact_score": float(r.impact_score)}
            for r in rows.itertuples()
        ]

    safe_prefix = 0
    for ok in cumulative["verdict"] == SAFE:
        if not ok:
            break
        safe_prefix += 1
    recommendations = {
        "safe_to_prune": pick(SAFE),
        "moderate": pick(MODERATE),
        "risky_to_prune": pick(HIGH),
        "max_safe_prefix": safe_prefix,
        "cumulative_impact": float(cumulative["impact_score"].iloc[-1]),
        "cumulative_verdict": str(cumulative["verdict"].iloc[-1]),
    }
    return BatchAnalysis(
        model=model_name(model),
        ablation=ablation,
        n_texts=len(texts),
        n_tokens=sum(int(t.numel()) for t in token_lists),
        thresholds=thresholds,
        individual=individual,
        cumulative=cumulative,
        recommendations=recommendations,
    )


# ---------------------------------------------------------------------------------------------- export


def impact_document(result: Union[ImpactResult, BatchAnalysis], settings: Optional[dict] = None) -> dict:
    """The JSON document of an impact or batch analysis (same schema as the weight export)."""
    kind = "impact_analysis" if isinstance(result, ImpactResult) else "batch_analysis"
    base = {"ablation": result.ablation, "thresholds": result.thresholds}
    if isinstance(result, ImpactResult):
        base.update({"layer_index": result.layer_index, "neuron_indices": result.neuron_indices})
    base.update(settings or {})
    texts = {"n_texts": result.n_texts, "n_tokens": result.n_tokens}
    return report_document(kind, result.model, base, texts, result.to_dict())


def export_impact(
    result: Union[ImpactResult, BatchAnalysis], path: Union[str, Path], settings: Optional[dict] = None
) -> List[Path]:
    """Write the impact JSON at ``path``; a batch analysis also writes its tables as ``*_individual.csv`` and
    ``*_cumulative.csv`` beside it. The files are written as one set (:func:`~neuronscope_tl.export.write_set`):
    all of them are new, or on any error all are as they were."""
    path = Path(path)
    files: Dict[Path, Any] = {path: impact_document(result, settings)}
    if isinstance(result, BatchAnalysis):
        files[path.with_name(path.stem + "_individual.csv")] = result.individual
        files[path.with_name(path.stem + "_cumulative.csv")] = result.cumulative
    return write_set(files)
