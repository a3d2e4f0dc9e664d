"""The registry of neuron scores: every ranking method of the pruning curves, and the score columns it adds.

Each method is one registered :class:`Score` (in the spirit of Torch-Pruning's ``Importance`` objects): a name, a
one-line description with its reference, what it needs, whether it is random, and a function that returns a
``[n_layers, d_mlp]`` float64 tensor, low = prune first, from the calibration context
(:class:`~neuronscope_tl.selection.Calibration`) and the ablation mode. A score may also define :class:`Column`\\ s:
per-neuron columns that :mod:`neuronscope_tl.scoring` computes in its one pass (weight norms and activation
statistics are the pass's own; every registered column joins its table and the cheap scores validated against
exact ablation). Selection, curves, the CLI and the app read everything from here::

    register(Score("w_out", "||W_out row|| alone", needs="weights", rank=by_column("w_out_norm")))

A method that is one new column, ranked by it, is :func:`column_score` (``wanda`` and ``fluctuation`` are).

Built-in methods:

* ``magnitude``: the neuron's mean |w| over its input and output weights (:mod:`neuronscope_tl.weights`);
* ``activation``: mean |a| over the calibration tokens;
* ``wanda``: ||W_out row|| x RMS activation, the structured (per-neuron) form of Wanda's |W| x ||X|| (Sun et al.
  2023); score column ``wanda``;
* ``wanda_io``: RMS activation x sqrt(||W_in row||^2 + ||W_out row||^2), structured Wanda over the neuron's input
  and output weights together (the input row is ``up_proj``'s on a gated MLP); score column ``wanda_io``;
* ``fluctuation``: var(a) x ||W_out row||^2, FLAP's fluctuation metric (An et al. 2024); score column
  ``fluctuation``;
* ``taylor``: |first-order Taylor estimate of the loss change| for the ablation (gradient x activation, Molchanov
  et al. 2019), from its score columns. With ``L`` the mean next-token cross-entropy over the N positions that
  have a real next token, ``g_t = dL_sum/da_t`` the gradient of the summed loss w.r.t. the activation at real
  position t, and mu the neuron's mean activation:

      taylor_zero = sum_t g_t * (0 - a_t) / N
      taylor_mean = sum_t g_t * (mu - a_t) / N = (mu * sum_t g_t - sum_t g_t a_t) / N

  The columns are signed, so they estimate ``loss_change`` of :func:`neuronscope_tl.impact.simulate_pruning`
  directly; the sums run over every real position (the last position's gradient is 0: it predicts no real token).
* ``random``: uniform random, one draw per seed (the baseline of Santacroce et al. 2023);
* ``obs``: greedy structured Optimal Brain Surgeon selection with a least-squares refit of the kept neurons'
  output weights from the calibration Gram matrix (ZipLM, Kurtic et al. 2023; SparseGPT, Frantar & Alistarh
  2023). It is a selection rather than a plain score: :class:`ObsScore` overrides :meth:`Score.per_layer` and
  :meth:`Score.comparable` and sets ``refit``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from .obs import obs_order
from .surgery import Neurons
from .texts import show

if TYPE_CHECKING:  # type hints only: selection imports this module
    from .selection import Calibration

# What a score reads, cheapest first: nothing (random), the weights only, activation statistics, gradients (all
# three from the one scoring pass), or the activation Gram matrices (an extra calibration pass).
NEEDS = ("nothing", "weights", "activations", "gradients", "grams")


# ---------------------------------------------------------------------------------------------- definitions


@dataclass(frozen=True)
class PassSums:
    """The gradient sums of one scoring pass, float64, one entry per neuron in table order (layer-major).

    Attributes:
        sum_grad: sum over real positions t of g_t = dL_sum/da_t.
        sum_grad_act: sum over real positions of g_t * a_t.
        n_targets: loss terms (positions with a real next token), at least 1.
    """

    sum_grad: np.ndarray
    sum_grad_act: np.ndarray
    n_targets: int


@dataclass(frozen=True)
class Column:
    """A per-neuron score column of :func:`~neuronscope_tl.scoring.score_neurons`'s table.

    ``formula(table, sums)`` gets the table so far (weight norms, activation statistics and the columns
    registered before this one) and the pass's :class:`PassSums`, and returns one value per row.
    """

    name: str
    formula: Callable[[pd.DataFrame, PassSums], Union[np.ndarray, pd.Series]]


RankFn = Callable[["Calibration", str, int], Tensor]


def by_column(name: str) -> RankFn:
    """A rank function that reads one column of the calibration table, the same for every ablation and seed."""
    return lambda cal, ablation, seed: cal.column(name)


def layer_counts(k: Union[int, Sequence[int]], n_layers: int) -> List[int]:
    """One count per layer: ``k`` repeated, or ``k`` itself when it already gives one per layer."""
    ks = [int(k)] * n_layers if isinstance(k, int) else [int(v) for v in k]
    if len(ks) != n_layers:
        raise ValueError(f"expected one count per layer ({n_layers}), got {len(ks)}.")
    return ks


@dataclass(frozen=True)
class Score:
    """One ranking method.

    Attributes:
        name: the method's name (``--methods``, ``prune_curve(methods=...)``).
        description: one line, with the reference it follows.
        needs: what it reads, one of :data:`NEEDS`.
        rank: ``rank(cal, ablation, seed)`` -> ``[n_layers, d_mlp]`` scores, low = prune first.
        columns: score columns this method adds to the scoring pass's table.
        random: it draws from ``seed``; curves run it once per seed and report mean and spread.
        refit: the pruned model carries a least-squares refit of the kept neurons' output weights (Gram matrices).
    """

    name: str
    description: str
    needs: str
    rank: Optional[RankFn] = None
    columns: Tuple[Column, ...] = ()
    random: bool = False
    refit: bool = False

    @property
    def needs_grams(self) -> bool:
        """Whether calibration must collect the activation Gram matrices for this method."""
        return self.needs == "grams" or self.refit

    def scores(self, cal: "Calibration", ablation: str = "zero", seed: int = 0) -> Tensor:
        """``[n_layers, d_mlp]`` float64 scores, low = prune first."""
        if self.rank is None:
            raise ValueError(f"method {self.name!r} has no plain score; it selects neurons itself (select_neurons).")
        score = self.rank(cal, ablation, seed)
        if tuple(score.shape) != cal.shape:
            raise ValueError(f"method {self.name!r} returned scores of shape {tuple(score.shape)}, expected {cal.shape}.")
        return score.to(torch.float64)

    __call__ = scores

    def per_layer(self, model, cal: "Calibration", k: Union[int, Sequence[int]], ablation: str, seed: int = 0) -> Neurons:
        """The ``k`` lowest-scored neurons of every layer (ties by index); ``k`` is one count or one per layer."""
        order = self.scores(cal, ablation, seed).argsort(dim=1, stable=True)
        ks = layer_counts(k, order.shape[0])
        return {l: sorted(order[l, : ks[l]].tolist()) for l in range(order.shape[0])}

    def select_layer(self, model, cal: "Calibration", layer: int, k: int, ablation: str, seed: int = 0) -> List[int]:
        """The ``k`` lowest-scored neurons of one layer (sequential calibration selects layer by layer)."""
        return sorted(self.scores(cal, ablation, seed)[layer].argsort(stable=True)[:k].tolist())

    def comparable(self, model, cal: "Calibration", sparsity: float, ablation: str, seed: int = 0) -> Tensor:
        """Scores comparable across layers for global selection: z-scored within each layer (as FLAP does).
        A non-finite entry is never selected."""
        score = self.scores(cal, ablation, seed)
        return (score - score.mean(1, keepdim=True)) / score.std(1, keepdim=True).clamp_min(1e-12)


def column_score(name: str, description: str, needs: str, formula: Callable[[pd.DataFrame, PassSums], Any]) -> Score:
    """A method that adds one score column under its own name and ranks by it."""
    return Score(name, description, needs, by_column(name), columns=(Column(name, formula),))


@dataclass(frozen=True)
class ObsScore(Score):
    """Greedy structured OBS: each layer's removal order and cumulative reconstruction error
    (:func:`~neuronscope_tl.obs.obs_order`), cached in the calibration per (ablation, layer)."""

    def order(self, model, cal: "Calibration", ablation: str, layer: int, n_remove: int) -> Tuple[List[int], List[float]]:
        """The first ``n_remove`` neurons of the layer's removal order and the error after each removal."""
        key = (ablation, layer)
        have = cal.obs.get(key)
        if have is None or len(have[0]) < n_remove:
            if cal.grams is None:
                raise ValueError(f"method {self.name!r} needs the calibration Gram matrices (calibrate(..., with_grams=True)).")
            w_out = model.W_out[layer].detach().float().cpu()
            cal.obs[key] = obs_order(cal.grams[layer], w_out, n_remove, keep_constant=ablation == "mean")
        order, err = cal.obs[key]
        return order[:n_remove], err[:n_remove]

    def per_layer(self, model, cal: "Calibration", k: Union[int, Sequence[int]], ablation: str, seed: int = 0) -> Neurons:
        ks = layer_counts(k, cal.shape[0])
        return {l: self.select_layer(model, cal, l, ks[l], ablation, seed) for l in range(cal.shape[0])}

    def select_layer(self, model, cal: "Calibration", layer: int, k: int, ablation: str, seed: int = 0) -> List[int]:
        return sorted(self.order(model, cal, ablation, layer, k)[0])

    def comparable(self, model, cal: "Calibration", sparsity: float, ablation: str, seed: int = 0) -> Tensor:
        """The cumulative reconstruction error divided by the layer's output energy, along each layer's removal
        order up to twice the sparsity; inf beyond it."""
        n_layers, d = cal.shape
        depth = min(d - 1, max(1, int(round(min(1.0, 2 * sparsity) * d))))
        score = torch.full((n_layers, d), math.inf, dtype=torch.float64)
        w_out = model.W_out.detach().float().cpu()
        for l in range(n_layers):
            order, err = self.order(model, cal, ablation, l, depth)
            g = cal.grams[l][:d, :d].double()
            energy = float(torch.einsum("ij,ik,jk->", g, w_out[l].double(), w_out[l].double()))
            score[l, torch.tensor(order)] = torch.tensor(err, dtype=torch.float64) / max(energy, 1e-12)
        return score


# ---------------------------------------------------------------------------------------------- registry


_REGISTRY: Dict[str, Score] = {}


def register(score: Score, replace: bool = False) -> Score:
    """Add a method (``replace=True`` overwrites one of the same name). Returns it."""
    if not isinstance(score, Score):
        raise ValueError(f"register takes a Score, got {show(score)}.")
    if not score.name.isidentifier():
        raise ValueError(f"a method name must be an identifier, got {score.name!r}.")
    if score.needs not in NEEDS:
        raise ValueError(f"method {score.name!r}: needs must be one of {', '.join(NEEDS)}, got {score.needs!r}.")
    if score.rank is None and type(score).per_layer is Score.per_layer:
        raise ValueError(f"method {score.name!r} needs a rank function (or its own per_layer / comparable).")
    if score.name in _REGISTRY and not replace:
        raise ValueError(f"method {score.name!r} is already registered; pass replace=True to overwrite it.")
    others = [c.name for s in _REGISTRY.values() if s.name != score.name for c in s.columns]
    clash = [c.name for c in score.columns if c.name in others]
    if clash:
        raise ValueError(f"method {score.name!r}: score column(s) {clash} are already defined by another method.")
    _REGISTRY[score.name] = score
    return score


def unregister(name: str) -> Score:
    """Remove a method and return it."""
    return _REGISTRY.pop(check_method(name))


def check_method(method: str) -> str:
    """A registered method name; otherwise a ValueError listing the valid ones."""
    if not isinstance(method, str) or method not in _REGISTRY:
        raise ValueError(f"unknown method {show(method)}; valid methods are {', '.join(_REGISTRY)}.")
    return method


def get(method: str) -> Score:
    """The registered :class:`Score` of that name; otherwise a ValueError listing the valid names."""
    return _REGISTRY[check_method(method)]


def registered() -> Tuple[Score, ...]:
    """Every registered method, in registration order."""
    return tuple(_REGISTRY.values())


def method_names() -> Tuple[str, ...]:
    """The registered method names, in registration order (also readable as ``scores.METHODS``)."""
    return tuple(_REGISTRY)


def columns() -> Tuple[Column, ...]:
    """The score columns of every registered method, in registration order."""
    return tuple(c for s in _REGISTRY.values() for c in s.columns)


def needs_grams(methods: Iterable[str]) -> bool:
    """Whether any of these methods needs the calibration Gram matrices."""
    return any(get(m).needs_grams for m in methods)


def needs_gradients(methods: Iterable[str]) -> bool:
    """Whether any of these methods reads gradients (calibration then runs a backward pass)."""
    return any(get(m).needs == "gradients" for m in methods)


def is_random(method: str) -> bool:
    """Whether the method is registered and draws from a seed."""
    return method in _REGISTRY and _REGISTRY[method].random


def describe() -> str:
    """One line per method: name, what it needs, description."""
    return "\n".join(f"{s.name} [{s.needs}]: {s.description}" for s in _REGISTRY.values())


def __getattr__(name: str):
    # METHODS is read from the registry on each access, so a method registered later is listed too.
    if name == "METHODS":
        return method_names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---------------------------------------------------------------------------------------------- built-in methods


def _magnitude(cal: "Calibration", ablation: str, seed: int) -> Tensor:
    return cal.magnitude.double()


def _taylor(cal: "Calibration", ablation: str, seed: int) -> Tensor:
    return cal.column("taylor_mean" if ablation == "mean" else "taylor_zero").abs()


def _random(cal: "Calibration", ablation: str, seed: int) -> Tensor:
    return torch.rand(cal.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


register(Score("magnitude", "mean |w| of the neuron's input and output weights (weight magnitude)", "weights", _magnitude))
register(Score("activation", "mean |a| over the calibration tokens", "activations", by_column("mean_abs")))
register(
    column_score(
        "wanda",
        "||W_out row|| x RMS activation: structured Wanda (Sun et al. 2023)",
        "activations",
        lambda t, s: t["w_out_norm"] * t["rms"],
    )
)
register(
    column_score(
        "wanda_io",
        "RMS activation x norm of the neuron's W_in and W_out rows together: structured Wanda with input norms",
        "activations",
        lambda t, s: t["rms"] * (t["w_in_norm"] ** 2 + t["w_out_norm"] ** 2) ** 0.5,
    )
)
register(
    column_score(
        "fluctuation",
        "var(a) x ||W_out row||^2: FLAP's fluctuation metric (An et al. 2024)",
        "activations",
        lambda t, s: t["var"] * t["w_out_norm"] ** 2,
    )
)
register(
    Score(
        "taylor",
        "|sum_t g_t (0 - a_t)| or |sum_t g_t (mu - a_t)| by ablation: gradient x activation (Molchanov et al. 2019)",
        "gradients",
        _taylor,
        columns=(
            Column("taylor_zero", lambda t, s: -s.sum_grad_act / s.n_targets),
            Column("taylor_mean", lambda t, s: (t["mean"].to_numpy() * s.sum_grad - s.sum_grad_act) / s.n_targets),
        ),
    )
)
register(
    Score("random", "uniform random, one draw per seed: the baseline (Santacroce et al. 2023)", "nothing", _random, random=True)
)
register(
    ObsScore(
        "obs",
        "greedy structured Optimal Brain Surgeon with a least-squares refit of the kept output weights "
        "(ZipLM, Kurtic et al. 2023)",
        needs="grams",
        refit=True,
    )
)
