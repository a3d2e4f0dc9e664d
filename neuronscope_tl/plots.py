"""Plots and on-screen tables of measured results, shared by the web app, the CLI and ``report.html``.

Each ``*_figure`` function returns a matplotlib figure of one result; :func:`save_figure` writes it atomically as a
PNG with the user's normal permissions, :func:`figure_png` returns its bytes (the report embeds them). Design rules:
grouped (never stacked) bars for quantities that do not add up, log count axes for skewed histograms with a few
readable tick labels, integer axes for counts, pruning curves as "x dense perplexity" per evaluation domain with
random's spread shaded. :func:`display_table` rounds a table to 4 significant digits for the screen (downloads keep
full precision) and :func:`neuron_map_rgb` draws the layer x neuron map the app's neuron picker clicks on.

matplotlib is imported when a plot is drawn, not when the package is imported: it is heavy and only plots need it.
Figures use the non-interactive Agg backend.
"""

from __future__ import annotations

import io
import math
import os
import tempfile
from pathlib import Path
from typing import Iterable, List, Optional, Tuple, Union

import numpy as np
import pandas as pd

from . import scores as registry
from .curves import CurveResult
from .export import current_umask

SIGNIFICANT_DIGITS = 4
VERDICT_COLOURS = {"safe": "#1a7f37", "moderate": "#b7791f", "high": "#c62828"}
SELECTED_RGB = (230, 30, 30)


def _pyplot():
    # Optional heavy dependency, imported only to draw (see the module docstring).
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# ---------------------------------------------------------------------------------------------- output


def save_figure(fig, path: Union[str, Path], dpi: int = 110) -> Path:
    """Write the figure atomically as PNG (mode 0666 minus the umask, as any file the user creates); closes it."""
    plt = _pyplot()
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=dpi)
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    finally:
        plt.close(fig)
    return path


def figure_png(fig, dpi: int = 110) -> bytes:
    """The figure as PNG bytes; closes it."""
    plt = _pyplot()
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=dpi)
    finally:
        plt.close(fig)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------- tables


def round_significant(x: float, digits: int = SIGNIFICANT_DIGITS) -> float:
    """``x`` rounded to ``digits`` significant digits (0, NaN and infinities unchanged)."""
    if x == 0 or not math.isfinite(x):
        return x
    return round(x, digits - 1 - int(math.floor(math.log10(abs(x)))))


def display_table(table: pd.DataFrame, digits: int = SIGNIFICANT_DIGITS) -> pd.DataFrame:
    """A copy with every float column rounded to ``digits`` significant digits, for the screen."""
    shown = table.copy()
    for col in shown.columns:
        if pd.api.types.is_float_dtype(shown[col]):
            shown[col] = [round_significant(float(v), digits) for v in shown[col]]
    return shown


# ---------------------------------------------------------------------------------------------- weights


def matrix_names(analysis) -> List[str]:
    """The MLP matrices of a weight analysis, in their order (W_in, W_gate when gated, W_out)."""
    return [k for k in analysis.layers[0] if k != "layer"]


def weight_means_table(analysis) -> pd.DataFrame:
    """One row per (layer, matrix): mean |w|."""
    return pd.DataFrame(
        [
            {"layer": entry["layer"], "matrix": name, "mean_abs": entry[name]["mean_abs"]}
            for entry in analysis.layers
            for name in matrix_names(analysis)
        ]
    )


def weight_means_figure(analysis):
    """Mean |w| per layer, one bar per matrix side by side (grouped: means do not add up)."""
    plt = _pyplot()
    t = weight_means_table(analysis)
    names = matrix_names(analysis)
    layers = sorted(t["layer"].unique())
    width = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.28 * len(layers) * len(names)), 3.4))
    for i, name in enumerate(names):
        values = t[t["matrix"] == name].set_index("layer").loc[layers, "mean_abs"]
        ax.bar(np.arange(len(layers)) + (i - (len(names) - 1) / 2) * width, values, width, label=name, color=f"C{i}")
    ax.set_xticks(np.arange(len(layers)), [str(l) for l in layers], fontsize=7)
    ax.set_xlabel("layer")
    ax.set_ylabel("mean |w|")
    ax.set_title(f"{analysis.model}: mean |w| per layer and MLP matrix", fontsize=9)
    ax.legend(fontsize=8, ncol=len(names))
    fig.tight_layout()
    return fig


def weight_histogram_table(analysis, layer: int) -> pd.DataFrame:
    """One row per (matrix, bin) of the layer's |w| histogram: bin edges and count."""
    if not 0 <= layer < len(analysis.layers):
        raise ValueError(f"layer index {layer} is out of range; valid layers are 0..{len(analysis.layers) - 1}.")
    rows = []
    for name in matrix_names(analysis):
        h = analysis.layers[layer][name]["histogram_abs"]
        rows += [
            {"matrix": name, "from": lo, "to": hi, "count": int(c)}
            for lo, hi, c in zip(h["edges"][:-1], h["edges"][1:], h["counts"])
        ]
    return pd.DataFrame(rows)


def weight_histogram_figure(analysis, layer: int):
    """The layer's |w| histogram per matrix on a log count axis (most weights sit in the first bins), with a few
    readable tick labels."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator  # optional heavy dependency, as in _pyplot

    t = weight_histogram_table(analysis, layer)
    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    for i, (name, g) in enumerate(t.groupby("matrix", sort=False)):
        edges = np.append(g["from"].to_numpy(), g["to"].iloc[-1])
        ax.stairs(g["count"].to_numpy(), edges, label=name, color=f"C{i}", linewidth=1.5)
    ax.set_yscale("log")
    ax.set_ylim(bottom=0.8)
    ax.xaxis.set_major_locator(MaxNLocator(6))
    ax.set_xlabel("|w|")
    ax.set_ylabel("weights per bin (log scale)")
    ax.set_title(f"{analysis.model}: |w| in layer {layer}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------------- batch


def cumulative_impact_figure(batch):
    """Impact of the first k candidates pruned together against k (an integer axis), with the verdict thresholds."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator  # optional heavy dependency, as in _pyplot

    c = batch.cumulative
    fig, ax = plt.subplots(figsize=(6.4, 3.2))
    ax.plot(c["n_pruned"], c["impact_score"], marker="o", color="C0", label="first k together")
    ax.plot(
        batch.individual.index + 1,
        batch.individual["impact_score"],
        marker="x",
        linestyle="none",
        color="C7",
        label="candidate k alone",
    )
    th = batch.thresholds
    ax.axhline(th.safe_below, color=VERDICT_COLOURS["safe"], linestyle="--", linewidth=0.8, label=f"safe below {th.safe_below:g}")
    ax.axhline(th.risky_from, color=VERDICT_COLOURS["high"], linestyle="--", linewidth=0.8, label=f"high from {th.risky_from:g}")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    # the axis follows the data; a threshold far above it stays in the legend rather than flattening the line
    top = max(float(c["impact_score"].max()), float(batch.individual["impact_score"].max()))
    ax.set_ylim(min(0.0, float(c["impact_score"].min())), max(1.15 * top, 1e-9))
    ax.set_xlabel("neurons pruned (k)")
    ax.set_ylabel("impact (nats)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------------- curves


def _panels(result: CurveResult) -> List[Tuple[str, pd.DataFrame, str]]:
    """(title, rows with method/ablation/sparsity/ratio and optional spread, y column) for each panel."""
    t = result.table.copy()
    dense = result.dense_perplexity
    t["ratio_min"], t["ratio_max"] = t["perplexity_min"] / dense, t["perplexity_max"] / dense
    if result.domains is None:
        return [("evaluation set", t, "ratio")]
    panels = []
    if "ratio_out_of_domain" in t and t["ratio_out_of_domain"].notna().all():
        panels.append(("out-of-domain (geometric mean)", t, "ratio_out_of_domain"))
    if "ratio_in_domain" in t and t["ratio_in_domain"].notna().all():
        panels.append(("in-domain (geometric mean)", t, "ratio_in_domain"))
    for name, d in result.domains.groupby("domain", sort=False):
        where = "in-domain" if bool(d["in_domain"].iloc[0]) else "out-of-domain"
        panels.append((f"{name} ({where})", d, "ratio"))
    return panels


def chart_top(data: pd.DataFrame, ycol: str, random_methods: Iterable[str]) -> float:
    """The top of a curve panel's y-axis: 2.5 x the worst point of the panel's best non-random method (at least
    x2), so that useful methods fill the chart; lines above it are named instead of squeezing the others."""
    useful = data[~data["method"].isin(list(random_methods))]
    if useful.empty:
        return max(2.0, float(data[ycol].max()))
    by_method = useful.groupby(["method", "ablation"])[ycol].apply(lambda v: float(np.mean(np.log(v))))
    best = by_method.idxmin()
    worst_of_best = float(useful[(useful["method"] == best[0]) & (useful["ablation"] == best[1])][ycol].max())
    return max(2.0, 2.5 * worst_of_best)


def short_name(name: str, width: int = 40) -> str:
    """A model name for a title: a local directory by its last part, anything longer than ``width`` cut at the
    front."""
    name = str(name)
    if "/" in name and Path(name).exists():
        name = Path(name).name
    return name if len(name) <= width else "..." + name[-(width - 3) :]


def curve_figure(result: CurveResult):
    """Perplexity as a multiple of dense against sparsity: one panel per evaluation domain (the out-of-domain and
    in-domain geometric means first), one line per (method, ablation) with its own colour, marker and dash, the
    min-max spread over random seeds shaded. The y-axis ends at :func:`chart_top`; a linear axis up to x4, log
    beyond. Methods off the chart are named in the panel."""
    plt = _pyplot()
    panels = _panels(result)
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.8 * rows), squeeze=False)
    randoms = [m for m in result.table["method"].unique() if registry.is_random(m)]
    sparsities = sorted(float(x) for x in result.table["sparsity"].unique())
    styles = {}
    for ax, (title, data, ycol) in zip(axes.flat, panels):
        top = chart_top(data, ycol, randoms)
        off = []
        for (method, ablation), g in data.groupby(["method", "ablation"], sort=False):
            g = g.sort_values("sparsity")
            n = len(styles)
            style = styles.setdefault(
                (method, ablation),
                {
                    "color": f"C{n % 10}",
                    "linestyle": ("-", "--", ":", "-.")[(n // 10 + (ablation == "mean")) % 4],
                    "marker": "osD^v<>ph*"[n % 10],
                    "markersize": 4,
                },
            )
            ax.plot(g["sparsity"], g[ycol], label=f"{method} ({ablation})", **style)
            if ycol == "ratio" and "n_seeds" in g and (g["n_seeds"] > 1).any():
                ax.fill_between(g["sparsity"], g["ratio_min"], g["ratio_max"], color=style["color"], alpha=0.2)
            if float(g[ycol].max()) > top:
                off.append(f"{method} ({ablation}) up to x{round_significant(float(g[ycol].max()), 3):g}")
        ax.axhline(1.0, color="black", linewidth=0.8)
        if top > 4:
            ax.set_yscale("log")
        ax.set_ylim(0.95 if top <= 4 else 0.9, top)
        if off:
            ax.text(0.02, 0.97, "off the chart: " + "; ".join(off), transform=ax.transAxes, fontsize=6, va="top", wrap=True)
        ax.set_title(title, fontsize=9)
        ax.set_xticks(sparsities, [f"{x:g}" for x in sparsities], fontsize=7)
        ax.set_xlabel(f"fraction of MLP neurons removed ({result.table['scope'].iloc[0]})", fontsize=8)
        ax.set_ylabel("perplexity x dense" + (" (log scale)" if top > 4 else ""), fontsize=8)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, ncol=min(4, len(labels)), loc="lower center")
    p = result.protocol
    fig.suptitle(
        f"{short_name(p['model'])}\n{p['n_tokens_scored']} tokens scored, window {p['window']}, {p['precision']}; "
        f"dense perplexity {result.dense_perplexity:.2f}",
        fontsize=9,
    )
    fig.tight_layout(rect=(0, 0.06 + 0.02 * (len(labels) // 4), 1, 0.94))
    return fig


def plot_curve(result: CurveResult, path: Union[str, Path]) -> Path:
    """:func:`curve_figure` written atomically as PNG."""
    return save_figure(curve_figure(result), path)


# ---------------------------------------------------------------------------------------------- neuron map


def layer_percentiles(values: np.ndarray) -> np.ndarray:
    """Each neuron's rank within its layer as a fraction in [0, 1] (0 = lowest score of the layer; ties by index)."""
    values = np.asarray(values, dtype=np.float64)
    order = np.argsort(values, axis=1, kind="stable")
    ranks = np.empty_like(order)
    rows = np.arange(values.shape[0])[:, None]
    ranks[rows, order] = np.arange(values.shape[1])[None, :]
    return ranks / max(1, values.shape[1] - 1)


def neuron_map_rgb(values: np.ndarray, selected: Iterable[Tuple[int, int]] = (), row_px: int = 8, col_px: int = 1) -> np.ndarray:
    """The layer x neuron map as an RGB image, ``row_px`` pixels per layer and ``col_px`` per neuron: colour =
    the neuron's percentile within its layer (viridis: dark = lowest score = pruned first); selected neurons red.
    Pixel (x, y) is neuron ``x // col_px`` of layer ``y // row_px``."""
    from matplotlib import colormaps  # optional heavy dependency, as in _pyplot

    pct = layer_percentiles(values)
    rgb = (colormaps["viridis"](pct)[..., :3] * 255).astype(np.uint8)
    for layer, neuron in selected:
        rgb[layer, neuron] = SELECTED_RGB
    return np.repeat(np.repeat(rgb, row_px, axis=0), col_px, axis=1)


def map_cell(x: float, y: float, shape: Tuple[int, int], row_px: int = 8, col_px: int = 1) -> Optional[Tuple[int, int]]:
    """(layer, neuron) under pixel (x, y) of :func:`neuron_map_rgb`, or None outside the map."""
    layer, neuron = int(y // row_px), int(x // col_px)
    if 0 <= layer < shape[0] and 0 <= neuron < shape[1]:
        return layer, neuron
    return None
