"""The evaluation protocol, pruning curves against a random baseline, and an automated pruning search.

* :func:`evaluate_perplexity`: perplexity over non-overlapping windows of the evaluation texts (default: Lee
  articles 200-299), with the full protocol recorded (model and weight hash, texts and token count, window, seed,
  library versions). ``bf16=True`` runs the forwards under ``torch.autocast('cpu', torch.bfloat16)`` (weights stay
  fp32); :func:`prune_curve` uses it only after measuring that dense bf16 is within 0.5% of fp32.
* :func:`prune_curve`: perplexity against sparsity for each ranking method, pruning simulated through hooks
  (the core's :func:`~neuronscope_tl.impact.make_plan` / :func:`~neuronscope_tl.hooks.ablation_hooks`, via
  :func:`~neuronscope_tl.surgery.simulation_hooks`). One scoring pass (:func:`~neuronscope_tl.scoring.score_neurons`)
  serves every method:

  - ``magnitude``: the neuron's mean |w| (the seed's "low weight = safe to prune"; :mod:`neuronscope_tl.weights`);
  - ``activation``: mean |a|;
  - ``wanda``: ||W_out row|| x RMS activation, structured Wanda (Sun et al. 2023);
  - ``fluctuation``: var(a) x ||W_out row||^2, FLAP (An et al. 2024);
  - ``taylor``: |sum_t g_t a_t| (zero ablation) or |sum_t g_t (mu - a_t)| (mean ablation), gradient x activation;
  - ``random``: uniform random, over 3 seeds, reported as mean and spread (the baseline of Santacroce et al. 2023);
  - ``obs``: greedy structured Optimal Brain Surgeon selection with a least-squares refit of the kept neurons'
    output weights (and bias, for mean ablation) from the calibration Gram matrix (ZipLM, Kurtic et al. 2023;
    SparseGPT, Frantar & Alistarh 2023). The refit is carried into the physically smaller model.

  **Scope.** ``per_layer`` removes the same fraction from every layer. ``global`` ranks all neurons together; to
  make scores comparable across layers each layer's scores are standardised (z-score within the layer, as FLAP
  does), and ``obs`` uses its cumulative reconstruction error divided by the layer's output energy. Every layer
  keeps at least one neuron.
  **Ablation.** ``zero``, or ``mean``: the neuron's mean calibration activation, which the exported model carries
  as an output bias (FLAP's bias compensation).
* :func:`search_pruning`: the largest per-layer sparsity whose held-out perplexity stays within a budget.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import pandas as pd
import torch
from torch import Tensor
from tqdm.auto import tqdm

from .export import Result
from .hooks import attached_hooks
from .impact import check_ablation
from .metrics import perplexity, token_nll
from .models import mlp_info, model_name
from .surgery import Neurons, PruneSpec, activation_grams, make_spec, obs_order, simulation_hooks
from .texts import as_finite_real, calibration_texts, check_int, check_max_tokens, check_texts, check_window, evaluation_texts, show, windows

METHODS = ("magnitude", "activation", "wanda", "fluctuation", "taylor", "random", "obs")
SCOPES = ("per_layer", "global")
DEFAULT_SPARSITIES = (0.1, 0.2, 0.3, 0.5)
RANDOM_SEEDS = (0, 1, 2)
DEFAULT_WINDOW = 512
DEFAULT_CALIB_TOKENS = 8192
# Every third window of the evaluation split: ~8.7k tokens, the default protocol (ratios match the full split).
DEFAULT_EVERY = 3
BF16_TOLERANCE = 0.005
# The project's recommendation: the best method on its own curve of the default model (see README / benchmark).
RECOMMENDED_METHOD = "obs"
RECOMMENDED_ABLATION = "mean"


# ---------------------------------------------------------------------------------------------- validation


MAX_SEED = 2**63 - 1


def check_sparsity(sparsity, name: str = "sparsity") -> float:
    """A fraction of neurons: a real number in [0, 1)."""
    value = as_finite_real(sparsity)
    if value is None or not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be a number in [0, 1), got {show(sparsity)}.")
    return value


def check_sparsities(sparsities) -> List[float]:
    """A non-empty list of sparsities, each in [0, 1)."""
    if isinstance(sparsities, (str, bytes)) or not isinstance(sparsities, (list, tuple, np.ndarray, range)):
        raise ValueError(f"sparsities must be a non-empty list of numbers in [0, 1), got {show(sparsities)}.")
    if len(sparsities) == 0:
        raise ValueError("sparsities must be a non-empty list of numbers in [0, 1).")
    return [check_sparsity(s) for s in sparsities]


def check_step(step, name: str) -> float:
    """A search step: a real number in (0, 1)."""
    value = as_finite_real(step)
    if value is None or not 0.0 < value < 1.0:
        raise ValueError(f"{name} must be a number in (0, 1), got {show(step)}.")
    return value


def check_seed(seed, name: str = "seed") -> int:
    return check_int(seed, name, 0, MAX_SEED)


def check_seeds(seeds) -> List[int]:
    if isinstance(seeds, (str, bytes)) or not isinstance(seeds, (list, tuple, range, np.ndarray)) or len(seeds) == 0:
        raise ValueError(f"seeds must be a non-empty list of integers in [0, {MAX_SEED}], got {show(seeds)}.")
    return [check_seed(s, "each seed") for s in seeds]


def check_every(every) -> int:
    """Score every n-th window: an integer >= 1."""
    return check_int(every, "every (score every n-th window)", 1)


def check_method(method: str) -> str:
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"unknown method {show(method)}; valid methods are {', '.join(METHODS)}.")
    return method


def check_scope(scope: str) -> str:
    if not isinstance(scope, str) or scope not in SCOPES:
        raise ValueError(f"unknown scope {show(scope)}; valid scopes are {', '.join(SCOPES)}.")
    return scope


def check_budget(loss_budget) -> float:
    """The allowed relative perplexity increase: a finite number > 0."""
    value = as_finite_real(loss_budget)
    if value is None or not value > 0:
        raise ValueError(f"loss_budget must be a finite relative perplexity increase > 0 (e.g. 0.05 for +5%), got {show(loss_budget)}.")
    return value


# ---------------------------------------------------------------------------------------------- protocol


def weights_hash(model) -> str:
    """SHA-256 over the HF model's parameters and buffers (clean names, sorted), first 16 hex digits."""
    h = hashlib.sha256()
    seen = set()
    for key, value in sorted(model.original_model.state_dict().items()):
        clean = key.replace("._original_component", "")
        if clean in seen or not torch.is_tensor(value):
            continue
        seen.add(clean)
        h.update(clean.encode())
        h.update(value.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def library_versions() -> Dict[str, str]:
    import transformer_lens
    import transformers

    from . import __version__

    tl = getattr(transformer_lens, "__version__", None)
    if tl is None:
        from importlib.metadata import version

        tl = version("transformer-lens")
    return {"torch": torch.__version__, "transformers": transformers.__version__, "transformer_lens": tl, "neuronscope_tl": __version__}


def texts_record(texts: Optional[Sequence[str]], default: str) -> Tuple[List[str], dict]:
    """Resolve default texts and describe them: name, number of texts and SHA-256 of their content."""
    if texts is None:
        chosen = evaluation_texts() if default == "evaluation" else calibration_texts()
        name = "lee[200:300]" if default == "evaluation" else "lee[0:200]"
    else:
        chosen, name = check_texts(list(texts)), "user"
    digest = hashlib.sha256("\n".join(chosen).encode()).hexdigest()[:16]
    return chosen, {"name": name, "n_texts": len(chosen), "sha256": digest}


@dataclass
class EvalWindows:
    """The token windows one protocol scores: every ``every``-th non-overlapping window of ``window`` tokens."""

    tokens: List[Tensor]
    window: int
    every: int
    texts: dict

    @property
    def n_scored(self) -> int:
        return sum(int(t.numel()) - 1 for t in self.tokens)


def eval_windows(model, texts: Optional[Sequence[str]] = None, window: int = DEFAULT_WINDOW, every: int = 1) -> EvalWindows:
    every = check_every(every)
    window = check_window(model, window)
    chosen, record = texts_record(texts, "evaluation")
    wins = windows(model, chosen, window)[::every]
    return EvalWindows(wins, window, every, record)


def window_nll(model, wins: EvalWindows, hooks: Sequence = (), bf16: bool = False, progress: bool = False) -> Tuple[float, int]:
    """Summed next-token NLL and number of scored tokens over the windows, with ``hooks`` attached."""
    total, count = 0.0, 0
    with attached_hooks(model, hooks), torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        for ids in tqdm(wins.tokens, desc="perplexity", disable=not progress):
            nll = token_nll(model(ids[None]), ids[None])
            total += float(nll.double().sum())
            count += int(nll.numel())
    return total, count


@dataclass
class PerplexityResult(Result):
    """Perplexity of a model on the protocol's windows.

    Attributes:
        perplexity: exp(mean next-token NLL) over every scored token (each window's first token is context only).
        mean_nll: that mean NLL in nats.
        n_tokens: tokens scored; n_windows: windows used.
        protocol: model, weight hash, texts, window, seed, precision and library versions.
    """

    perplexity: float
    mean_nll: float
    n_tokens: int
    n_windows: int
    protocol: dict


def protocol_record(model, wins: EvalWindows, seed: int, precision: str, calib: Optional[dict] = None) -> dict:
    return {
        "model": model_name(model),
        "weights_sha256": weights_hash(model),
        "eval_texts": wins.texts,
        "window": wins.window,
        "every_nth_window": wins.every,
        "n_windows": len(wins.tokens),
        "n_tokens_scored": wins.n_scored,
        "calibration": calib,
        "seed": seed,
        "precision": precision,
        "versions": library_versions(),
    }


def evaluate_perplexity(model, texts: Optional[Sequence[str]] = None, window: int = DEFAULT_WINDOW, every: int = 1,
                        bf16: bool = False, hooks: Sequence = (), seed: int = 0, progress: bool = False) -> PerplexityResult:
    """Perplexity over non-overlapping ``window``-token windows of ``texts`` (default: Lee articles 200-299).

    The texts are concatenated (each with its BOS) and cut into windows; ``every=3`` scores every third window.
    """
    seed = check_seed(seed)
    wins = eval_windows(model, texts, window, every)
    total, count = window_nll(model, wins, hooks, bf16, progress)
    return PerplexityResult(
        perplexity=perplexity(total, count), mean_nll=total / count, n_tokens=count, n_windows=len(wins.tokens),
        protocol=protocol_record(model, wins, seed, "bf16-autocast" if bf16 else "fp32"),
    )


# ---------------------------------------------------------------------------------------------- rankings


@dataclass
class Calibration:
    """Everything the methods need, from one scoring pass (and a Gram pass for ``obs``)."""

    scores: pd.DataFrame
    magnitude: Tensor  # [L, d_mlp]
    means: Dict[int, Tensor]
    grams: Optional[Dict[int, Tensor]] = None
    obs: Dict[Tuple[str, int], Tuple[List[int], List[float]]] = field(default_factory=dict)
    record: dict = field(default_factory=dict)


def calibrate(model, calib_texts: Optional[Sequence[str]] = None, calib_tokens: int = DEFAULT_CALIB_TOKENS,
              with_grams: bool = True, scores: Optional[pd.DataFrame] = None) -> Calibration:
    """One scoring pass (:func:`score_neurons`) and, for ``obs``, one Gram pass over the calibration tokens."""
    from .scoring import score_neurons
    from .weights import neuron_weight_table

    calib_tokens = check_max_tokens(calib_tokens, "calib_tokens")
    texts, record = texts_record(calib_texts, "calibration")
    record["max_tokens"] = calib_tokens
    info = mlp_info(model)
    if scores is None:
        scores = score_neurons(model, texts, max_tokens=calib_tokens)
    scores = scores.sort_values(["layer", "neuron"]).reset_index(drop=True)
    mag = torch.tensor(neuron_weight_table(model)["mean_abs_weight"].to_numpy()).reshape(info.n_layers, info.d_mlp)
    mean = torch.tensor(scores["mean"].to_numpy(), dtype=torch.float32).reshape(info.n_layers, info.d_mlp)
    grams = activation_grams(model, texts, list(range(info.n_layers)), calib_tokens) if with_grams else None
    return Calibration(scores, mag, {l: mean[l] for l in range(info.n_layers)}, grams, record=record)


def _column(cal: Calibration, name: str, shape) -> Tensor:
    return torch.tensor(cal.scores[name].to_numpy(), dtype=torch.float64).reshape(shape)


def method_scores(model, cal: Calibration, method: str, ablation: str, seed: int = 0) -> Tensor:
    """[L, d_mlp] scores, low = prune first (``obs`` is handled by :func:`select_neurons`)."""
    info = mlp_info(model)
    shape = (info.n_layers, info.d_mlp)
    if method == "magnitude":
        return cal.magnitude.double()
    if method == "activation":
        return _column(cal, "mean_abs", shape)
    if method in ("wanda", "fluctuation"):
        return _column(cal, method, shape)
    if method == "taylor":
        return _column(cal, "taylor_mean" if ablation == "mean" else "taylor_zero", shape).abs()
    if method == "random":
        return torch.rand(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    raise ValueError(f"no plain score for method {method!r}; valid methods are {', '.join(METHODS)}.")


def _obs(model, cal: Calibration, ablation: str, layer: int, n_remove: int) -> Tuple[List[int], List[float]]:
    key = (ablation, layer)
    have = cal.obs.get(key)
    if have is None or len(have[0]) < n_remove:
        if cal.grams is None:
            raise ValueError("method 'obs' needs the calibration Gram matrices (calibrate(..., with_grams=True)).")
        w_out = model.W_out[layer].detach().float().cpu()
        cal.obs[key] = obs_order(cal.grams[layer], w_out, n_remove, keep_constant=ablation == "mean")
    order, err = cal.obs[key]
    return order[:n_remove], err[:n_remove]


def select_neurons(model, cal: Calibration, method: str, sparsity: float, scope: str = "per_layer",
                   ablation: str = "zero", seed: int = 0) -> Neurons:
    """The neurons to prune: the lowest-scored fraction per layer, or globally on comparable scores."""
    check_method(method)
    sparsity = check_sparsity(sparsity)
    check_scope(scope)
    check_ablation(ablation)
    seed = check_seed(seed)
    info = mlp_info(model)
    d, n_layers = info.d_mlp, info.n_layers
    k = int(round(sparsity * d))
    if k == 0 and scope == "per_layer":
        return {}
    if method == "obs":
        if scope == "per_layer":
            return {l: sorted(_obs(model, cal, ablation, l, k)[0]) for l in range(n_layers)}
        depth = min(d - 1, max(1, int(round(min(1.0, 2 * sparsity) * d))))
        score = torch.full((n_layers, d), math.inf, dtype=torch.float64)
        w_out = model.W_out.detach().float().cpu()
        for l in range(n_layers):
            order, err = _obs(model, cal, ablation, l, depth)
            g = cal.grams[l][:d, :d].double()
            energy = float(torch.einsum("ij,ik,jk->", g, w_out[l].double(), w_out[l].double()))
            score[l, torch.tensor(order)] = torch.tensor(err, dtype=torch.float64) / max(energy, 1e-12)
    else:
        score = method_scores(model, cal, method, ablation, seed)
        if scope == "per_layer":
            order = score.argsort(dim=1, stable=True)[:, :k]
            return {l: sorted(order[l].tolist()) for l in range(n_layers)}
        score = (score - score.mean(1, keepdim=True)) / score.std(1, keepdim=True).clamp_min(1e-12)
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


def build_spec(model, cal: Calibration, method: str, sparsity: float, scope: str, ablation: str, seed: int = 0) -> Optional[PruneSpec]:
    """The :class:`PruneSpec` of one curve point (None at sparsity 0). ``obs`` carries its least-squares refit."""
    neurons = select_neurons(model, cal, method, sparsity, scope, ablation, seed)
    if not neurons:
        return None
    grams = cal.grams if method == "obs" else None
    return make_spec(model, neurons, ablation, cal.means, grams)


# ---------------------------------------------------------------------------------------------- curves


@dataclass
class CurveResult(Result):
    """A pruning curve.

    Attributes:
        table: one row per (method, sparsity, scope, ablation): perplexity (random: mean over seeds),
            ratio = perplexity / dense, and for random perplexity_min / perplexity_max / n_seeds.
        runs: every evaluated run, random seeds separately.
        dense_perplexity: the unpruned model on the same windows and precision.
        dense_fp32 / dense_bf16: the dense check that decides the precision (bf16 only within 0.5%).
        recommended: the best (method, ablation) on this curve: lowest mean log-perplexity over the sparsities.
        protocol: the evaluation protocol (see :func:`evaluate_perplexity`).
    """

    table: pd.DataFrame
    runs: pd.DataFrame
    dense_perplexity: float
    dense_fp32: float
    dense_bf16: Optional[float]
    recommended: dict
    protocol: dict
    timings: dict = field(default_factory=dict)


def prune_curve(
    model,
    methods: Sequence[str] = tuple(METHODS),
    sparsities: Sequence[float] = DEFAULT_SPARSITIES,
    scope: str = "per_layer",
    ablation: Union[str, Sequence[str]] = "zero",
    calib_texts: Optional[Sequence[str]] = None,
    eval_texts: Optional[Sequence[str]] = None,
    calib_tokens: int = DEFAULT_CALIB_TOKENS,
    window: int = DEFAULT_WINDOW,
    every: int = DEFAULT_EVERY,
    seeds: Sequence[int] = RANDOM_SEEDS,
    precision: str = "auto",
    calibration: Optional[Calibration] = None,
    progress: bool = False,
    on_run: Optional[Callable[[dict], None]] = None,
) -> CurveResult:
    """Perplexity against sparsity for each method (and ablation), with pruning simulated through hooks.

    ``precision``: ``fp32``, ``bf16`` or ``auto`` (bf16 when dense bf16 is within 0.5% of dense fp32).
    ``on_run`` is called with each run's row as soon as it is measured (progress reporting).
    """
    import time

    if isinstance(methods, str) or not isinstance(methods, (list, tuple)) or len(methods) == 0:
        raise ValueError(f"methods must be a non-empty list of {', '.join(METHODS)}; got {show(methods)}.")
    methods = [check_method(m) for m in methods]
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
    wins = eval_windows(model, eval_texts, window, every)
    cal = calibration or calibrate(model, calib_texts, calib_tokens, with_grams="obs" in methods)
    t_cal = time.perf_counter() - t0

    fp32 = perplexity(*window_nll(model, wins))
    bf16_ppl = perplexity(*window_nll(model, wins, bf16=True)) if precision != "fp32" else None
    use_bf16 = precision == "bf16" or (precision == "auto" and abs(bf16_ppl / fp32 - 1) < BF16_TOLERANCE)
    dense = bf16_ppl if use_bf16 else fp32

    runs = []
    jobs = [(m, s, a, seed) for a in ablations for m in methods for s in sparsities for seed in (seeds if m == "random" else [0])]
    for method, sparsity, abl, seed in tqdm(jobs, desc="curve", disable=not progress):
        spec = build_spec(model, cal, method, sparsity, scope, abl, seed)
        hooks = simulation_hooks(spec) if spec is not None else []
        ppl = perplexity(*window_nll(model, wins, hooks, use_bf16))
        runs.append({"method": method, "sparsity": sparsity, "scope": scope, "ablation": abl, "seed": seed,
                     "n_pruned": spec.n_pruned if spec else 0, "perplexity": ppl})
        if on_run is not None:
            on_run(dict(runs[-1], dense=dense))
    runs_df = pd.DataFrame(runs)
    table = summarise_runs(runs_df, dense)
    protocol = protocol_record(model, wins, int(seeds[0]) if len(seeds) else 0, "bf16-autocast" if use_bf16 else "fp32", cal.record)
    protocol["random_seeds"] = list(seeds)
    return CurveResult(
        table=table, runs=runs_df, dense_perplexity=dense, dense_fp32=fp32, dense_bf16=bf16_ppl,
        recommended=recommend(table), protocol=protocol,
        timings={"calibration_s": t_cal, "total_s": time.perf_counter() - t0},
    )


def summarise_runs(runs: pd.DataFrame, dense: float) -> pd.DataFrame:
    """Collapse seeds: mean perplexity, min and max (the spread shown for random), ratio to dense."""
    keys = ["method", "sparsity", "scope", "ablation"]
    g = runs.groupby(keys, sort=False)["perplexity"]
    table = g.mean().rename("perplexity").reset_index()
    table["perplexity_min"] = g.min().to_numpy()
    table["perplexity_max"] = g.max().to_numpy()
    table["n_seeds"] = g.size().to_numpy()
    table["ratio"] = table["perplexity"] / dense
    return table


def recommend(table: pd.DataFrame) -> dict:
    """The (method, ablation) with the lowest mean log-perplexity over the curve's sparsities (random excluded)."""
    t = table[table["method"] != "random"].copy()
    if t.empty:
        return {}
    t["log_ppl"] = np.log(t["perplexity"])
    best = t.groupby(["method", "ablation"])["log_ppl"].mean().idxmin()
    return {"method": best[0], "ablation": best[1]}


# ---------------------------------------------------------------------------------------------- search


@dataclass
class SearchResult(Result):
    """The largest pruning found within the budget.

    Attributes:
        sparsity: the chosen per-layer (or global) fraction of MLP neurons.
        neurons: {layer: pruned neurons} of the chosen set; spec: its :class:`PruneSpec` (for ``prune_model``).
        perplexity / dense_perplexity / budget_perplexity: measured, dense, and dense x (1 + loss_budget).
        steps: every evaluated sparsity with its perplexity and whether it was accepted.
    """

    method: str
    ablation: str
    scope: str
    loss_budget: float
    sparsity: float
    perplexity: float
    dense_perplexity: float
    budget_perplexity: float
    steps: pd.DataFrame
    neurons: Dict[int, List[int]] = field(repr=False, default_factory=dict)
    spec: Optional[PruneSpec] = field(repr=False, default=None)
    protocol: dict = field(default_factory=dict)


def search_pruning(
    model,
    loss_budget: float = 0.05,
    method: str = RECOMMENDED_METHOD,
    ablation: str = RECOMMENDED_ABLATION,
    scope: str = "per_layer",
    step: float = 0.05,
    min_step: float = 0.0125,
    max_sparsity: float = 0.9,
    calib_texts: Optional[Sequence[str]] = None,
    eval_texts: Optional[Sequence[str]] = None,
    calib_tokens: int = DEFAULT_CALIB_TOKENS,
    window: int = DEFAULT_WINDOW,
    every: int = DEFAULT_EVERY,
    bf16: bool = True,
    calibration: Optional[Calibration] = None,
) -> SearchResult:
    """Grow the sparsity in steps of ``step``, re-evaluating after each; when a step goes over the budget, back off
    and halve the step, until it is below ``min_step``.

    ``loss_budget`` is the allowed relative perplexity increase on the held-out windows (0.05 = +5%).
    """
    budget = check_budget(loss_budget)
    check_method(method)
    check_scope(scope)
    check_ablation(ablation)
    step, min_step = check_step(step, "step"), check_step(min_step, "min_step")
    if min_step > step:
        raise ValueError(f"min_step must be in (0, step] = (0, {step}], got {show(min_step)}.")
    max_sparsity = check_sparsity(max_sparsity, "max_sparsity")
    calib_tokens = check_max_tokens(calib_tokens, "calib_tokens")
    wins = eval_windows(model, eval_texts, window, every)
    cal = calibration or calibrate(model, calib_texts, calib_tokens, with_grams=method == "obs")
    dense = perplexity(*window_nll(model, wins, bf16=bf16))
    limit = dense * (1 + budget)
    current, best_ppl, best_spec, steps = 0.0, dense, None, []
    while step >= min_step:
        trial = round(current + step, 6)
        if trial > max_sparsity:
            step /= 2
            continue
        spec = build_spec(model, cal, method, trial, scope, ablation)
        ppl = perplexity(*window_nll(model, wins, simulation_hooks(spec) if spec else [], bf16)) if spec else dense
        ok = ppl <= limit
        steps.append({"sparsity": trial, "perplexity": ppl, "ratio": ppl / dense, "accepted": ok})
        if ok:
            current, best_ppl, best_spec = trial, ppl, spec
        else:
            step /= 2
    return SearchResult(
        method=method, ablation=ablation, scope=scope, loss_budget=budget, sparsity=current, perplexity=best_ppl,
        dense_perplexity=dense, budget_perplexity=limit, steps=pd.DataFrame(steps),
        neurons=best_spec.neurons if best_spec else {}, spec=best_spec,
        protocol=protocol_record(model, wins, 0, "bf16-autocast" if bf16 else "fp32", cal.record),
    )


# ---------------------------------------------------------------------------------------------- plot


def plot_curve(result: CurveResult, path) -> "Path":
    """Perplexity against sparsity, one line per (method, ablation), random's min-max spread shaded; log y-axis
    (weight magnitude goes off the chart of any linear axis). Written atomically as PNG."""
    import os
    import tempfile
    from pathlib import Path

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, ax = plt.subplots(figsize=(8, 5))
    for (method, ablation), g in result.table.groupby(["method", "ablation"], sort=False):
        g = g.sort_values("sparsity")
        line, = ax.plot(g["sparsity"], g["perplexity"], marker="o", label=f"{method} ({ablation})",
                        linestyle="--" if ablation == "mean" else "-")
        if method == "random":
            ax.fill_between(g["sparsity"], g["perplexity_min"], g["perplexity_max"], color=line.get_color(), alpha=0.2)
    ax.axhline(result.dense_perplexity, color="black", linewidth=0.8, label=f"dense {result.dense_perplexity:.1f}")
    ax.set_yscale("log")
    ax.set_xlabel(f"fraction of MLP neurons removed ({result.table['scope'].iloc[0]})")
    ax.set_ylabel("perplexity (log scale)")
    p = result.protocol
    ax.set_title(f"{p['model']}: {p['n_tokens_scored']} tokens, window {p['window']}, {p['precision']}", fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    finally:
        plt.close(fig)
    return path
