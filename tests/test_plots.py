"""Plots and on-screen tables: what each figure draws equals an independent computation from the model or result."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import neuronscope_tl as ns
from neuronscope_tl import plots


@pytest.fixture(scope="module")
def model(tiny_dirs):
    return ns.load_model(tiny_dirs["llama"])


@pytest.fixture(scope="module")
def wa(model):
    return ns.analyze_weights(model)


def test_weight_bars_are_grouped_and_equal_the_weights(model, wa):
    """One bar container per matrix, side by side (no bar starts above zero), each bar the mean |w| of that
    matrix in that layer, computed here from the Hugging Face weights."""
    fig = plots.weight_means_figure(wa)
    ax = fig.axes[0]
    names = [t.get_text() for t in ax.get_legend().get_texts()]
    assert names == ["W_in", "W_gate", "W_out"]
    hf = model.original_model
    for name, bars in zip(names, ax.containers):
        assert all(b.get_y() == 0 for b in bars)  # grouped, not stacked
        for layer, bar in enumerate(bars):
            mlp = hf.model.layers[layer].mlp
            w = {"W_in": mlp.up_proj.weight, "W_gate": mlp.gate_proj.weight, "W_out": mlp.down_proj.weight}[name]
            assert bar.get_height() == pytest.approx(float(w.detach().double().abs().mean()), rel=1e-6)
    lefts = [b.get_x() for c in ax.containers for b in c]
    assert len(set(np.round(lefts, 9))) == len(lefts)  # every bar has its own x position


def test_histogram_on_a_log_count_axis_counts_every_weight(model, wa):
    fig = plots.weight_histogram_figure(wa, 1)
    ax = fig.axes[0]
    assert ax.get_yscale() == "log"
    fig.canvas.draw()
    assert len([t for t in ax.get_xticklabels() if t.get_text()]) <= 8
    table = plots.weight_histogram_table(wa, 1)
    assert table[table.matrix == "W_in"]["count"].sum() == model.W_in[1].numel()
    drawn = ax.patches[0].get_data().values  # the first matrix's stairs
    assert drawn.sum() == model.W_in[1].numel()


def test_cumulative_axis_has_integer_ticks(model):
    batch = ns.batch_analysis(model, [(0, 1), (1, 2), (2, 3)], ns.EXAMPLE_TEXTS[:2], progress=False)
    fig = plots.cumulative_impact_figure(batch)
    ax = fig.axes[0]
    fig.canvas.draw()
    ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
    assert ticks and all(float(t).is_integer() for t in ticks)
    assert list(ax.lines[0].get_ydata()) == batch.cumulative["impact_score"].tolist()


@pytest.mark.parametrize("x", [0.0, 1.234567e-7, 0.000123456, 3.14159265, -27.182818, 123456.789, float("nan")])
def test_round_significant(x):
    got = plots.round_significant(x)
    if np.isnan(x):
        assert np.isnan(got)
    else:
        assert got == float(f"{x:.4g}")


def test_display_table_rounds_floats_only():
    t = pd.DataFrame({"a": [1.23456789, 2.0], "n": [1, 2], "s": ["x", "y"]})
    shown = plots.display_table(t)
    assert shown["a"].tolist() == [1.235, 2.0] and shown["n"].tolist() == [1, 2] and shown["s"].tolist() == ["x", "y"]
    assert t["a"].iloc[0] == 1.23456789  # the original keeps full precision


def test_neuron_map_pixels_are_layer_percentiles():
    from matplotlib import colormaps

    rng = np.random.default_rng(0)
    values = rng.normal(size=(3, 10))
    img = plots.neuron_map_rgb(values, selected=[(2, 7)], row_px=4)
    assert img.shape == (12, 10, 3)
    for layer in range(3):
        order = np.argsort(values[layer])
        for rank, neuron in enumerate(order):
            y, x = layer * 4 + 2, neuron
            assert plots.map_cell(x, y, (3, 10), row_px=4) == (layer, neuron)
            expected = (
                plots.SELECTED_RGB
                if (layer, neuron) == (2, 7)
                else tuple((np.array(colormaps["viridis"](rank / 9)[:3]) * 255).astype(np.uint8))
            )
            assert tuple(img[y, x]) == tuple(expected)
    assert plots.map_cell(10, 0, (3, 10), row_px=4) is None and plots.map_cell(0, 12, (3, 10), row_px=4) is None


def test_curve_figure_shows_ratio_to_dense_with_random_spread(tiny_dirs, tmp_path):
    from conftest import save_tiny

    model = ns.load_model(save_tiny(tmp_path / "m", "gpt2", n_positions=1024))
    res = ns.curves.prune_curve(
        model,
        ["wanda", "random"],
        [0.1, 0.3],
        calib_tokens=200,
        precision="fp32",
        eval_texts=ns.evaluation_texts()[:2],
        seeds=(0, 1),
    )
    fig = plots.curve_figure(res)
    ax = fig.axes[0]
    assert "x dense" in ax.get_ylabel()
    wanda = next(line for line in ax.lines if line.get_label() == "wanda (zero)")
    expected = res.table[res.table.method == "wanda"].sort_values("sparsity")["ratio"]
    assert list(wanda.get_ydata()) == pytest.approx(expected.tolist())
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0.1", "0.3"]  # ticks at the measured sparsities
    assert len(ax.collections) == 1  # random's min-max band over its seeds
    band = ax.collections[0].get_paths()[0].vertices[:, 1]
    r = res.table[res.table.method == "random"]
    assert band.max() == pytest.approx(float((r.perplexity_max / res.dense_perplexity).max()))
    path = plots.plot_curve(res, tmp_path / "curve.png")
    assert path.read_bytes()[:4] == b"\x89PNG"
