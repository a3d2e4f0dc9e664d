"""``report.html``: one self-contained page (inline CSS, PNG plots as data URIs, no script, no network) that a
person opens in a browser, written by ``analyze``, ``curve`` and ``prune`` beside their JSON and CSV files.

The plots and on-screen tables are the web app's (:mod:`neuronscope_tl.plots`); tables are rounded to 4
significant digits, and the page names the JSON/CSV files that keep full precision.
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Union

import pandas as pd

from . import plots
from .export import atomic_write, utc_timestamp

STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0; }
th, td { border: 1px solid #ccc; padding: 2px 8px; text-align: right; } th { background: #f3f3f3; }
td.text { text-align: left; } img { max-width: 100%; } .note { color: #555; font-size: 0.9em; }
"""


@dataclass
class Section:
    """One titled part of a report: HTML built by the helpers below."""

    title: str
    html: str


def figure_html(fig, alt: str) -> str:
    """A figure as an inline PNG (data URI); closes the figure."""
    data = base64.b64encode(plots.figure_png(fig)).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _cell(value, colour: Optional[str] = None) -> str:
    style = f' style="background:{colour};color:white"' if colour else ""
    cls = "" if isinstance(value, (int, float)) else ' class="text"'
    return f"<td{cls}{style}>{html.escape(str(value))}</td>"


def table_html(table: pd.DataFrame, max_rows: int = 40, verdict_column: Optional[str] = None) -> str:
    """The table rounded to 4 significant digits (:func:`plots.display_table`), at most ``max_rows`` rows (the
    rest counted below it); cells of ``verdict_column`` in their verdict colour."""
    shown = plots.display_table(table.head(max_rows))
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in shown.columns)
    rows = []
    for rec in shown.itertuples(index=False):
        cells = [_cell(v, plots.VERDICT_COLOURS.get(str(v)) if c == verdict_column else None) for c, v in zip(shown.columns, rec)]
        rows.append("<tr>" + "".join(cells) + "</tr>")
    more = f'<p class="note">... and {len(table) - max_rows:,} more rows in the CSV.</p>' if len(table) > max_rows else ""
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>{more}"


def text_html(text: str) -> str:
    return "".join(f"<p>{html.escape(line)}</p>" for line in text.split("\n") if line.strip())


def recommendations_table(batch) -> pd.DataFrame:
    """One row per candidate of a batch analysis: its own impact and verdict, and whether it lies in the safe
    prefix (the first ``max_safe_prefix`` candidates, which stay safe when pruned together)."""
    ind = batch.individual
    prefix = int(batch.recommendations["max_safe_prefix"])
    return pd.DataFrame(
        {
            "candidate": ind["label"],
            "impact_score": ind["impact_score"],
            "verdict": ind["verdict"],
            "loss_change": ind["loss_change"],
            "cumulative_impact": batch.cumulative["impact_score"].to_numpy(),
            "cumulative_verdict": batch.cumulative["verdict"].to_numpy(),
            "in_safe_prefix": [i < prefix for i in range(len(ind))],
        }
    )


def recommendations_html(batch) -> str:
    """The batch recommendations as a table coloured by verdict, with the one-line summary above it."""
    rec = batch.recommendations
    summary = (
        f"{len(rec['safe_to_prune'])} safe, {len(rec['moderate'])} moderate, {len(rec['risky_to_prune'])} "
        f"high-impact alone; all together {plots.round_significant(rec['cumulative_impact']):g} nats "
        f"({rec['cumulative_verdict']}); the first {rec['max_safe_prefix']} can be pruned together safely."
    )
    t = recommendations_table(batch)
    shown = plots.display_table(t)
    head = "".join(f"<th>{html.escape(c)}</th>" for c in shown.columns)
    rows = []
    for rec_row in shown.itertuples(index=False):
        cells = []
        for c, v in zip(shown.columns, rec_row):
            colour = plots.VERDICT_COLOURS.get(str(v)) if c in ("verdict", "cumulative_verdict") else None
            cells.append(_cell(v, colour))
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return f"<p>{html.escape(summary)}</p><table><tr>{head}</tr>{''.join(rows)}</table>"


def page(title: str, sections: Sequence[Section], files: Sequence[str] = ()) -> str:
    """The whole HTML document."""
    body = "".join(f"<h2>{html.escape(s.title)}</h2>{s.html}" for s in sections)
    listing = ""
    if files:
        items = "".join(f"<li>{html.escape(Path(f).name)}</li>" for f in files)
        listing = f"<h2>Files (full precision)</h2><ul>{items}</ul>"
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>"
        f'<p class="note">neuronscope_tl, {utc_timestamp()}</p>{body}{listing}</body></html>'
    )


def write_report(path: Union[str, Path], title: str, sections: Sequence[Section], files: Sequence[str] = ()) -> Path:
    """Write the page atomically."""
    text = page(title, sections, files)
    return atomic_write(path, lambda fh: fh.write(text))


# ---------------------------------------------------------------------------------------------- per command


def analyze_sections(wa, cands: pd.DataFrame, batch, importance, safe_rule: str) -> List[Section]:
    """Weights (grouped means, the first layer's histogram), candidates, the batch test, neuron importance."""
    n_safe = int(cands["is_pruning_candidate"].sum())
    return [
        Section(
            "Weights",
            text_html(
                f"{wa.total_parameters:,} parameters ({wa.mlp_parameters:,} in MLPs); exactly zero: "
                f"{wa.overall_sparsity:.4%}; |w| < {wa.near_zero_threshold:g}: {wa.near_zero_fraction:.2%}."
            )
            + figure_html(plots.weight_means_figure(wa), "mean |w| per layer")
            + figure_html(plots.weight_histogram_figure(wa, 0), "|w| histogram of layer 0"),
        ),
        Section(
            "Candidates",
            text_html(f"{len(cands):,} candidates, {n_safe:,} flagged safe by their activation evidence.\n{safe_rule}")
            + table_html(cands),
        ),
        Section(
            "Batch test: each candidate alone and the first k together",
            recommendations_html(batch) + figure_html(plots.cumulative_impact_figure(batch), "cumulative impact"),
        ),
        Section("Critical neurons (largest importance)", table_html(importance.critical)),
    ]


def curve_sections(result) -> List[Section]:
    """The curve plot, the recommendation and the table."""
    rec = result.recommended
    note = (
        f"Dense perplexity {result.dense_perplexity:.2f} on {result.protocol['n_tokens_scored']:,} tokens "
        f"({result.protocol['precision']}). Best on this curve: {rec.get('method')} ({rec.get('ablation')}), "
        f"chosen on {rec.get('chosen_on', '').replace('_', ' ')}."
    )
    sections = [
        Section("Pruning curve", text_html(note) + figure_html(plots.curve_figure(result), "pruning curve")),
        Section("Table", table_html(result.table, max_rows=200)),
    ]
    if result.domains is not None:
        sections.append(Section("Per evaluation domain", table_html(result.domains, max_rows=400)))
    return sections


def prune_sections(report) -> List[Section]:
    """What was pruned, what it costs per evaluation domain, and the sizes."""
    m = report.model
    rows = [
        ("method", f"{report.method} ({report.method_source})"),
        ("ablation", report.ablation),
        ("scope", report.scope),
        ("sparsity", report.sparsity),
        ("neurons pruned", m.n_pruned),
        ("d_mlp", f"{m.d_mlp_before} -> {m.d_mlp_after}" + (" (widest layer; narrower layers zero-padded)" if m.masked else "")),
        ("parameters", f"{m.parameters_before:,} -> {m.parameters_after:,}"),
        ("weight files", f"{m.file_bytes_before / 1e6:.1f} -> {m.file_bytes_after / 1e6:.1f} MB"),
    ]
    sections = [Section("Pruned model", table_html(pd.DataFrame(rows, columns=["what", "value"])))]
    ev = report.evaluation
    if ev is not None:
        t = pd.DataFrame(
            [
                {
                    "set": s["name"],
                    "in_domain": bool(s.get("in_domain")),
                    "dense": ev["dense"][s["name"]],
                    "pruned": ev["pruned"][s["name"]],
                    "x dense": ev["ratios"][s["name"]],
                    "tokens": s["n_tokens"],
                }
                for s in ev["sets"]
            ]
        )
        means = ", ".join(
            f"{k.replace('_', '-')} x{plots.round_significant(ev[k]):g}"
            for k in ("in_domain", "out_of_domain", "all")
            if ev.get(k) is not None
        )
        sections.append(
            Section("Perplexity per evaluation set (hook simulation)", table_html(t) + text_html(f"Geometric means: {means}."))
        )
    return sections
