"""Plots of measured results: a pruning curve (:class:`~neuronscope_tl.curves.CurveResult`) as a PNG.

matplotlib is imported when a plot is drawn, not when the package is imported: it is heavy and only the plot
needs it. The figure is rendered with the non-interactive Agg backend and written atomically.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Union

from .curves import CurveResult


def plot_curve(result: CurveResult, path: Union[str, Path]) -> Path:
    """Perplexity against sparsity, one line per (method, ablation), the min-max spread over seeds shaded; log
    y-axis (weight magnitude goes off the chart of any linear axis). Written atomically as PNG."""
    # Optional heavy dependency, imported only to draw (see the module docstring).
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, ax = plt.subplots(figsize=(8, 5))
    for (method, ablation), g in result.table.groupby(["method", "ablation"], sort=False):
        g = g.sort_values("sparsity")
        line, = ax.plot(g["sparsity"], g["perplexity"], marker="o", label=f"{method} ({ablation})",
                        linestyle="--" if ablation == "mean" else "-")
        if (g["n_seeds"] > 1).any():
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
