"""Cross-model comparison: several models, possibly of different families and sizes, measured side by side on the
same texts.

:func:`compare_models` loads each model in turn (a name for :func:`~neuronscope_tl.models.load_model`, or a loaded
TransformerLens model), calibrates it once on the same calibration texts and measures on the same evaluation texts
(each model with its own tokenizer, so every perplexity is reported as a ratio to that model's own dense
perplexity, which makes models with different vocabularies comparable):

* **pruning curve**: perplexity / dense perplexity against per-layer sparsity for each method
  (:func:`~neuronscope_tl.curves.prune_curve`);
* **layer sensitivity**: for each layer alone, the ``layer_sparsity`` fraction of its neurons with the lowest
  Wanda score (RMS activation x ||W_out row||) mean-ablated; the perplexity ratio against relative depth
  ``l / (L - 1)`` (0 = first block, 1 = last);
* **importance distribution**: each neuron's importance (RMS activation x ||W_out row||, the README's definition,
  over the calibration tokens) divided by its model's median importance, with quantiles and the share of the
  total held by the top 1% of neurons;
* **outlier neurons** (massive activations, Sun et al. 2024): neurons whose peak |activation| over the calibration
  tokens is at least ``outlier_factor`` (default 100) times the model's median peak |activation|;
* **winner**: the best (method, ablation) on each model's own curve (:func:`~neuronscope_tl.curves.recommend`,
  random methods excluded).

:func:`plot_comparison` draws the four panels; :func:`comparison_table` gives the one-row-per-model summary.
"""

from __future__ import annotations

import gc
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import numpy as np
import pandas as pd
import torch

from . import engine
from .arch import arch_for
from .curves import prune_curve
from .evaluation import DEFAULT_WINDOW, eval_windows, window_nll
from .export import Result, to_jsonable
from .metrics import perplexity
from .models import load_model, mlp_info, model_name
from .selection import calibrate_for
from .surgery import make_spec, simulation_hooks
from .texts import calibration_texts, calibration_tokens, check_int, check_max_tokens, evaluation_texts, show

DEFAULT_METHODS = ("magnitude", "activation", "wanda", "fluctuation", "taylor", "random")
DEFAULT_SPARSITIES = (0.1, 0.2, 0.3)
DEFAULT_ABLATION = "mean"
DEFAULT_LAYER_SPARSITY = 0.5
DEFAULT_OUTLIER_FACTOR = 100.0
DEFAULT_EVAL_TOKENS = 2048
DEFAULT_COMPARE_CALIB_TOKENS = 2048
IMPORTANCE_QUANTILES = (0.01, 0.1, 0.5, 0.9, 0.99)


@dataclass
class ModelComparison(Result):
    """What :func:`compare_models` measured on one model.

    Attributes:
        model: its name; kind: its adapter's name (``llama``, ``gemma3``, ``gpt2``, ``hooked``).
        n_layers, d_mlp, vocab: its shape. n_eval_tokens: scored evaluation tokens with its tokenizer.
        dense_perplexity: the unpruned model on the evaluation windows.
        curve: one row per (method, sparsity, ablation): perplexity, ratio (to dense), min/max over seeds.
        sensitivity: one row per layer: layer, relative_depth, n_pruned, perplexity, ratio.
        importance: one row per neuron: layer, neuron, relative_depth, importance, relative (to the median).
        importance_summary: quantiles of the relative importance, and ``top1pct_share`` (share of the summed
            importance held by the top 1% of neurons).
        outliers: the outlier neurons, largest first: label, layer, relative_depth, peak_abs, ratio_to_median.
        peaks: every neuron's peak |activation| (peak_abs) and its ratio to the median.
        peak_median: the median over neurons of the peak |activation|.
        winner: the best (method, ablation) on this model's curve.
        window / every: the evaluation windows (every ``every``-th ``window``-token window of the texts).
        seconds: wall time of this model's measurements.
    """

    model: str
    kind: str
    n_layers: int
    d_mlp: int
    vocab: int
    n_eval_tokens: int
    dense_perplexity: float
    curve: pd.DataFrame = field(repr=False)
    sensitivity: pd.DataFrame = field(repr=False)
    importance: pd.DataFrame = field(repr=False)
    importance_summary: Dict[str, float] = field(default_factory=dict)
    outliers: pd.DataFrame = field(default=None, repr=False)
    peaks: pd.DataFrame = field(default=None, repr=False)
    peak_median: float = 0.0
    winner: Dict[str, str] = field(default_factory=dict)
    window: int = DEFAULT_WINDOW
    every: int = 1
    seconds: float = 0.0


@dataclass
class Comparison(Result):
    """Models compared on the same texts (see the module docstring); ``models`` in the given order."""

    models: List[ModelComparison]
    settings: dict

    def table(self) -> pd.DataFrame:
        return comparison_table(self)


def relative_depth(layer: int, n_layers: int) -> float:
    """``layer / (n_layers - 1)``: 0 for the first block, 1 for the last (0 for a one-layer model)."""
    return layer / (n_layers - 1) if n_layers > 1 else 0.0


class PeakAbs:
    """Each neuron's largest |activation| over the tokens, every layer: a streaming-engine accumulator
    (:mod:`neuronscope_tl.engine`)."""

    needs_grad = False

    def __init__(self, n_layers: int, d_mlp: int):
        self.layers = list(range(n_layers))
        self.peak = torch.zeros(n_layers, d_mlp, dtype=torch.float64)

    def observe(self, obs: engine.Observation) -> None:
        self.peak[obs.layer] = torch.maximum(self.peak[obs.layer], obs.acts.abs().amax(0).double().cpu())

    def merge(self, other: "PeakAbs") -> None:
        self.peak = torch.maximum(self.peak, other.peak)


def peak_abs_activations(model, token_lists) -> torch.Tensor:
    """[n_layers, d_mlp] float64: each neuron's largest |activation| at ``mlp.hook_post`` over the tokens, one text
    per forward (no padding)."""
    info = mlp_info(model)
    acc = PeakAbs(info.n_layers, info.d_mlp)
    engine.run(model, token_lists, [acc], batch_size=1, by_length=False, desc="peaks")
    return acc.peak


def importance_summary(relative: np.ndarray) -> Dict[str, float]:
    """Quantiles of the relative importance and the share of the total held by the top 1% of neurons."""
    out = {f"q{q:g}": float(np.quantile(relative, q)) for q in IMPORTANCE_QUANTILES}
    srt = np.sort(relative)[::-1]
    k = max(1, int(round(0.01 * len(srt))))
    out["top1pct_share"] = float(srt[:k].sum() / srt.sum()) if srt.sum() > 0 else float("nan")
    return out


def compare_one(
    model,
    texts: Sequence[str],
    calib_texts: Sequence[str],
    methods: Sequence[str],
    sparsities: Sequence[float],
    ablation: str,
    layer_sparsity: float,
    outlier_factor: float,
    eval_tokens: int,
    calib_tokens: int,
    window: int,
    seeds: Sequence[int],
    progress: bool = False,
) -> ModelComparison:
    """Every measurement of :func:`compare_models` on one loaded model."""
    t0 = time.perf_counter()
    arch = arch_for(model)
    info = mlp_info(model)
    window = min(window, info.n_ctx)
    n_windows = len(eval_windows(model, texts, window, 1).tokens)
    every = max(1, n_windows // max(1, -(-eval_tokens // (window - 1))))  # about eval_tokens, spread over the texts
    cal = calibrate_for(model, methods, calib_texts, calib_tokens)
    curve = prune_curve(
        model,
        list(methods),
        sparsities,
        ablation=ablation,
        calibration=cal,
        eval_texts=texts,
        window=window,
        every=every,
        seeds=seeds,
        precision="fp32",
        progress=progress,
    )
    dense = float(curve.dense_perplexity)
    wins = eval_windows(model, texts, window, every)  # the curve's windows
    wanda = cal.column("wanda")
    k = int(round(layer_sparsity * info.d_mlp))
    rows = []
    for layer in range(info.n_layers):
        chosen = sorted(wanda[layer].argsort(stable=True)[:k].tolist())
        spec = make_spec(model, {layer: chosen}, ablation, means=cal.means)
        ppl = perplexity(*window_nll(model, wins, simulation_hooks(spec)))
        rows.append(
            {
                "layer": layer,
                "relative_depth": relative_depth(layer, info.n_layers),
                "n_pruned": k,
                "perplexity": ppl,
                "ratio": ppl / dense,
            }
        )
    sensitivity = pd.DataFrame(rows)
    # importance distribution
    imp = cal.scores[["layer", "neuron", "label", "wanda"]].rename(columns={"wanda": "importance"}).copy()
    imp["relative_depth"] = [relative_depth(int(l), info.n_layers) for l in imp["layer"]]
    med = float(np.median(imp["importance"]))
    imp["relative"] = imp["importance"] / med if med > 0 else np.nan
    # outliers: peak |a| over the calibration tokens
    token_lists = calibration_tokens(model, calib_texts, calib_tokens)
    peak = peak_abs_activations(model, token_lists)
    peak_median = float(peak.median())
    ratio = peak / peak_median if peak_median > 0 else torch.full_like(peak, float("nan"))
    idx = (ratio >= outlier_factor).nonzero().tolist()
    out = pd.DataFrame(
        [
            {
                "label": f"L{l}N{n}",
                "layer": l,
                "neuron": n,
                "relative_depth": relative_depth(l, info.n_layers),
                "peak_abs": float(peak[l, n]),
                "ratio_to_median": float(ratio[l, n]),
            }
            for l, n in idx
        ],
        columns=["label", "layer", "neuron", "relative_depth", "peak_abs", "ratio_to_median"],
    )
    out = out.sort_values("ratio_to_median", ascending=False).reset_index(drop=True)
    peaks = pd.DataFrame(
        {
            "layer": np.repeat(np.arange(info.n_layers), info.d_mlp),
            "neuron": np.tile(np.arange(info.d_mlp), info.n_layers),
            "relative_depth": np.repeat([relative_depth(l, info.n_layers) for l in range(info.n_layers)], info.d_mlp),
            "peak_abs": peak.reshape(-1).numpy(),
            "ratio": ratio.reshape(-1).numpy(),
        }
    )
    table = curve.table[["method", "sparsity", "ablation", "perplexity", "ratio", "perplexity_min", "perplexity_max", "n_seeds"]]
    return ModelComparison(
        model=model_name(model),
        kind=arch.name,
        n_layers=info.n_layers,
        d_mlp=info.d_mlp,
        vocab=int(model.cfg.d_vocab),
        n_eval_tokens=int(sum(int(t.numel()) - 1 for t in wins.tokens)),
        dense_perplexity=dense,
        curve=table.reset_index(drop=True),
        sensitivity=sensitivity,
        importance=imp,
        importance_summary=importance_summary(imp["relative"].to_numpy()),
        outliers=out,
        peaks=peaks,
        peak_median=peak_median,
        winner=dict(curve.recommended),
        window=window,
        every=every,
        seconds=time.perf_counter() - t0,
    )


def compare_models(
    models: Sequence[Union[str, torch.nn.Module]],
    texts: Optional[Sequence[str]] = None,
    *,
    calib_texts: Optional[Sequence[str]] = None,
    methods: Sequence[str] = DEFAULT_METHODS,
    sparsities: Sequence[float] = DEFAULT_SPARSITIES,
    ablation: str = DEFAULT_ABLATION,
    layer_sparsity: float = DEFAULT_LAYER_SPARSITY,
    outlier_factor: float = DEFAULT_OUTLIER_FACTOR,
    eval_tokens: int = DEFAULT_EVAL_TOKENS,
    calib_tokens: int = DEFAULT_COMPARE_CALIB_TOKENS,
    window: int = DEFAULT_WINDOW,
    seeds: Sequence[int] = (0,),
    progress: bool = False,
    log=None,
) -> Comparison:
    """Compare models side by side on the same texts (see the module docstring).

    Args:
        models: at least one model: names for :func:`~neuronscope_tl.models.load_model` (loaded one at a time and
            released after use) or loaded TransformerLens models.
        texts: evaluation texts (default: the Lee evaluation split), cut into ``window``-token windows with each
            model's tokenizer; the first ``eval_tokens`` scored tokens' worth of windows are used.
        calib_texts: calibration texts (default: the Lee calibration split); ``calib_tokens`` of them.
        methods / sparsities / ablation / seeds: of the pruning curves (registered methods).
        layer_sparsity: the fraction of one layer's neurons removed for its sensitivity, in (0, 1).
        outlier_factor: a neuron is an outlier when its peak |activation| is at least this many times the median.
    """
    if isinstance(models, (str, torch.nn.Module)) or not isinstance(models, (list, tuple)) or not models:
        raise ValueError(f"models must be a non-empty list of model names or loaded models; got {show(models)}.")
    if not (isinstance(layer_sparsity, (int, float)) and not isinstance(layer_sparsity, bool) and 0 < layer_sparsity < 1):
        raise ValueError(f"layer_sparsity must be a number in (0, 1), got {show(layer_sparsity)}.")
    if not (
        isinstance(outlier_factor, (int, float)) and not isinstance(outlier_factor, bool) and 1 <= outlier_factor < float("inf")
    ):
        raise ValueError(f"outlier_factor must be a finite number >= 1, got {show(outlier_factor)}.")
    eval_tokens = check_int(eval_tokens, "eval_tokens", 1)
    calib_tokens = check_max_tokens(calib_tokens, "calib_tokens")
    texts = list(texts) if texts is not None else evaluation_texts()
    calib = list(calib_texts) if calib_texts is not None else calibration_texts()
    results = []
    for m in models:
        model = load_model(m) if isinstance(m, str) else m
        if log:
            log(f"comparing {model_name(model)} ...")
        results.append(
            compare_one(
                model,
                texts,
                calib,
                methods,
                sparsities,
                ablation,
                layer_sparsity,
                outlier_factor,
                eval_tokens,
                calib_tokens,
                window,
                seeds,
                progress,
            )
        )
        if isinstance(m, str):
            del model
            gc.collect()
    settings = {
        "methods": list(methods),
        "sparsities": list(sparsities),
        "ablation": ablation,
        "layer_sparsity": layer_sparsity,
        "outlier_factor": outlier_factor,
        "eval_tokens": eval_tokens,
        "calib_tokens": calib_tokens,
        "window": window,
        "seeds": list(seeds),
        "n_texts": len(texts),
        "n_calib_texts": len(calib),
    }
    return Comparison(results, settings)


def comparison_table(comp: Comparison) -> pd.DataFrame:
    """One row per model: shape, dense perplexity, the winner's ratio at each sparsity, the random baseline's, the
    most sensitive layer (relative depth and ratio), importance concentration and outlier count."""
    rows = []
    for r in comp.models:
        win = r.winner.get("method")
        row = {
            "model": r.model,
            "kind": r.kind,
            "n_layers": r.n_layers,
            "d_mlp": r.d_mlp,
            "vocab": r.vocab,
            "eval_tokens": r.n_eval_tokens,
            "dense_ppl": r.dense_perplexity,
            "winner": win,
        }
        for s in sorted(r.curve["sparsity"].unique()):
            at = r.curve[r.curve["sparsity"] == s].set_index("method")["ratio"]
            row[f"winner_x{s:g}"] = float(at.get(win, np.nan))
            if "random" in at:
                row[f"random_x{s:g}"] = float(at["random"])
            if "magnitude" in at:
                row[f"magnitude_x{s:g}"] = float(at["magnitude"])
        worst = r.sensitivity.loc[r.sensitivity["ratio"].idxmax()]
        row["most_sensitive_depth"] = float(worst["relative_depth"])
        row["most_sensitive_ratio"] = float(worst["ratio"])
        row["median_layer_ratio"] = float(r.sensitivity["ratio"].median())
        row["importance_q99"] = r.importance_summary.get("q0.99")
        row["importance_top1pct_share"] = r.importance_summary.get("top1pct_share")
        row["outliers"] = len(r.outliers)
        row["top_outlier"] = r.outliers["label"].iloc[0] if len(r.outliers) else ""
        row["top_outlier_ratio"] = float(r.outliers["ratio_to_median"].iloc[0]) if len(r.outliers) else np.nan
        rows.append(row)
    return pd.DataFrame(rows)


def plot_comparison(comp: Comparison, path: Union[str, Path]) -> Path:
    """Four panels: pruning curves (ratio to dense, log scale; colour = method, line style = model), layer
    sensitivity against relative depth, the distribution of relative importance (log10), and each neuron's peak
    |activation| / median against relative depth with the outlier threshold."""
    import matplotlib  # optional heavy dependency: imported only when a plot is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = ["-", "--", ":", "-."]
    fig, ax = plt.subplots(2, 2, figsize=(13, 9))
    methods = sorted({m for r in comp.models for m in r.curve["method"]})
    colours = {m: plt.cm.tab10(i % 10) for i, m in enumerate(methods)}
    for i, r in enumerate(comp.models):
        ls = styles[i % len(styles)]
        for m, g in r.curve.groupby("method"):
            g = g.sort_values("sparsity")
            ax[0, 0].plot(g["sparsity"], g["ratio"], ls, marker="o", color=colours[m], label=f"{m} ({r.model})")
        ax[0, 1].plot(r.sensitivity["relative_depth"], r.sensitivity["ratio"], ls, marker=".", label=r.model)
        rel = r.importance["relative"].to_numpy()
        ax[1, 0].hist(np.log10(rel[rel > 0]), bins=80, histtype="step", density=True, linestyle=ls, label=r.model)
        ax[1, 1].scatter(r.peaks["relative_depth"], r.peaks["ratio"], s=2, alpha=0.4, label=r.model)
    ax[0, 0].set(xlabel="per-layer sparsity", ylabel="perplexity / dense", yscale="log", title="Pruning curves")
    ax[0, 0].legend(fontsize=6, ncol=2)
    ax[0, 1].set(
        xlabel="relative depth (0 = first block, 1 = last)",
        ylabel="perplexity / dense",
        title=f"One layer pruned ({comp.settings['layer_sparsity']:.0%} lowest Wanda, {comp.settings['ablation']} ablation)",
    )
    ax[0, 1].legend(fontsize=8)
    ax[1, 0].set(xlabel="log10(importance / median)", ylabel="density", title="Neuron importance (RMS a x ||W_out row||)")
    ax[1, 0].legend(fontsize=8)
    ax[1, 1].axhline(comp.settings["outlier_factor"], color="k", lw=0.8, ls="--")
    ax[1, 1].set(
        xlabel="relative depth",
        ylabel="peak |a| / median peak",
        yscale="log",
        title=f"Outlier neurons (>= {comp.settings['outlier_factor']:g} x median)",
    )
    ax[1, 1].legend(fontsize=8, markerscale=4)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def comparison_document(comp: Comparison, table: Optional[pd.DataFrame] = None) -> dict:
    """The JSON document of a comparison (``compare_result.json``, and the REST API's answer): ``settings``,
    ``table`` (:func:`comparison_table` as records, full precision, NaN as null) and per model its winner,
    importance summary, median peak and timing."""
    table = comparison_table(comp) if table is None else table
    return to_jsonable(
        {
            "settings": comp.settings,
            "table": table,
            "models": [
                {
                    "model": r.model,
                    "kind": r.kind,
                    "dense_perplexity": r.dense_perplexity,
                    "winner": r.winner,
                    "importance_summary": r.importance_summary,
                    "peak_median": r.peak_median,
                    "n_eval_tokens": r.n_eval_tokens,
                    "seconds": r.seconds,
                }
                for r in comp.models
            ],
        }
    )


def write_comparison(comp: Comparison, out: Union[str, Path]) -> List[Path]:
    """Write the comparison into the directory ``out``: ``compare_table.csv`` (one row per model),
    ``compare_curves.csv``, ``compare_sensitivity.csv``, ``compare_outliers.csv`` (every model's rows, with a
    ``model`` column), ``compare_result.json`` (settings, table, winners, importance summaries) and ``compare.png``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    table = comparison_table(comp)
    paths = [out / "compare_table.csv", out / "compare_curves.csv", out / "compare_sensitivity.csv", out / "compare_outliers.csv"]
    table.to_csv(paths[0], index=False)
    for path, attr in zip(paths[1:], ("curve", "sensitivity", "outliers")):
        pd.concat([getattr(r, attr).assign(model=r.model) for r in comp.models]).to_csv(path, index=False)
    (out / "compare_result.json").write_text(json.dumps(comparison_document(comp, table), indent=1, allow_nan=False))
    paths.append(out / "compare_result.json")
    paths.append(plot_comparison(comp, out / "compare.png"))
    return paths
