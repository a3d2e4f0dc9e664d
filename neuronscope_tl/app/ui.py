"""The Gradio demo: tabs that follow the analysis workflow (weights, candidates, impact, importance, neuron contexts,
batch, pruning curve with prune-and-download, export) over the same :class:`.AppState` operations as the REST API.

Each handler converts widget values to library arguments, calls one operation and converts the result into
widgets; no number is computed here beyond scaling for display. Library refusals become ``gr.Error`` with the
library's message. Handlers have ``api_name``s, so ``gradio_client`` can call them too.
"""

from __future__ import annotations

import functools
import re
import tempfile
from pathlib import Path
from typing import List

import gradio as gr
import pandas as pd

from .. import scores
from ..activations import DEFAULT_CALIB_TOKENS
from ..curves import RECOMMENDED_METHOD
from ..plots import plot_curve
from ..selection import SCOPES
from ..export import write_csv, write_json
from ..texts import EXAMPLE_TEXTS
from ..candidates import CANDIDATE_COLUMNS, WEIGHT_ONLY_LIMITS, DEFAULT_SAFE_PERCENTILE, candidate_records, first_candidates
from .state import AppState, Busy

BATCH_COLUMNS = ["layer_index", "neuron_index"]


def ui_errors(fn):
    """Show the library's ValueError (and a busy model) as a ``gr.Error`` with its message."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (ValueError, Busy) as exc:
            raise gr.Error(str(exc)) from None

    return wrapper


def parse_ints(text, what: str) -> List[int]:
    """``"0, 1, 2"`` -> [0, 1, 2]; anything else that is not an integer is refused with a message."""
    parts = [p for p in re.split(r"[\s,;]+", str(text or "").strip()) if p]
    try:
        return [int(p) for p in parts]
    except ValueError:
        raise ValueError(f"{what} must be integers separated by commas, got {text!r}.") from None


def parse_floats(text, what: str) -> List[float]:
    """``"0.1, 0.2"`` -> [0.1, 0.2]; anything else is refused with a message."""
    parts = [p for p in re.split(r"[\s,;]+", str(text or "").strip()) if p]
    try:
        return [float(p) for p in parts]
    except ValueError:
        raise ValueError(f"{what} must be numbers separated by commas, got {text!r}.") from None


def split_texts(text) -> List[str]:
    """One text per non-empty line."""
    return [line for line in str(text or "").splitlines() if line.strip()]


def as_int(value, what: str) -> int:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be an integer, got {value!r}.") from None
    if not number.is_integer():
        raise ValueError(f"{what} must be an integer, got {value!r}.")
    return int(number)


def build_ui(state: AppState) -> gr.Blocks:
    info = state.info
    downloads = state.downloads_dir()
    layer_help = f"0..{info.n_layers - 1}"

    # ------------------------------------------------------------------------------------------- handlers

    @ui_errors
    def run_weights(layer, progress=gr.Progress()):
        progress(0, desc="weight analysis (cached after the first run)")
        wa = state.weight_analysis()
        summary = (
            f"**{wa.model}**: {wa.total_parameters:,} parameters, {wa.mlp_parameters:,} in MLPs.  \n"
            f"Exactly zero: {wa.zero_parameters:,} (overall sparsity {wa.overall_sparsity:.4%}); "
            f"|w| < {wa.near_zero_threshold:g}: {wa.near_zero_fraction:.2%}.  \n"
            f"Neurons in the low or very low mean |w| band: {len(wa.low_weight_neurons):,}."
        )
        per_layer = pd.DataFrame(
            [
                {"layer": f"{entry['layer']:02d}", "matrix": name, "mean_abs": stats["mean_abs"]}
                for entry in wa.layers
                for name, stats in entry.items()
                if name != "layer"
            ]
        )
        return summary, per_layer, histogram(wa, layer)

    def histogram(wa, layer) -> pd.DataFrame:
        layer = as_int(layer, "layer")
        if not 0 <= layer < len(wa.layers):
            raise ValueError(f"layer index {layer} is out of range; valid layers are {layer_help}.")
        rows = []
        for name, stats in wa.layers[layer].items():
            if name == "layer":
                continue
            h = stats["histogram_abs"]
            rows += [{"|w| from": f"{lo:.4f}", "matrix": name, "count": c} for lo, c in zip(h["edges"][:-1], h["counts"])]
        return pd.DataFrame(rows)

    @ui_errors
    def run_histogram(layer):
        return histogram(state.weight_analysis(), layer)

    @ui_errors
    def run_candidates(threshold, progress=gr.Progress()):
        progress(0, desc="candidates")
        table = state.candidates(threshold)
        csv_path = write_csv(downloads / "candidates.csv", table)
        json_path = write_json(downloads / "candidates.json", candidate_records(table))
        n_safe = int(table["is_pruning_candidate"].sum())
        note = (
            f"**{len(table):,} candidates** at or below the {threshold:g}th percentile of mean |w| in their layer; "
            f"**{n_safe:,} flagged safe** by their activation evidence.\n\n"
            + WEIGHT_ONLY_LIMITS.format(safe=DEFAULT_SAFE_PERCENTILE)
        )
        return note, table[list(CANDIDATE_COLUMNS)], str(csv_path), str(json_path)

    @ui_errors
    def send_to_batch(threshold, how_many):
        n = as_int(how_many, "how many")
        table = first_candidates(state.candidates(threshold), n)
        rows = table[["layer", "neuron"]].rename(columns={"layer": "layer_index", "neuron": "neuron_index"})
        return rows.reset_index(drop=True), gr.Tabs(selected="batch")

    @ui_errors
    def run_impact(layer, neurons, text, ablation, progress=gr.Progress(track_tqdm=True)):
        progress(0, desc="waiting for the model")
        r = state.impact(as_int(layer, "layer"), parse_ints(neurons, "neurons"), text, ablation, progress=True)
        score = (
            f"### Impact score: {r.impact_score:.6f} nats\n"
            f"Verdict: **{r.verdict}** ({'safe to prune' if r.safe_to_prune else 'not safe to prune'}); "
            f"loss change {r.loss_change:+.6f} nats ({r.loss_original:.4f} -> {r.loss_pruned:.4f}); "
            f"top-1 agreement {r.top1_agreement:.3f} over {r.n_tokens} tokens."
        )
        changes = pd.DataFrame(r.activation_changes)
        detail = r.token_kl[0]
        top = max(detail["kl"]) if detail["kl"] else 0.0
        # Shade by KL relative to the text's largest token KL (HighlightedText takes scores in [-1, 1]).
        shaded = [(tok, (kl / top) if top > 0 else 0.0) for tok, kl in zip(detail["tokens"], detail["kl"])]
        tokens = pd.DataFrame({"position": range(len(detail["kl"])), "token": detail["tokens"], "kl": detail["kl"]})
        return score, changes, shaded, tokens

    @ui_errors
    def run_contexts(layer, neuron, texts, progress=gr.Progress(track_tqdm=True)):
        progress(0, desc="waiting for the model")
        table = state.top_contexts(as_int(layer, "layer"), as_int(neuron, "neuron"), split_texts(texts))
        note = f"Top {len(table)} activating tokens of L{as_int(layer, 'layer')}N{as_int(neuron, 'neuron')} (token in context: left [token] right)."
        shown = table.assign(context=table["left"] + "[" + table["token"] + "]" + table["right"])
        return note, shown[["activation", "text_index", "position", "context"]]

    @ui_errors
    def run_curve(methods, sparsities, scope, ablation, calib_tokens, progress=gr.Progress(track_tqdm=True)):
        progress(0, desc="waiting for the model")
        result = state.curve(list(methods or []), parse_floats(sparsities, "sparsities"), scope, ablation, as_int(calib_tokens, "calibration tokens"), progress=True)
        png = plot_curve(result, Path(tempfile.mkdtemp(dir=downloads)) / "curve.png")
        rec = result.recommended
        note = (
            f"Dense perplexity {result.dense_perplexity:.2f} on {result.protocol['n_tokens_scored']} tokens "
            f"({result.protocol['precision']}); best on this curve: **{rec.get('method')} ({rec.get('ablation')})**."
        )
        return note, str(png), result.table

    @ui_errors
    def run_prune(method, sparsity, scope, ablation, calib_tokens, progress=gr.Progress()):
        progress(0, desc="waiting for the model")
        return str(state.prune(method, float(sparsity), scope, ablation, as_int(calib_tokens, "calibration tokens")))

    @ui_errors
    def run_importance(layer, texts, top_k, progress=gr.Progress(track_tqdm=True)):
        progress(0, desc="waiting for the model")
        r = state.importance(as_int(layer, "layer"), split_texts(texts), as_int(top_k, "top k"), progress=True)
        note = f"Layer {r.layers[0]}: {r.n_texts} texts, {r.n_tokens} tokens. Importance = RMS activation x ||W_out row||."
        return note, r.table[["neuron", "importance"]], r.critical[["label", "neuron", "importance", "rms", "mean", "frac_active", "w_out_norm"]]

    @ui_errors
    def run_batch(table, texts, batch_size, ablation, progress=gr.Progress(track_tqdm=True)):
        progress(0, desc="waiting for the model")
        rows = table.values.tolist() if isinstance(table, pd.DataFrame) else list(table or [])
        cands = [
            {"layer_index": as_int(row[0], "layer_index"), "neuron_index": as_int(row[1], "neuron_index")}
            for row in rows
            if len(row) >= 2 and str(row[0]).strip() != "" and str(row[1]).strip() != ""
        ]
        r = state.batch(cands, split_texts(texts), as_int(batch_size, "batch size"), ablation, progress=True)
        rec = r.recommendations
        note = (
            f"{len(rec['safe_to_prune'])} safe, {len(rec['moderate'])} moderate, {len(rec['risky_to_prune'])} risky to prune. "
            f"All {len(cands)} together: impact {rec['cumulative_impact']:.6f} nats ({rec['cumulative_verdict']}); "
            f"the first {rec['max_safe_prefix']} can be pruned together safely."
        )
        individual = r.individual[["label", "impact_score", "verdict", "loss_change", "top1_agreement"]]
        return note, individual, r.cumulative[["n_pruned", "impact_score"]], rec

    @ui_errors
    def run_export(kind):
        name, doc = state.export_document(kind)
        return str(write_json(downloads / name, doc))

    # ------------------------------------------------------------------------------------------- layout

    with gr.Blocks(title="neuronscope_tl") as demo:
        gr.Markdown(
            f"# neuronscope_tl: which MLP neurons of {state.model_name} can be pruned?\n"
            f"{info.n_layers} layers x {info.d_mlp} neurons. Impact = mean per-token KL(original || pruned) in nats; "
            f"safe below {state.settings.thresholds.safe_below:g}, high from {state.settings.thresholds.risky_from:g}. "
            "REST API at [/docs](/docs)."
        )
        with gr.Tabs() as tabs:
            with gr.Tab("Weight analysis", id="weights"):
                w_layer = gr.Slider(0, info.n_layers - 1, value=0, step=1, label="Histogram of layer")
                w_btn = gr.Button("Analyse weights", variant="primary")
                w_summary = gr.Markdown(elem_id="weights-summary")
                w_bars = gr.BarPlot(x="layer", y="mean_abs", color="matrix", label="Mean |w| per layer and matrix")
                w_hist = gr.BarPlot(x="|w| from", y="count", color="matrix", label="Histogram of |w| in the layer")
                w_btn.click(run_weights, [w_layer], [w_summary, w_bars, w_hist], api_name="weights")
                w_layer.release(run_histogram, [w_layer], [w_hist], api_name="weights_histogram")

            with gr.Tab("Candidates", id="candidates"):
                c_threshold = gr.Slider(0.1, 100, value=10.0, step=0.1, label="Threshold percentile of mean |w| within each layer")
                c_btn = gr.Button("Find candidates", variant="primary")
                c_note = gr.Markdown()
                c_table = gr.Dataframe(label="Candidates (click a header to sort)", interactive=False, max_height=400)
                with gr.Row():
                    c_csv = gr.File(label="CSV")
                    c_json = gr.File(label="JSON")
                with gr.Row():
                    c_n = gr.Number(value=5, precision=0, label="How many to send")
                    c_send = gr.Button("Send to batch")
                c_btn.click(run_candidates, [c_threshold], [c_note, c_table, c_csv, c_json], api_name="candidates")

            with gr.Tab("Impact", id="impact"):
                with gr.Row():
                    i_layer = gr.Number(value=0, precision=0, label=f"Layer ({layer_help})")
                    i_neurons = gr.Textbox(value="0, 1, 2", label=f"Neurons (0..{info.d_mlp - 1}, comma separated)")
                    i_ablation = gr.Radio(["zero", "mean"], value="zero", label="Ablation")
                i_text = gr.Textbox(value=EXAMPLE_TEXTS[0], lines=3, label="Text")
                i_btn = gr.Button("Simulate pruning", variant="primary", elem_id="impact-run")
                i_score = gr.Markdown(elem_id="impact-score")
                i_plot = gr.LinePlot(x="layer", y="relative_change", label="Relative change of the residual stream after each block")
                i_tokens = gr.HighlightedText(label="Each token shaded by its KL (relative to the text's largest)", show_legend=False, elem_id="impact-tokens")
                i_table = gr.Dataframe(label="Per-token KL (position t = prediction after token t)", interactive=False, max_height=300)
                i_btn.click(run_impact, [i_layer, i_neurons, i_text, i_ablation], [i_score, i_plot, i_tokens, i_table], api_name="impact")

            with gr.Tab("Importance", id="importance"):
                with gr.Row():
                    m_layer = gr.Number(value=0, precision=0, label=f"Layer ({layer_help})")
                    m_top = gr.Number(value=10, precision=0, label="Critical neurons to list")
                m_texts = gr.Textbox(value="\n".join(EXAMPLE_TEXTS), lines=5, label="Texts, one per line")
                m_btn = gr.Button("Measure importance", variant="primary")
                m_note = gr.Markdown()
                m_plot = gr.LinePlot(x="neuron", y="importance", label="Importance per neuron")
                m_critical = gr.Dataframe(label="Critical neurons", interactive=False)
                m_btn.click(run_importance, [m_layer, m_texts, m_top], [m_note, m_plot, m_critical], api_name="importance")

            with gr.Tab("Neuron contexts", id="contexts"):
                with gr.Row():
                    x_layer = gr.Number(value=0, precision=0, label=f"Layer ({layer_help})")
                    x_neuron = gr.Number(value=0, precision=0, label=f"Neuron (0..{info.d_mlp - 1})")
                x_texts = gr.Textbox(value="\n".join(EXAMPLE_TEXTS), lines=5, label="Texts, one per line")
                x_btn = gr.Button("Show top contexts", variant="primary")
                x_note = gr.Markdown()
                x_table = gr.Dataframe(label="Top-activating token contexts", interactive=False)
                x_btn.click(run_contexts, [x_layer, x_neuron, x_texts], [x_note, x_table], api_name="contexts")

            with gr.Tab("Batch", id="batch"):
                b_table = gr.Dataframe(
                    value=pd.DataFrame({"layer_index": [0, 0, 0], "neuron_index": [0, 1, 2]}),
                    headers=BATCH_COLUMNS, datatype=["number", "number"], interactive=True, label="Candidates (editable)",
                )
                b_texts = gr.Textbox(value="\n".join(EXAMPLE_TEXTS[:2]), lines=4, label="Texts, one per line")
                with gr.Row():
                    b_size = gr.Number(value=1, precision=0, label="Texts per forward pass")
                    b_ablation = gr.Radio(["zero", "mean"], value="zero", label="Ablation")
                b_btn = gr.Button("Analyse batch", variant="primary")
                b_note = gr.Markdown()
                b_individual = gr.Dataframe(label="Each candidate alone", interactive=False)
                b_curve = gr.LinePlot(x="n_pruned", y="impact_score", label="Cumulative impact (first k pruned together)")
                b_rec = gr.JSON(label="Recommendations")
                b_btn.click(run_batch, [b_table, b_texts, b_size, b_ablation], [b_note, b_individual, b_curve, b_rec], api_name="batch")
                c_send.click(send_to_batch, [c_threshold, c_n], [b_table, tabs], api_name="send_to_batch")

            with gr.Tab("Pruning curve", id="curve"):
                with gr.Row():
                    p_methods = gr.CheckboxGroup(list(scores.method_names()), value=["magnitude", "wanda", "fluctuation", "random", "obs"], label="Methods")
                    p_sparsities = gr.Textbox(value="0.1, 0.2, 0.3", label="Sparsities in [0, 1), comma separated")
                with gr.Row():
                    p_scope = gr.Radio(list(SCOPES), value="per_layer", label="Scope")
                    p_ablation = gr.Radio(["zero", "mean"], value="mean", label="Ablation")
                    p_calib = gr.Number(value=min(DEFAULT_CALIB_TOKENS, state.settings.max_calib_tokens), precision=0, label=f"Calibration tokens (1..{state.settings.max_calib_tokens})")
                p_btn = gr.Button("Measure pruning curve", variant="primary")
                p_note = gr.Markdown()
                p_plot = gr.Image(label="Perplexity against sparsity (random's spread shaded)", type="filepath")
                p_table = gr.Dataframe(label="Curve", interactive=False)
                p_btn.click(run_curve, [p_methods, p_sparsities, p_scope, p_ablation, p_calib], [p_note, p_plot, p_table], api_name="curve")
                gr.Markdown("### Prune and download\nA physically smaller Hugging Face directory (zip) that plain transformers loads.")
                with gr.Row():
                    d_method = gr.Dropdown(list(scores.method_names()), value=RECOMMENDED_METHOD, label="Method")
                    d_sparsity = gr.Number(value=0.2, label="Sparsity")
                d_btn = gr.Button("Prune and download")
                d_file = gr.File(label="Pruned model (zip)")
                d_btn.click(run_prune, [d_method, d_sparsity, p_scope, p_ablation, p_calib], [d_file], api_name="prune")

            with gr.Tab("Export", id="export"):
                e_kind = gr.Radio(["weight", "impact"], value="weight", label="What to export")
                e_btn = gr.Button("Export JSON", variant="primary")
                e_file = gr.File(label="Download")
                e_btn.click(run_export, [e_kind], [e_file], api_name="export")
    return demo
