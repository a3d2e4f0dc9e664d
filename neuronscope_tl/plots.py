"""Plots of measured results: a pruning curve (:class:`~neuronscope_tl.curves.CurveResult`) as a PNG.

matplotlib is imported when a plot is drawn, not when the package is imported: it is heavy and only the plot
needs it. The figure is rendered with the non-interactive Agg backend and written atomically.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import List, Tuple, Union

import pandas as pd

from .curves import CurveResult
from .export import current_umask


def _panels(result: CurveResult) -> List[Tuple[str, pd.DataFrame, str]]:
    """(title, rows with method/ablation/sparsity/ratio and optional spread, y column) for each panel."""
    t = result.table.copy()
    dense = result.dense_perplexity
    t["ratio_min"], t["ratio_max"] = t["perplexity_min"] / dense, t["perplexity_max"] / dense
    if result.domains is None:
        return [("evaluation set", t, "ratio")]
    panels = []
    if t["ratio_out_of_domain"].notna().all():
        panels.append(("out-of-domain (geometric mean)", t, "ratio_out_of_domain"))
    if t["ratio_in_domain"].notna().all():
        panels.append(("in-domain (geometric mean)", t, "ratio_in_domain"))
    for name, d in result.domains.groupby("domain", sort=False):
        where = "in-domain" if bool(d["in_domain"].iloc[0]) else "out-of-domain"
        panels.append((f"{name} ({where})", d, "ratio"))
    return panels


def plot_curve(result: CurveResult, path: Union[str, Path]) -> Path:
    """Perplexity as a multiple of dense against sparsity: one panel per evaluation domain (and the in-domain and
    out-of-domain geometric means first), one line per (method, ablation), the min-max spread over seeds shaded;
    log y-axis (weight magnitude goes off the chart of any linear axis). Written atomically as PNG."""
    # Optional heavy dependency, imported only to draw (see the module docstring).
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    panels = _panels(result)
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.8 * rows), squeeze=False)
    styles = {}
    for ax, (title, data, ycol) in zip(axes.flat, panels):
        for (method, ablation), g in data.groupby(["method", "ablation"], sort=False):
            g = g.sort_values("sparsity")
            key = (method, ablation)
            style = styles.setdefault(key, {"color": f"C{len(styles) % 10}", "linestyle": "--" if ablation == "mean" else "-",
                                            "marker": "osD^v<>ph*"[len(styles) % 10]})
            ax.plot(g["sparsity"], g[ycol], label=f"{method} ({ablation})", **style)
            if ycol == "ratio" and "n_seeds" in g and (g["n_seeds"] > 1).any():
                ax.fill_between(g["sparsity"], g["ratio_min"], g["ratio_max"], color=style["color"], alpha=0.2)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_yscale("log")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(f"fraction of MLP neurons removed ({result.table['scope'].iloc[0]})", fontsize=8)
        ax.set_ylabel("perplexity x dense (log scale)", fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, ncol=min(4, len(labels)), loc="lower center")
    p = result.protocol
    fig.suptitle(f"{p['model']}: {p['n_tokens_scored']} tokens scored, window {p['window']}, {p['precision']}", fontsize=9)
    fig.tight_layout(rect=(0, 0.06, 1, 0.97))
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110)
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp creates 0600; the plot gets the user's normal permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    finally:
        plt.close(fig)
    return path
