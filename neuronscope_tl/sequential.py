"""Sequential calibration: each layer's statistics and Gram matrix come from the model with the earlier layers
already pruned, as in SparseGPT, Wanda and SlimGPT.

One-shot calibration (:func:`~neuronscope_tl.selection.calibrate`) measures every layer on the dense model, so a
later layer is fitted to inputs the pruned model never produces. Here the layers are calibrated in contiguous
groups, first to last (``groups=None``: one layer per group, the exact layer-by-layer order). For each group:

1. stream the calibration windows through the model (:func:`neuronscope_tl.engine.run`) with every earlier
   group's pruning attached as hooks (:func:`~neuronscope_tl.surgery.simulation_hooks`), stopping after the
   group's last layer, and collect each of its layers' MLP statistics (:class:`GroupStats`) and augmented Gram
   matrix per calibration fold (:class:`FoldGrams`);
2. select each layer's neurons with the registered method (:mod:`neuronscope_tl.scores`), on a
   :class:`~neuronscope_tl.selection.Calibration` built from those statistics;
3. refit the kept output weights, with the damping chosen on held-out folds
   (:func:`~neuronscope_tl.obs.choose_damp`, leave-one-fold-out; the default calibration's folds are its domains).

The passes start from the tokens and stop early (``stop_at_layer``), so G groups cost about (G + 1) / 2 forward
passes. (Re-entering the residual stream with ``start_at_layer`` would be cheaper in principle, but a
``TransformerBridge`` still computes every block before the start layer.) Methods that need gradients
(``taylor``) cannot be calibrated this way.

Under ``torchrun`` each rank runs its share of the windows; after each group the engine folds the accumulators
across the ranks (statistics merged, Gram sums and counts summed), so every rank selects and refits the same
neurons.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Union

import torch
from torch import Tensor
from tqdm.auto import tqdm

from . import engine
from . import scores as registry
from .activations import NeuronAccumulator
from .arch import output_matrix
from .impact import check_ablation
from .models import mlp_info
from .obs import DEFAULT_DAMP, choose_damp
from .scoring import score_table
from .selection import Calibration, check_sparsity, owl_layer_counts, owl_outlier_scores
from .surgery import PruneSpec, make_spec, simulation_hooks
from .domains import DEFAULT_CALIBRATION_DOMAINS, calibration_sources
from .texts import check_int, check_texts, show
from .weights import neuron_weight_table

# Calibration windows per forward batch.
SEQUENTIAL_BATCH = 8
# Layer groups calibrated in turn by default: each costs a forward pass up to its last layer, so G groups cost
# about (G + 1) / 2 forward passes over the calibration windows.
DEFAULT_GROUPS = 6


@dataclass
class CalibrationWindows:
    """Equal-length calibration windows, each tagged with its fold (the default mix: one fold per domain).

    Attributes:
        tokens: [n_windows, window] token ids, every row a full window (no padding).
        folds: [n_windows] fold index of each window.
        fold_names: the name of each fold (a domain name, or ``part k`` of a single source).
        record: the calibration record for protocols (sources, tokens, hashes).
    """

    tokens: Tensor
    folds: Tensor
    fold_names: List[str]
    record: dict = field(default_factory=dict)

    @property
    def n_tokens(self) -> int:
        return int(self.tokens.numel())


@dataclass
class SequentialSpec:
    """A pruning selected and refitted layer by layer.

    Attributes:
        spec: the :class:`~neuronscope_tl.surgery.PruneSpec` (apply with
            :func:`~neuronscope_tl.surgery.simulation_hooks` or :func:`~neuronscope_tl.surgery.save_pruned`).
        damp: {layer: refit damping used} (empty without a refit).
        damp_errors: {layer: held-out relative refit error for each value of the damping grid}.
        timings: seconds spent.
    """

    spec: PruneSpec
    damp: Dict[int, float] = field(default_factory=dict)
    damp_errors: Dict[int, List[float]] = field(default_factory=dict)
    timings: dict = field(default_factory=dict)


class GroupStats:
    """Activation statistics of a layer group on the streaming engine: reads the group's layers, keeps a
    :class:`~neuronscope_tl.activations.NeuronAccumulator` over every layer (the others stay empty) so that its
    table lines up with the model's weights; gathered and merged across torchrun ranks."""

    needs_grad = False

    def __init__(self, group: Sequence[int], n_layers: int, d_mlp: int):
        self.layers = list(group)
        self.stats = NeuronAccumulator(list(range(n_layers)), d_mlp)

    def observe(self, obs: engine.Observation) -> None:
        self.stats.update(obs.layer, obs.acts)

    def merge(self, other: "GroupStats") -> "GroupStats":
        self.stats.merge(other.stats)
        return self


class FoldGrams:
    """Per layer of a group and per calibration fold, the running sum of ``ã ã^T`` (``ã`` = [activations, 1]) in
    float64, and each fold's token count: a streaming-engine accumulator whose state is sums (summed across
    torchrun ranks by ``all_reduce``). Each row's fold is its window's (``folds[text index]``)."""

    needs_grad = False
    summed = True

    def __init__(self, group: Sequence[int], d_mlp: int, folds: Tensor, n_folds: int):
        self.layers = list(group)
        self.d, self.folds, self.n_folds = d_mlp, folds, n_folds
        self.sums = {(l, f): torch.zeros(d_mlp + 1, d_mlp + 1, dtype=torch.float64) for l in group for f in range(n_folds)}
        self.sums["counts"] = torch.zeros(n_folds, dtype=torch.float64)
        self.count = 0

    def observe(self, obs: engine.Observation) -> None:
        a = obs.acts.float().cpu()
        fold = self.folds[obs.text]
        for f in fold.unique().tolist():
            rows = a[fold == f]
            aug = torch.cat([rows, torch.ones(rows.shape[0], 1)], dim=1)
            self.sums[obs.layer, f] += (aug.t() @ aug).double()
            if obs.layer == self.layers[0]:
                self.sums["counts"][f] += rows.shape[0]
                self.count += rows.shape[0]

    def fold_counts(self) -> List[int]:
        return [int(c) for c in self.sums["counts"].tolist()]

    def fold_grams(self, layer: int) -> List[Tensor]:
        """Each fold's ``E[ã ã^T]`` of ``layer``."""
        return [self.sums[layer, f] / max(n, 1) for f, n in enumerate(self.fold_counts())]

    def gram(self, layer: int) -> Tensor:
        """``E[ã ã^T]`` of ``layer`` over every fold."""
        return sum(self.sums[layer, f] for f in range(self.n_folds)) / max(sum(self.fold_counts()), 1)


def check_sequential_method(method: str) -> str:
    """A registered method that sequential calibration can run: anything but gradient-based scores."""
    score = registry.get(method)
    if score.needs == "gradients":
        ok = [s.name for s in registry.registered() if s.needs != "gradients"]
        raise ValueError(
            f"method {method!r} needs gradients, which sequential calibration does not collect; "
            f"use one of {', '.join(ok)}, or one-shot calibration."
        )
    return method


def check_refit(refit) -> Union[str, float, None]:
    """``"auto"``, a positive damping, or None."""
    if refit is None or refit == "auto":
        return refit
    if isinstance(refit, (int, float)) and not isinstance(refit, bool) and math.isfinite(refit) and refit > 0:
        return float(refit)
    raise ValueError(f"refit must be 'auto', a positive damping or None, got {show(refit)}.")


def sequential_sources(
    calib_texts: Optional[Sequence[str]] = None, calib_sources: Optional[Dict[str, Sequence[str]]] = None
) -> Dict[str, Sequence[str]]:
    """The sources sequential calibration folds over: ``calib_sources`` as given, else ``calib_texts`` as one
    source, else the calibration parts of the default domains."""
    if calib_sources is not None:
        if calib_texts is not None:
            raise ValueError("give calib_texts or calib_sources, not both.")
        if not isinstance(calib_sources, dict) or not calib_sources:
            raise ValueError(f"calib_sources must be a non-empty {{name: texts}} dict, got {show(calib_sources)}.")
        return {str(k): check_texts(list(v)) for k, v in calib_sources.items()}
    if calib_texts is not None:
        return {"user": check_texts(list(calib_texts))}
    return calibration_sources(DEFAULT_CALIBRATION_DOMAINS)


SEQUENTIAL_SCOPES = ("per_layer", "owl")


def check_sequential_scope(scope: str) -> str:
    """Sequential calibration selects layer by layer, so its scope is ``per_layer`` or ``owl`` (per-layer counts
    fixed before the first layer); ``global`` is refused."""
    if scope not in SEQUENTIAL_SCOPES:
        raise ValueError(f"sequential calibration selects layer by layer: use scope 'per_layer' or 'owl', got {scope!r}.")
    return scope


def dense_owl_counts(
    model, windows: CalibrationWindows, sparsity: float, batch_size: int = SEQUENTIAL_BATCH, bf16: bool = False
) -> List[int]:
    """Per-layer counts of :func:`~neuronscope_tl.selection.owl_layer_counts` from the dense model's statistics on
    the calibration windows (one forward pass)."""
    info = mlp_info(model)
    stats = NeuronAccumulator(list(range(info.n_layers)), info.d_mlp)
    engine.run(model, list(windows.tokens), [stats], batch_size=batch_size, by_length=False, desc="owl statistics", bf16=bf16)
    weights = neuron_weight_table(model)
    mag = torch.tensor(weights["mean_abs_weight"].to_numpy()).reshape(info.n_layers, info.d_mlp)
    cal = Calibration(score_table(stats.table(), weights), mag, {}, None)
    return owl_layer_counts(owl_outlier_scores(cal), sparsity)


def layer_groups(n_layers: int, groups: Optional[int]) -> List[List[int]]:
    """Contiguous groups of layers calibrated together: ``groups`` of them, or one per layer when the model has
    fewer layers or ``groups`` is None; sizes differ by at most one."""
    g = n_layers if groups is None else min(check_int(groups, "groups", 1), n_layers)
    bounds = [round(i * n_layers / g) for i in range(g + 1)]
    return [list(range(a, b)) for a, b in zip(bounds, bounds[1:])]


def sequential_spec(
    model,
    windows: CalibrationWindows,
    method: str,
    sparsity: float,
    ablation: str = "mean",
    refit: Union[str, float, None] = "auto",
    seed: int = 0,
    groups: Optional[int] = DEFAULT_GROUPS,
    batch_size: int = SEQUENTIAL_BATCH,
    bf16: bool = False,
    progress: bool = False,
    scope: str = "per_layer",
) -> SequentialSpec:
    """Select and refit the layers group by group on the model pruned so far (see the module docstring).

    ``refit``: ``"auto"`` (the damping chosen per layer on held-out folds), a damping value, or None (no refit:
    pruned neurons are zero- or mean-ablated); ``obs`` always refits (at the default damping when None).
    ``groups``: how many contiguous layer groups are calibrated in turn (None: every layer on its own, the exact
    layer-by-layer order; each group costs a forward pass up to its last layer). ``bf16`` runs the forwards under
    bf16 autocast (about twice as fast where the CPU has bf16 matmuls; statistics and Gram matrices are still
    accumulated in fp32 / fp64). ``scope='owl'`` removes a different count per layer
    (:func:`~neuronscope_tl.selection.owl_layer_counts` on the dense model's statistics, :func:`dense_owl_counts`).
    """
    check_sequential_method(method)
    check_sequential_scope(scope)
    sparsity = check_sparsity(sparsity)
    check_ablation(ablation)
    refit = check_refit(refit)
    if refit == "auto" and len(windows.fold_names) < 2:
        raise ValueError("refit='auto' chooses the damping on held-out folds and needs at least 2 calibration folds.")
    if refit is None and registry.get(method).refit:
        refit = DEFAULT_DAMP
    info = mlp_info(model)
    n_layers, d = info.n_layers, info.d_mlp
    plan = layer_groups(n_layers, groups)
    t0 = time.perf_counter()
    counts = (
        [int(round(sparsity * d))] * n_layers
        if scope == "per_layer"
        else dense_owl_counts(model, windows, sparsity, batch_size, bf16)
    )
    spec = PruneSpec(neurons={}, d_mlp=d, ablation=ablation)
    out = SequentialSpec(spec)
    if not any(counts):
        return out
    weights = neuron_weight_table(model)
    mag = torch.tensor(weights["mean_abs_weight"].to_numpy()).reshape(n_layers, d)
    w_out = output_matrix(model)
    for group in tqdm(plan, desc="sequential calibration", disable=not progress):
        stats = GroupStats(group, n_layers, d)
        grams = FoldGrams(group, d, windows.folds, len(windows.fold_names))
        # One pass of the windows with the pruning so far attached; it stops after the group's last layer.
        engine.run(
            model,
            list(windows.tokens),
            [stats, grams],
            batch_size=batch_size,
            by_length=False,
            desc="sequential calibration",
            variants=[simulation_hooks(spec)],
            bf16=bf16,
        )
        for layer in group:
            if counts[layer] == 0:
                continue
            gram = grams.gram(layer)
            means = {layer: gram[d, :d].float()}
            cal = Calibration(score_table(stats.stats.table(), weights), mag, means, {layer: gram.float()})
            pruned = registry.get(method).select_layer(model, cal, layer, counts[layer], ablation, seed)
            layer_grams, damp = None, DEFAULT_DAMP
            if refit is not None:
                layer_grams = {layer: gram}
                if refit == "auto":
                    damp, errs = choose_damp(
                        grams.fold_grams(layer), grams.fold_counts(), w_out[layer], pruned, ablation == "mean"
                    )
                    out.damp_errors[layer] = errs
                else:
                    damp = float(refit)
                out.damp[layer] = damp
            _merge_layer(spec, make_spec(model, {layer: pruned}, ablation, means, layer_grams, damp, w_out), layer)
    out.timings = {"sequential_s": time.perf_counter() - t0}
    return out


def _merge_layer(spec: PruneSpec, layer_spec: PruneSpec, layer: int) -> None:
    spec.neurons[layer] = layer_spec.neurons[layer]
    for name in ("bias", "delta_out", "replacement", "out_hooks"):
        part = getattr(layer_spec, name)
        if layer in part:
            getattr(spec, name)[layer] = part[layer]


def calibration_windows(
    model, sources: Dict[str, Sequence[str]], n_tokens: int, window: Optional[int] = None, min_folds: int = 4
) -> CalibrationWindows:
    """Full ``window``-token windows (default: 512, or the model's context when shorter) of each source (its texts
    concatenated, each with its BOS), an equal share of ``n_tokens`` from each (rounded up to whole windows),
    interleaved; one fold per source. A single source is cut into ``min_folds`` consecutive parts instead, so that
    the damping is still chosen on text the refit did not see.

    ValueError when a source holds fewer tokens than its share (naming how many it has).
    """
    from .texts import windows as text_windows  # noqa: PLC0415  (the name 'windows' is this function's argument)

    n_tokens = check_int(n_tokens, "calibration tokens", 1)
    window = min(512, int(model.cfg.n_ctx)) if window is None else window
    if not sources:
        raise ValueError("calibration needs at least one text source.")
    per_source = max(1, -(-n_tokens // (window * len(sources))))  # whole windows, at least n_tokens in all
    parts, names = [], []
    for name, texts in sources.items():
        wins = [w for w in text_windows(model, texts, window) if w.numel() == window]
        if len(wins) < per_source:
            have = len(wins) * window
            what = "the calibration texts hold" if len(sources) == 1 else f"calibration source {name!r} holds"
            raise ValueError(
                f"{what} {have} tokens in full {window}-token windows, fewer than the {n_tokens} asked "
                f"for{'' if len(sources) == 1 else f' ({per_source * window} from each source)'}; "
                f"give more text or ask for at most {have * len(sources)} calibration tokens."
            )
        parts.append(torch.stack(wins[:per_source]))
        names.append(name)
    if len(parts) == 1 and min_folds > 1:
        tokens = parts[0]
        folds = torch.arange(len(tokens)) * min(min_folds, len(tokens)) // len(tokens)
        names = [f"{names[0]} part {i + 1}" for i in range(int(folds.max()) + 1)]
    else:
        tokens = torch.stack([p[i] for i in range(per_source) for p in parts])
        folds = torch.arange(len(parts)).repeat(per_source)
    record = {
        "sources": list(sources),
        "folds": names,
        "window": window,
        "n_windows": len(tokens),
        "n_tokens": int(tokens.numel()),
    }
    return CalibrationWindows(tokens, folds, names, record)
