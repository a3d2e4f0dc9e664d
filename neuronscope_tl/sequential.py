"""Sequential (layer-by-layer) calibration: each layer's statistics and Gram matrix come from the model with the
earlier layers already pruned, as in SparseGPT, Wanda and SlimGPT.

One-shot calibration (:func:`~neuronscope_tl.selection.calibrate`) measures every layer on the dense model, so a
later layer is fitted to inputs the pruned model never produces. Here the calibration windows' residual stream is
cached at the input of layer 0 and carried forward one layer at a time (TransformerLens's ``start_at_layer`` /
``stop_at_layer``, on a ``TransformerBridge`` and a ``HookedTransformer`` alike):

1. run layer ``l`` on the cached residual (the model pruned up to ``l - 1``) and collect its MLP statistics and
   augmented Gram matrix, per calibration fold;
2. select layer ``l``'s neurons with the registered method (:mod:`neuronscope_tl.scores`), on a
   :class:`~neuronscope_tl.selection.Calibration` built from those statistics;
3. refit the kept output weights, with the damping chosen on held-out folds
   (:func:`~neuronscope_tl.obs.choose_damp`, leave-one-fold-out; the default calibration's folds are its domains);
4. run layer ``l`` again with its pruning applied, and cache the result as layer ``l + 1``'s input.

Each layer runs twice, so the whole pass costs about two forward passes over the calibration windows. Methods that
need gradients (``taylor``) cannot be calibrated this way.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Union

import torch
from torch import Tensor
from tqdm.auto import tqdm

from . import scores as registry
from .activations import NeuronAccumulator
from .hooks import attached_hooks, mlp_post_name
from .impact import check_ablation
from .models import mlp_info
from .obs import DEFAULT_DAMP, choose_damp
from .scoring import score_table
from .selection import Calibration, check_sparsity
from .surgery import PruneSpec, make_spec, simulation_hooks
from .domains import DEFAULT_CALIBRATION_DOMAINS, calibration_sources
from .texts import check_texts, show
from .weights import neuron_weight_table

# Calibration windows per forward batch.
SEQUENTIAL_BATCH = 8


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


class _LayerCollector:
    """One layer's activation statistics (all folds) and augmented Gram sums per fold."""

    def __init__(self, n_layers: int, layer: int, d_mlp: int, n_folds: int):
        self.layer, self.d = layer, d_mlp
        self.stats = NeuronAccumulator(list(range(n_layers)), d_mlp)
        self.sums = [torch.zeros(d_mlp + 1, d_mlp + 1, dtype=torch.float64) for _ in range(n_folds)]
        self.counts = [0] * n_folds
        self.folds: Optional[Tensor] = None  # the fold of each row of the current batch

    def hook(self, act: Tensor, hook=None) -> None:
        a = act.detach().float().cpu()
        self.stats.update(self.layer, a.reshape(-1, self.d))
        for f in self.folds.unique().tolist():
            rows = a[self.folds == f].reshape(-1, self.d)
            aug = torch.cat([rows, torch.ones(rows.shape[0], 1)], dim=1)
            self.sums[f] += (aug.t() @ aug).double()
            self.counts[f] += rows.shape[0]

    def fold_grams(self) -> List[Tensor]:
        return [s / max(n, 1) for s, n in zip(self.sums, self.counts)]

    def gram(self) -> Tensor:
        return sum(self.sums) / max(sum(self.counts), 1)


def check_sequential_method(method: str) -> str:
    """A registered method that sequential calibration can run: anything but gradient-based scores."""
    score = registry.get(method)
    if score.needs == "gradients":
        ok = [s.name for s in registry.registered() if s.needs != "gradients"]
        raise ValueError(f"method {method!r} needs gradients, which sequential calibration does not collect; "
                         f"use one of {', '.join(ok)}, or one-shot calibration.")
    return method


def check_refit(refit) -> Union[str, float, None]:
    """``"auto"``, a positive damping, or None."""
    if refit is None or refit == "auto":
        return refit
    if isinstance(refit, (int, float)) and not isinstance(refit, bool) and math.isfinite(refit) and refit > 0:
        return float(refit)
    raise ValueError(f"refit must be 'auto', a positive damping or None, got {show(refit)}.")


def sequential_sources(calib_texts: Optional[Sequence[str]] = None,
                       calib_sources: Optional[Dict[str, Sequence[str]]] = None) -> Dict[str, Sequence[str]]:
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


def sequential_spec(
    model,
    windows: CalibrationWindows,
    method: str,
    sparsity: float,
    ablation: str = "mean",
    refit: Union[str, float, None] = "auto",
    seed: int = 0,
    batch_size: int = SEQUENTIAL_BATCH,
    progress: bool = False,
) -> SequentialSpec:
    """Select and refit every layer in turn on the model pruned so far (see the module docstring).

    ``refit``: ``"auto"`` (the damping chosen per layer on held-out folds), a damping value, or None (no refit:
    pruned neurons are zero- or mean-ablated). ``refit`` is ignored for methods without one unless given as a
    number or ``"auto"`` explicitly; ``obs`` always refits.
    """
    check_sequential_method(method)
    sparsity = check_sparsity(sparsity)
    check_ablation(ablation)
    refit = check_refit(refit)
    if refit == "auto" and len(windows.fold_names) < 2:
        raise ValueError("refit='auto' chooses the damping on held-out folds and needs at least 2 calibration folds.")
    if refit is None and registry.get(method).refit:
        refit = DEFAULT_DAMP
    info = mlp_info(model)
    n_layers, d = info.n_layers, info.d_mlp
    k = int(round(sparsity * d))
    spec = PruneSpec(neurons={}, d_mlp=d, ablation=ablation)
    out = SequentialSpec(spec)
    if k == 0:
        return out
    t0 = time.perf_counter()
    weights = neuron_weight_table(model)
    w_out = None
    batches = list(zip(windows.tokens.split(batch_size), windows.folds.split(batch_size)))
    with torch.no_grad():
        resid = [model(tokens, stop_at_layer=0) for tokens, _ in batches]
        for layer in tqdm(range(n_layers), desc="sequential calibration", disable=not progress):
            col = _LayerCollector(n_layers, layer, d, len(windows.fold_names))
            with attached_hooks(model, [(mlp_post_name(layer), col.hook)]):
                for r, (_, folds) in zip(resid, batches):
                    col.folds = folds
                    model(r, start_at_layer=layer, stop_at_layer=layer + 1)
            gram = col.gram()
            table = score_table(col.stats.table(), weights)
            mag = torch.tensor(weights["mean_abs_weight"].to_numpy()).reshape(n_layers, d)
            means = {layer: gram[d, :d].float()}
            cal = Calibration(table, mag, means, {layer: gram.float()})
            pruned = registry.get(method).select_layer(model, cal, layer, k, ablation, seed)
            grams, damp = None, DEFAULT_DAMP
            if refit is not None:
                if w_out is None:
                    from .arch import output_matrix  # noqa: PLC0415  (weights read once, when a refit needs them)

                    w_out = output_matrix(model)
                grams = {layer: gram}
                if refit == "auto":
                    damp, errs = choose_damp(col.fold_grams(), col.counts, w_out[layer], pruned, ablation == "mean")
                    out.damp_errors[layer] = errs
                else:
                    damp = float(refit)
                out.damp[layer] = damp
            layer_spec = make_spec(model, {layer: pruned}, ablation, means, grams, damp)
            _merge_layer(spec, layer_spec, layer)
            if layer + 1 < n_layers:
                with attached_hooks(model, simulation_hooks(layer_spec)):
                    resid = [model(r, start_at_layer=layer, stop_at_layer=layer + 1) for r in resid]
    out.timings = {"sequential_s": time.perf_counter() - t0}
    return out


def _merge_layer(spec: PruneSpec, layer_spec: PruneSpec, layer: int) -> None:
    spec.neurons[layer] = layer_spec.neurons[layer]
    for name in ("bias", "delta_out", "replacement", "out_hooks"):
        part = getattr(layer_spec, name)
        if layer in part:
            getattr(spec, name)[layer] = part[layer]


def calibration_windows(model, sources: Dict[str, Sequence[str]], n_tokens: int, window: int = 512,
                        min_folds: int = 4) -> CalibrationWindows:
    """Full ``window``-token windows of each source (its texts concatenated, each with its BOS), an equal share of
    ``n_tokens`` from each, interleaved; one fold per source. A single source is cut into ``min_folds``
    consecutive parts instead, so that the damping is still chosen on text the refit did not see.

    ValueError when a source holds fewer tokens than its share (naming how many it has).
    """
    from .texts import check_int, windows as text_windows  # noqa: PLC0415  (texts imports models lazily)

    n_tokens = check_int(n_tokens, "calibration tokens", 1)
    if not sources:
        raise ValueError("calibration needs at least one text source.")
    per_source = max(1, n_tokens // window // len(sources))
    parts, names = [], []
    for name, texts in sources.items():
        wins = [w for w in text_windows(model, texts, window) if w.numel() == window]
        if len(wins) < per_source:
            have = sum(int(w.numel()) for w in wins)
            raise ValueError(f"calibration source {name!r} holds {have} tokens in full {window}-token windows, fewer "
                             f"than its share of {per_source * window}; give more text or ask for at most "
                             f"{have * len(sources)} calibration tokens.")
        parts.append(torch.stack(wins[:per_source]))
        names.append(name)
    if len(parts) == 1 and min_folds > 1:
        tokens = parts[0]
        folds = torch.arange(len(tokens)) * min(min_folds, len(tokens)) // len(tokens)
        names = [f"{names[0]} part {i + 1}" for i in range(int(folds.max()) + 1)]
    else:
        tokens = torch.stack([p[i] for i in range(per_source) for p in parts])
        folds = torch.arange(len(parts)).repeat(per_source)
    record = {"sources": list(sources), "folds": names, "window": window, "n_windows": len(tokens),
              "n_tokens": int(tokens.numel())}
    return CalibrationWindows(tokens, folds, names, record)
