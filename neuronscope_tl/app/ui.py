"""The Gradio demo: tabs that follow the analysis workflow (weights, neuron map with the candidate basket,
candidates, impact, importance, neuron contexts, batch, pruning curve with prune-and-download, live pruning, compare
models, export)
over the same :class:`.AppState` operations as the REST API.

Each handler converts widget values to library arguments, calls one operation and converts the result into
widgets; no number is computed here beyond scaling for display. Plots come from :mod:`neuronscope_tl.plots`;
tables are shown rounded to 4 significant digits (downloads keep full precision). Library refusals become
``gr.Error`` with the library's message. Handlers have ``api_name``s, so ``gradio_client`` can call them too.

The candidate basket is per browser session (``gr.State``): the neuron map fills it (click, two-click rectangle,
or a rule), and the Impact, Batch and Prune parts read it, so nobody types indices.
"""

from __future__ import annotations

import functools
import re
import tempfile
from pathlib import Path
from typing import List

import gradio as gr
import pandas as pd

from .. import compare, plots, recipes, report, scores
from ..candidates import CANDIDATE_COLUMNS, DEFAULT_SAFE_PERCENTILE, WEIGHT_ONLY_LIMITS, candidate_records, first_candidates
from ..curves import curve_methods, resolve_method
from ..export import write_csv, write_json
from ..plots import display_table, plot_curve
from ..selection import SCOPES
from ..texts import EXAMPLE_TEXTS
from . import picker
from .live import DEFAULT_PROMPT, LIVE_MAX_SPARSITY, describe
from .state import AppState, Busy

RECOMMENDED_CHOICE = "recommended"  # the prune box's entry for the CLI's recommended recipe
MAP_WIDTH_PX = 768  # the neuron map is at least this wide (a model with few neurons gets wider columns)


def map_scale(n_layers: int, d_mlp: int):
    """(pixels per layer, pixels per neuron) of the neuron map: at least 8 x 1, and big enough to click on a
    small model."""
    return max(8, 160 // n_layers), max(1, MAP_WIDTH_PX // d_mlp)


BATCH_COLUMNS = ["layer_index", "neuron_index"]

# What each tab explains above its controls.
TAB_INTROS = {
    "map": (
        "Every MLP neuron: one row of pixels per layer (layer 0 at the top), one column per neuron. "
        "Colour = the neuron's percentile of the score **within its layer** (dark = lowest = pruned first). "
        "Click a neuron to add it to the basket, or switch to rectangle mode and click two corners, or "
        f"add by a rule such as *{picker.RULE_EXAMPLE}*. Basket neurons are drawn red."
    ),
    "live": (
        "Move the slider: the hook-simulated model is measured on a small fixed subset of every evaluation "
        "domain (one short window each) next to dense, and continues your prompt. The calibration is "
        "computed on the first move and kept; the CLI's `curve` and `prune` measure the full protocol."
    ),
    "compare": (
        "Several models side by side on the same texts, each with its own tokenizer (as "
        "`neuronscope-tl compare`): pruning curves, each layer's sensitivity against relative depth, the "
        "distribution of neuron importance and outlier neurons. Other models are loaded one at a time."
    ),
}


def ui_errors(fn):
    """Show the library's ValueError (and a busy model) as a ``gr.Error`` with its message."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (ValueError, Busy) as exc:
            raise gr.Error(str(exc)) from None

    return wrapper


def parse_list(text, what: str, convert=float, kind: str = "numbers") -> list:
    """``"0.1, 0.2"`` -> [0.1, 0.2] (items converted by ``convert``); anything else is refused with a message."""
    parts = [p for p in re.split(r"[\s,;]+", str(text or "").strip()) if p]
    try:
        return [convert(p) for p in parts]
    except ValueError:
        raise ValueError(f"{what} must be {kind} separated by commas, got {text!r}.") from None


def parse_ints(text, what: str) -> List[int]:
    """``"0, 1, 2"`` -> [0, 1, 2]."""
    return parse_list(text, what, int, "integers")


def parse_floats(text, what: str) -> List[float]:
    """``"0.1, 0.2"`` -> [0.1, 0.2]."""
    return parse_list(text, what, float, "numbers")


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


def default_map_method(state: AppState) -> str:
    """The map's first score: the recommended method when it has a per-neuron score, else the first registered
    score read from activations."""
    names = state.map_methods()
    recommended = resolve_method(None, None)[0]
    if recommended in names:
        return recommended
    return next((n for n in names if scores.get(n).needs == "activations"), names[0])


def live_methods() -> List[str]:
    return [s.name for s in scores.registered() if not s.random]


def build_ui(state: AppState) -> gr.Blocks:
    info = state.info
    downloads = state.downloads_dir()
    layer_help = f"0..{info.n_layers - 1}"
    method0, ablation0 = resolve_method(None, None)  # the CLI's recommendation: prune, live
    row_px, col_px = map_scale(info.n_layers, info.d_mlp)

    # ------------------------------------------------------------------------------------------- handlers

    @ui_errors
    def run_weights(layer, progress=gr.Progress()):
        progress(0, desc="weight analysis (computed once, in the background from start-up)")
        wa = state.weight_analysis()
        summary = (
            f"**{wa.model}**: {wa.total_parameters:,} parameters, {wa.mlp_parameters:,} in MLPs.  \n"
            f"Exactly zero: {wa.zero_parameters:,} (overall sparsity {wa.overall_sparsity:.4%}); "
            f"|w| < {wa.near_zero_threshold:g}: {wa.near_zero_fraction:.2%}.  \n"
            f"Neurons in the low or very low mean |w| band: {len(wa.low_weight_neurons):,}."
        )
        return summary, plots.weight_means_figure(wa), histogram(wa, layer)

    def histogram(wa, layer):
        layer = as_int(layer, "layer")
        if not 0 <= layer < len(wa.layers):
            raise ValueError(f"layer index {layer} is out of range; valid layers are {layer_help}.")
        return plots.weight_histogram_figure(wa, layer)

    @ui_errors
    def run_histogram(layer):
        return histogram(state.weight_analysis(), layer)

    # ---- neuron map and basket

    def basket_view(basket, impacts=None):
        table = state.basket_table(basket, impacts)
        note = f"**{len(basket)} neurons in the basket**" + (f" over layers {sorted({l for l, _ in basket})}" if basket else "")
        return note, display_table(table)

    def map_image(method, ablation, basket):
        values = state.score_map(method, ablation)
        return plots.neuron_map_rgb(values, basket, row_px=row_px, col_px=col_px)

    @ui_errors
    def run_map(method, ablation, basket, impacts, progress=gr.Progress()):
        progress(0, desc="scores of every neuron (the first call calibrates, then they are kept)")
        basket = list(basket or [])
        note, table = basket_view(basket, impacts)
        return map_image(method, ablation, basket), note, table

    @ui_errors
    def map_click(method, ablation, mode, corner, basket, impacts, evt: gr.SelectData):
        basket = list(basket or [])
        x, y = evt.index[0], evt.index[1]
        cell = plots.map_cell(x, y, (info.n_layers, info.d_mlp), row_px=row_px, col_px=col_px)
        if cell is None:
            raise ValueError("click inside the map.")
        if mode.startswith("rectangle"):
            if corner is None:
                note, table = basket_view(basket, impacts)
                return (
                    gr.update(),
                    f"First corner: layer {cell[0]}, neuron {cell[1]}; click the opposite corner.",
                    table,
                    cell,
                    basket,
                )
            basket = picker.add(basket, picker.rectangle(tuple(corner), cell), state.settings.max_basket)
            corner = None
        else:
            basket = picker.add(basket, [cell], state.settings.max_basket)
        note, table = basket_view(basket, impacts)
        return map_image(method, ablation, basket), note, table, corner, basket

    @ui_errors
    def add_rule(rule, method, ablation, basket, impacts, progress=gr.Progress()):
        progress(0, desc="selecting")
        basket = picker.add(list(basket or []), state.select(rule, ablation), state.settings.max_basket)
        note, table = basket_view(basket, impacts)
        return map_image(method, ablation, basket), note, table, basket

    @ui_errors
    def clear_basket(method, ablation):
        note, table = basket_view([])
        return map_image(method, ablation, []), note, table, [], None

    @ui_errors
    def basket_to_impact(basket):
        layer, neurons, left_out = picker.single_layer(list(basket or []))
        gr.Info(
            f"Impact ablates one layer: layer {layer}'s {len(neurons)} basket neurons"
            + (f"; {left_out} of other layers left out." if left_out else ".")
        )
        return layer, ", ".join(str(n) for n in neurons), gr.Tabs(selected="impact")

    @ui_errors
    def basket_to_batch(basket):
        basket = list(basket or [])
        if not basket:
            raise ValueError("the basket is empty; pick neurons on the Neuron map tab first.")
        if len(basket) > state.settings.max_candidates:
            raise ValueError(
                f"the basket holds {len(basket)} neurons; a batch analysis takes at most "
                f"{state.settings.max_candidates}. Clear it and pick fewer."
            )
        rows = pd.DataFrame(basket, columns=BATCH_COLUMNS)
        return rows, gr.Tabs(selected="batch")

    @ui_errors
    def prune_basket(basket, ablation, progress=gr.Progress()):
        progress(0, desc="pruning a copy of the model")
        return str(state.prune_neurons(list(basket or []), ablation))

    # ---- candidates, impact, importance, contexts

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
        return note, display_table(table[list(CANDIDATE_COLUMNS)]), str(csv_path), str(json_path)

    @ui_errors
    def send_to_batch(threshold, how_many):
        n = as_int(how_many, "how many")
        table = first_candidates(state.candidates(threshold), n)
        rows = table[["layer", "neuron"]].rename(columns={"layer": "layer_index", "neuron": "neuron_index"})
        return rows.reset_index(drop=True), gr.Tabs(selected="batch")

    @ui_errors
    def candidates_to_basket(threshold, how_many, basket, impacts):
        n = as_int(how_many, "how many")
        table = first_candidates(state.candidates(threshold), n)
        basket = picker.add(
            list(basket or []), [(int(r.layer), int(r.neuron)) for r in table.itertuples()], state.settings.max_basket
        )
        note, shown = basket_view(basket, impacts)
        return basket, note, shown

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

    # ---- curve, prune, live

    @ui_errors
    def run_curve(methods, sparsities, scope, ablation, calib_tokens, progress=gr.Progress(track_tqdm=True)):
        progress(0, desc="calibrating (once per token budget), then measuring")
        result = state.curve(
            list(methods or []),
            parse_floats(sparsities, "sparsities"),
            scope,
            ablation,
            as_int(calib_tokens, "calibration tokens"),
            progress=True,
        )
        png = plot_curve(result, Path(tempfile.mkdtemp(dir=downloads)) / "curve.png")
        rec = result.recommended
        sets = result.protocol["domains"]
        note = (
            f"Dense perplexity {result.dense_perplexity:.2f} (geometric mean over {len(sets)} evaluation domains, "
            f"{result.protocol['n_tokens_scored']} tokens, {result.protocol['precision']}): "
            f"{', '.join(d['name'] + (' (in-domain)' if d.get('in_domain') else ' (out-of-domain)') for d in sets)}. "
            f"Best on this curve, chosen on the out-of-domain sets: **{rec.get('method')} ({rec.get('ablation')})**. "
            f"The recommended default for pruning (CLI and below) is **{method0} ({ablation0})**."
        )
        return note, str(png), display_table(result.table)

    @ui_errors
    def run_prune(method, sparsity, scope, ablation, calib_tokens, progress=gr.Progress()):
        progress(0, desc="calibrating, selecting, pruning a copy")
        chosen = None if method == RECOMMENDED_CHOICE else method  # None: the CLI's recommended recipe, as `prune`
        return str(state.prune(chosen, float(sparsity), scope, ablation, as_int(calib_tokens, "calibration tokens")))

    @ui_errors
    def run_live(method, scope, sparsity, ablation, prompt, progress=gr.Progress()):
        progress(0, desc="the first move calibrates once (about a minute on the default model); later moves take seconds")
        r = state.live(method, scope, float(sparsity), ablation, prompt)
        return describe(r), display_table(r.table), r.dense_text, r.pruned_text

    @ui_errors
    def run_importance(layer, texts, top_k, progress=gr.Progress(track_tqdm=True)):
        progress(0, desc="waiting for the model")
        r = state.importance(as_int(layer, "layer"), split_texts(texts), as_int(top_k, "top k"), progress=True)
        note = f"Layer {r.layers[0]}: {r.n_texts} texts, {r.n_tokens} tokens. Importance = RMS activation x ||W_out row||."
        critical = r.critical[["label", "neuron", "importance", "rms", "mean", "frac_active", "w_out_norm"]]
        return note, r.table[["neuron", "importance"]], display_table(critical)

    @ui_errors
    def run_batch(table, texts, batch_size, ablation, basket, progress=gr.Progress(track_tqdm=True)):
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
        basket = list(basket or [])
        basket_note, basket_shown = basket_view(basket, r.individual) if basket else (gr.update(), gr.update())
        return (
            note,
            display_table(individual),
            plots.cumulative_impact_figure(r),
            report.recommendations_html(r),
            r.individual,
            basket_note,
            basket_shown,
        )

    # ---- compare models

    @ui_errors
    def run_compare(model_names, methods, sparsities, progress=gr.Progress(track_tqdm=True)):
        progress(0, desc="waiting for the model; then each model in turn is loaded, calibrated and measured")
        comp = state.compare(model_names, list(methods or []), parse_floats(sparsities, "sparsities"), progress=True)
        png = compare.plot_comparison(comp, Path(tempfile.mkdtemp(dir=downloads)) / "compare.png")
        st = comp.settings
        note = (
            f"{len(comp.models)} model{'s' if len(comp.models) > 1 else ''} on the same {st['n_texts']} evaluation texts ({st['ablation']} ablation, "
            f"{st['calib_tokens']} calibration tokens each); perplexities are multiples of each model's own dense.  \n"
            + "  \n".join(
                f"**{r.model}**: dense perplexity {r.dense_perplexity:.2f} on {r.n_eval_tokens} tokens; "
                f"best method {r.winner.get('method', 'none (random only)')}"
                for r in comp.models
            )
        )
        return note, str(png), display_table(compare.comparison_table(comp))

    @ui_errors
    def run_export(kind):
        name, doc = state.export_document(kind)
        return str(write_json(downloads / name, doc))

    # ------------------------------------------------------------------------------------------- layout

    with gr.Blocks(title="neuronscope_tl") as demo:
        basket = gr.State([])
        corner = gr.State(None)
        impacts = gr.State(None)
        gr.Markdown(
            f"# neuronscope_tl: which MLP neurons of {state.model_name} can be pruned?\n"
            f"{info.n_layers} layers x {info.d_mlp} neurons. Impact = mean per-token KL(original || pruned) in nats; "
            f"safe below {state.settings.thresholds.safe_below:g}, high from {state.settings.thresholds.risky_from:g}. "
            "REST API at [/docs](/docs). Pick neurons on the **Neuron map**; the basket feeds Impact, Batch and Prune."
        )
        with gr.Tabs() as tabs:
            with gr.Tab("Weight analysis", id="weights"):
                w_layer = gr.Slider(0, info.n_layers - 1, value=0, step=1, label="Histogram of layer", elem_id="weights-layer")
                w_btn = gr.Button("Analyse weights", variant="primary", elem_id="weights-run")
                w_summary = gr.Markdown(elem_id="weights-summary")
                w_bars = gr.Plot(label="Mean |w| per layer, one bar per matrix", elem_id="weights-bars")
                w_hist = gr.Plot(label="Histogram of |w| in the layer (log count axis)", elem_id="weights-hist")
                w_btn.click(run_weights, [w_layer], [w_summary, w_bars, w_hist], api_name="weights")
                w_layer.release(run_histogram, [w_layer], [w_hist], api_name="weights_histogram")
                w_layer.input(run_histogram, [w_layer], [w_hist], trigger_mode="always_last")  # a layer typed in its box

            with gr.Tab("Neuron map", id="map"):
                gr.Markdown(TAB_INTROS["map"])
                with gr.Row():
                    n_method = gr.Dropdown(list(state.map_methods()), value=default_map_method(state), label="Score")
                    n_ablation = gr.Radio(["zero", "mean"], value="zero", label="Ablation (for scores that depend on it)")
                    n_mode = gr.Radio(["add one neuron", "rectangle: two clicks"], value="add one neuron", label="Click mode")
                n_btn = gr.Button("Show map", variant="primary", elem_id="map-run")
                n_image = gr.Image(
                    label=f"Layer x neuron map ({info.n_layers} x {info.d_mlp})",
                    interactive=False,
                    elem_id="map-image",
                    height=max(200, info.n_layers * row_px + 40),
                )
                with gr.Row():
                    n_rule = gr.Textbox(
                        value=f"lowest 5% of layer {info.n_layers // 2} by {default_map_method(state)}",
                        label="Rule",
                        elem_id="map-rule",
                        scale=4,
                    )
                    n_rule_btn = gr.Button("Add by rule", elem_id="map-rule-run", scale=1)
                n_note = gr.Markdown(elem_id="basket-note")
                n_basket = gr.Dataframe(
                    label="Candidate basket (scores from the calibration; impact after a batch run)",
                    interactive=False,
                    max_height=300,
                    elem_id="basket-table",
                )
                with gr.Row():
                    n_to_impact = gr.Button("Basket -> Impact")
                    n_to_batch = gr.Button("Basket -> Batch", elem_id="basket-to-batch")
                    n_clear = gr.Button("Clear basket")
                with gr.Row():
                    n_prune_ablation = gr.Radio(["zero", "mean"], value="zero", label="Ablation of the pruned neurons")
                    n_prune = gr.Button("Prune the basket's neurons and download")
                n_file = gr.File(label="Pruned model (zip)")
                n_btn.click(run_map, [n_method, n_ablation, basket, impacts], [n_image, n_note, n_basket], api_name="neuron_map")
                n_image.select(
                    map_click,
                    [n_method, n_ablation, n_mode, corner, basket, impacts],
                    [n_image, n_note, n_basket, corner, basket],
                )
                n_rule_btn.click(
                    add_rule,
                    [n_rule, n_method, n_ablation, basket, impacts],
                    [n_image, n_note, n_basket, basket],
                    api_name="select_rule",
                )
                n_clear.click(clear_basket, [n_method, n_ablation], [n_image, n_note, n_basket, basket, corner])
                n_prune.click(prune_basket, [basket, n_prune_ablation], [n_file], api_name="prune_basket")

            with gr.Tab("Candidates", id="candidates"):
                c_threshold = gr.Slider(
                    0.1,
                    100,
                    value=10.0,
                    step=0.1,
                    label="Threshold percentile of mean |w| within each layer",
                    elem_id="cand-threshold",
                )
                c_btn = gr.Button("Find candidates", variant="primary", elem_id="cand-run")
                c_note = gr.Markdown(elem_id="cand-note")
                c_table = gr.Dataframe(
                    label="Candidates (click a header to sort; 4 significant digits, downloads in full)",
                    interactive=False,
                    max_height=400,
                )
                with gr.Row():
                    c_csv = gr.File(label="CSV")
                    c_json = gr.File(label="JSON")
                with gr.Row():
                    c_n = gr.Number(value=5, precision=0, label="How many to send")
                    c_send = gr.Button("Send to batch")
                    c_basket = gr.Button("Add to basket")
                c_btn.click(run_candidates, [c_threshold], [c_note, c_table, c_csv, c_json], api_name="candidates")
                c_basket.click(
                    candidates_to_basket,
                    [c_threshold, c_n, basket, impacts],
                    [basket, n_note, n_basket],
                    api_name="candidates_to_basket",
                )

            with gr.Tab("Impact", id="impact"):
                with gr.Row():
                    i_layer = gr.Number(value=0, precision=0, label=f"Layer ({layer_help})", elem_id="impact-layer")
                    i_neurons = gr.Textbox(value="0, 1, 2", label=f"Neurons (0..{info.d_mlp - 1}, comma separated)")
                    i_ablation = gr.Radio(["zero", "mean"], value="zero", label="Ablation")
                i_from_basket = gr.Button("Take the basket's neurons")
                i_text = gr.Textbox(value=EXAMPLE_TEXTS[0], lines=3, label="Text")
                i_btn = gr.Button("Simulate pruning", variant="primary", elem_id="impact-run")
                i_score = gr.Markdown(elem_id="impact-score")
                i_plot = gr.LinePlot(
                    x="layer", y="relative_change", label="Relative change of the residual stream after each block"
                )
                i_tokens = gr.HighlightedText(
                    label="Each token shaded by its KL (relative to the text's largest)",
                    show_legend=False,
                    elem_id="impact-tokens",
                )
                i_table = gr.Dataframe(
                    label="Per-token KL (position t = prediction after token t)", interactive=False, max_height=300
                )
                i_btn.click(
                    run_impact, [i_layer, i_neurons, i_text, i_ablation], [i_score, i_plot, i_tokens, i_table], api_name="impact"
                )
                n_to_impact.click(basket_to_impact, [basket], [i_layer, i_neurons, tabs])
                i_from_basket.click(basket_to_impact, [basket], [i_layer, i_neurons, tabs])

            with gr.Tab("Importance", id="importance"):
                with gr.Row():
                    m_layer = gr.Number(value=0, precision=0, label=f"Layer ({layer_help})", elem_id="importance-layer")
                    m_top = gr.Number(value=10, precision=0, label="Critical neurons to list")
                m_texts = gr.Textbox(value="\n".join(EXAMPLE_TEXTS), lines=5, label="Texts, one per line")
                m_btn = gr.Button("Measure importance", variant="primary", elem_id="importance-run")
                m_note = gr.Markdown(elem_id="importance-note")
                m_plot = gr.LinePlot(x="neuron", y="importance", label="Importance per neuron")
                m_critical = gr.Dataframe(label="Critical neurons", interactive=False, elem_id="importance-critical")
                m_btn.click(run_importance, [m_layer, m_texts, m_top], [m_note, m_plot, m_critical], api_name="importance")

            with gr.Tab("Neuron contexts", id="contexts"):
                with gr.Row():
                    x_layer = gr.Number(value=0, precision=0, label=f"Layer ({layer_help})")
                    x_neuron = gr.Number(value=0, precision=0, label=f"Neuron (0..{info.d_mlp - 1})", elem_id="contexts-neuron")
                x_texts = gr.Textbox(value="\n".join(EXAMPLE_TEXTS), lines=5, label="Texts, one per line")
                x_btn = gr.Button("Show top contexts", variant="primary", elem_id="contexts-run")
                x_note = gr.Markdown(elem_id="contexts-note")
                x_table = gr.Dataframe(label="Top-activating token contexts", interactive=False, elem_id="contexts-table")
                x_btn.click(run_contexts, [x_layer, x_neuron, x_texts], [x_note, x_table], api_name="contexts")

            with gr.Tab("Batch", id="batch"):
                b_table = gr.Dataframe(
                    value=pd.DataFrame({"layer_index": [0, 0, 0], "neuron_index": [0, 1, 2]}),
                    headers=BATCH_COLUMNS,
                    datatype=["number", "number"],
                    interactive=True,
                    label="Candidates (editable)",
                )
                b_from_basket = gr.Button("Take the basket's neurons")
                b_texts = gr.Textbox(
                    value="\n".join(EXAMPLE_TEXTS[:2]), lines=4, label="Texts, one per line", elem_id="batch-texts"
                )
                with gr.Row():
                    b_size = gr.Number(value=1, precision=0, label="Texts per forward pass")
                    b_ablation = gr.Radio(["zero", "mean"], value="zero", label="Ablation")
                b_btn = gr.Button("Analyse batch", variant="primary", elem_id="batch-run")
                b_note = gr.Markdown(elem_id="batch-note")
                b_individual = gr.Dataframe(label="Each candidate alone", interactive=False, elem_id="batch-individual")
                b_curve = gr.Plot(label="Cumulative impact (first k pruned together)")
                b_rec = gr.HTML(label="Recommendations", elem_id="batch-recommendations")
                b_btn.click(
                    run_batch,
                    [b_table, b_texts, b_size, b_ablation, basket],
                    [b_note, b_individual, b_curve, b_rec, impacts, n_note, n_basket],
                    api_name="batch",
                )
                c_send.click(send_to_batch, [c_threshold, c_n], [b_table, tabs], api_name="send_to_batch")
                n_to_batch.click(basket_to_batch, [basket], [b_table, tabs])
                b_from_basket.click(basket_to_batch, [basket], [b_table, tabs])

            with gr.Tab("Pruning curve", id="curve"):
                with gr.Row():
                    p_methods = gr.CheckboxGroup(list(scores.method_names()), value=curve_methods(), label="Methods")
                    p_sparsities = gr.Textbox(
                        value="0.1, 0.2, 0.3", label="Sparsities in [0, 1), comma separated", elem_id="curve-sparsities"
                    )
                with gr.Row():
                    p_scope = gr.Radio(list(SCOPES), value="per_layer", label="Scope")
                    p_ablation = gr.Radio(["zero", "mean"], value=ablation0, label="Ablation")
                    p_calib = gr.Number(
                        value=state.default_calib_tokens,
                        precision=0,
                        label=f"Calibration tokens (1..{state.settings.max_calib_tokens})",
                    )
                p_btn = gr.Button("Measure pruning curve", variant="primary", elem_id="curve-run")
                p_note = gr.Markdown(elem_id="curve-note")
                p_plot = gr.Image(
                    label="Perplexity x dense against sparsity, per evaluation domain (random's spread shaded)", type="filepath"
                )
                p_table = gr.Dataframe(label="Curve", interactive=False, elem_id="curve-table")
                p_btn.click(
                    run_curve,
                    [p_methods, p_sparsities, p_scope, p_ablation, p_calib],
                    [p_note, p_plot, p_table],
                    api_name="curve",
                )
                gr.Markdown(
                    "### Prune and download\nA physically smaller Hugging Face directory (zip) that plain transformers loads. "
                    "The defaults are the CLI's recommendation."
                )
                with gr.Row():
                    d_method = gr.Dropdown(
                        [RECOMMENDED_CHOICE] + list(scores.method_names()),
                        value=RECOMMENDED_CHOICE,
                        label=f"Method ({RECOMMENDED_CHOICE}: {recipes.RECOMMENDED.describe()}, as `neuronscope-tl prune`)",
                    )
                    d_sparsity = gr.Number(value=0.2, label="Sparsity")
                d_btn = gr.Button("Prune and download")
                d_file = gr.File(label="Pruned model (zip)")
                d_btn.click(run_prune, [d_method, d_sparsity, p_scope, p_ablation, p_calib], [d_file], api_name="prune")
                d_basket = gr.Button("Prune exactly the basket's neurons instead")
                d_basket.click(prune_basket, [basket, p_ablation], [d_file])

            with gr.Tab("Live pruning", id="live"):
                gr.Markdown(TAB_INTROS["live"])
                with gr.Row():
                    l_method = gr.Dropdown(live_methods(), value=method0, label="Method")
                    l_scope = gr.Radio(list(SCOPES), value="per_layer", label="Scope")
                    l_ablation = gr.Radio(["zero", "mean"], value=ablation0, label="Ablation")
                l_sparsity = gr.Slider(
                    0.0,
                    LIVE_MAX_SPARSITY,
                    value=0.2,
                    step=0.05,
                    label="Sparsity (fraction of MLP neurons removed)",
                    elem_id="live-sparsity",
                )
                l_prompt = gr.Textbox(value=DEFAULT_PROMPT, label="Prompt", elem_id="live-prompt")
                l_btn = gr.Button("Measure", variant="primary", elem_id="live-run")
                l_note = gr.Markdown(elem_id="live-note")
                l_table = gr.Dataframe(
                    label="Perplexity per evaluation domain: dense, pruned, x dense", interactive=False, elem_id="live-table"
                )
                with gr.Row():
                    l_dense = gr.Textbox(label="Dense continuation", interactive=False, elem_id="live-dense")
                    l_pruned = gr.Textbox(label="Pruned continuation", interactive=False, elem_id="live-pruned")
                live_inputs = [l_method, l_scope, l_sparsity, l_ablation, l_prompt]
                live_outputs = [l_note, l_table, l_dense, l_pruned]
                l_btn.click(run_live, live_inputs, live_outputs, api_name="live")
                l_sparsity.release(run_live, live_inputs, live_outputs, trigger_mode="always_last")

            with gr.Tab("Compare models", id="compare"):
                gr.Markdown(TAB_INTROS["compare"])
                with gr.Row():
                    k_models = gr.Textbox(
                        value=state.model_name,
                        elem_id="compare-models",
                        scale=2,
                        label=f"Models, comma separated (any of: {', '.join(state.compare_choices())})",
                    )
                    k_sparsities = gr.Textbox(
                        value=", ".join(f"{x:g}" for x in compare.DEFAULT_SPARSITIES),
                        label="Sparsities in [0, 1), comma separated",
                        elem_id="compare-sparsities",
                    )
                k_methods = gr.CheckboxGroup(list(scores.method_names()), value=list(compare.DEFAULT_METHODS), label="Methods")
                k_btn = gr.Button("Compare models", variant="primary", elem_id="compare-run")
                k_note = gr.Markdown(elem_id="compare-note")
                k_plot = gr.Image(
                    label="Pruning curves, layer sensitivity, importance distribution, outlier neurons",
                    type="filepath",
                    elem_id="compare-plot",
                )
                k_table = gr.Dataframe(label="One row per model", interactive=False, elem_id="compare-table")
                k_btn.click(run_compare, [k_models, k_methods, k_sparsities], [k_note, k_plot, k_table], api_name="compare")

            with gr.Tab("Export", id="export"):
                e_kind = gr.Radio(["weight", "impact"], value="weight", label="What to export")
                e_btn = gr.Button("Export JSON", variant="primary", elem_id="export-run")
                e_file = gr.File(label="Download", elem_id="export-file")
                e_btn.click(run_export, [e_kind], [e_file], api_name="export")
    return demo
