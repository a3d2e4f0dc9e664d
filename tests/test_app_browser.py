"""The app on the embedded default model: the seed's example requests answer, and a real headless Chromium
(Debian's /usr/bin/chromium driven by Playwright) runs the Impact tab and sees the library's score."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable, Optional

import pytest
from _app_live import LiveServer
from fastapi.testclient import TestClient

import neuronscope_tl as ns
from neuronscope_tl.app import create_app

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]
P = "/api/pruning"

pytestmark = pytest.mark.default_model


def test_seed_examples_on_default_model(default_model):
    c = TestClient(create_app(default_model, ui=False))
    r = c.post(f"{P}/impact-analysis", json={"layer_index": 0, "neuron_indices": [0, 1, 2], "input_text": ns.EXAMPLE_TEXTS[0]})
    assert r.status_code == 200 and r.json()["verdict"] in ("safe", "moderate", "high")
    r = c.post(f"{P}/neuron-importance", json={"layer_index": 0, "input_texts": ns.EXAMPLE_TEXTS})
    assert r.status_code == 200 and len(r.json()["neurons"]) == default_model.cfg.d_mlp
    body = {
        "pruning_candidates": [{"layer_index": 0, "neuron_index": n} for n in range(3)],
        "input_texts": ns.EXAMPLE_TEXTS[:2],
        "batch_size": 10,
    }
    r = c.post(f"{P}/batch-analysis", json=body)
    assert r.status_code == 200 and set(r.json()["recommendations"]) >= {"safe_to_prune", "risky_to_prune"}
    assert c.post(f"{P}/export", json={"type": "impact"}).json()["kind"] == "batch_analysis"


@pytest.mark.browser
def test_impact_tab_in_headless_chromium(default_model, tmp_path):
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install -y chromium chromium-driver")
    from playwright.sync_api import sync_playwright

    expected = ns.simulate_pruning(default_model, 0, [0, 1, 2], ns.EXAMPLE_TEXTS[0])
    ARTIFACTS.mkdir(exist_ok=True)
    with LiveServer(default_model) as srv, sync_playwright() as pw:
        browser = pw.chromium.launch_persistent_context(
            str(tmp_path / "profile"),
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1280, "height": 1600},
        )
        try:
            page = browser.new_page()
            page.goto(srv.url + "/", timeout=60_000)
            page.get_by_role("tab", name="Impact").click()
            page.locator("#impact-run").click()  # the seed's example is pre-filled: layer 0, neurons 0, 1, 2
            score = page.locator("#impact-score")
            score.get_by_text(re.compile("Impact score")).wait_for(timeout=90_000)
            page.wait_for_timeout(500)  # let the plot and the shaded tokens render for the screenshot
            page.screenshot(path=str(ARTIFACTS / "impact_tab.png"), full_page=True)
            text = score.inner_text()
            assert f"Impact score: {expected.impact_score:.6f} nats" in text
            assert expected.verdict in text
            # the shaded text shows the example's tokens
            assert "fox" in page.locator("#impact-tokens").inner_text()
        finally:
            browser.close()


# ---------------------------------------------------------------------------------------------- every tab
# Every tab driven in headless Chromium with its defaults and with one bad input. By default on a tiny model with a
# 1024-token context (seconds per tab); NEURONSCOPE_TL_BROWSER_MODEL=default runs the same test on the embedded
# default model (minutes) for full-page screenshots of real numbers.

import os  # noqa: E402

from neuronscope_tl import activations, compare, curves, plots  # noqa: E402
from neuronscope_tl.app import picker  # noqa: E402
from neuronscope_tl.app.state import AppSettings  # noqa: E402
from neuronscope_tl.curves import CURVE_DOMAIN_WINDOWS  # noqa: E402
from neuronscope_tl.app.ui import map_scale  # noqa: E402

TOAST = '[data-testid="toast-text"]'


@pytest.fixture(scope="module")
def browser_model(tmp_path_factory):
    if os.environ.get("NEURONSCOPE_TL_BROWSER_MODEL") == "default":
        return "default", ns.load_model()
    from conftest import save_tiny

    return "tiny", ns.load_model(save_tiny(tmp_path_factory.mktemp("browser-llama"), "llama", max_position_embeddings=1024))


def shown(x: float) -> str:
    """A float as the tables show it: 4 significant digits."""
    return f"{plots.round_significant(float(x)):g}"


class Tabs:
    """One page of the app: open a tab, run it, read what it shows, screenshot it."""

    def __init__(self, page, tag: str):
        self.page, self.tag = page, tag
        self.shots: list = []

    def open(self, name: str):
        self.page.get_by_role("tab", name=name, exact=True).click()

    def text(self, selector: str, contains: str, timeout: float = 120_000) -> str:
        loc = self.page.locator(selector)
        loc.get_by_text(re.compile(re.escape(contains))).first.wait_for(timeout=timeout)
        return loc.inner_text()

    def error(self, contains: str) -> str:
        """The error toast's text: the library's message, never a traceback."""
        toast = self.page.locator(TOAST).filter(has_text=contains).first
        toast.wait_for(timeout=120_000)
        text = toast.inner_text()
        assert "Traceback" not in text and 'File "' not in text
        return text

    def no_traceback(self):
        assert "Traceback" not in self.page.content()

    def close_toasts(self):
        for button in self.page.locator('[data-testid="toast-close"]').all():
            button.click()

    def shot(self, name: str):
        self.page.wait_for_timeout(700)  # let plots and tables render
        path = ARTIFACTS / f"{self.tag}_{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        self.shots.append(path)

    def bad_input(
        self,
        name: str,
        run: Optional[str],
        expect: Optional[str],
        field: Optional[str] = None,
        value: str = "",
        enter: bool = False,
        check: Optional[Callable[[], None]] = None,
    ):
        """One bad input on the open tab: fill ``value`` into ``field`` (a selector, its first match; None when the
        bad choice is already made), press Enter if asked, click ``run``, wait for the error toast holding
        ``expect`` (or call ``check`` where a widget may refuse the value itself), check that no traceback shows,
        take the screenshot ``{name}_bad`` and close the toasts."""
        if field is not None:
            box = self.page.locator(field).first
            box.fill(value)
            if enter:
                box.press("Enter")
        if run is not None:
            self.page.locator(run).click()
        if expect is not None:
            self.error(expect)
        if check is not None:
            check()
        self.no_traceback()
        self.shot(f"{name}_bad")
        self.close_toasts()


@pytest.mark.browser
def test_every_tab_in_headless_chromium(browser_model, tmp_path):
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install -y chromium chromium-driver")
    from playwright.sync_api import sync_playwright

    tag, model = browser_model
    info = ns.mlp_info(model)
    settings = AppSettings(max_calib_tokens=512) if tag == "tiny" else AppSettings()
    ARTIFACTS.mkdir(exist_ok=True)
    with LiveServer(model, settings) as srv, sync_playwright() as pw:
        state = srv.state
        browser = pw.chromium.launch_persistent_context(
            str(tmp_path / "profile"),
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1280, "height": 1200},
        )
        try:
            page = browser.new_page()
            page.goto(srv.url + "/", timeout=60_000)
            t = Tabs(page, tag)

            # Export first: an impact export before any analysis is refused with a message
            t.open("Export")
            page.get_by_label("impact").check()
            t.bad_input("export", "#export-run", "no impact analysis has run yet")
            page.get_by_label("weight").check()
            page.locator("#export-run").click()
            page.locator("#export-file").get_by_text("weight_analysis").wait_for(timeout=120_000)
            t.shot("export")

            # Weight analysis: the library's totals
            t.open("Weight analysis")
            page.locator("#weights-run").click()
            summary = t.text("#weights-summary", "parameters")
            with state.model_work():
                wa = ns.analyze_weights(model)
            summary = t.text("#weights-summary", f"{wa.total_parameters:,} parameters")
            assert f"overall sparsity {wa.overall_sparsity:.4%}" in summary and f"{wa.near_zero_fraction:.2%}" in summary
            page.locator("#weights-hist img, #weights-hist svg, #weights-hist canvas").first.wait_for(timeout=60_000)
            t.shot("weights")
            # a layer out of range typed into the slider's box: the slider's own check refuses it
            t.bad_input(
                "weights",
                None,
                f"Value {info.n_layers + 5} is greater than maximum value {info.n_layers - 1}",
                "#weights-layer input[type=number]",
                str(info.n_layers + 5),
                enter=True,
            )

            # Neuron map: a click adds the neuron under the pointer; the default rule adds the library's choice
            t.open("Neuron map")
            page.locator("#map-run").click()
            img = page.locator("#map-image img").first
            img.wait_for(timeout=300_000)
            t.text("#basket-note", "0 neurons in the basket")
            box = img.bounding_box()
            natural = page.evaluate("(e) => [e.naturalWidth, e.naturalHeight]", img.element_handle())
            # the bitmap is drawn scaled down to fit (object-fit), centred in the element
            scale = min(1.0, box["width"] / natural[0], box["height"] / natural[1])
            left, top = (box["width"] - natural[0] * scale) / 2, (box["height"] - natural[1] * scale) / 2
            row_px, col_px = map_scale(info.n_layers, info.d_mlp)
            layer, neuron = info.n_layers // 2, info.d_mlp // 3
            img.click(position={"x": left + (neuron + 0.5) * col_px * scale, "y": top + (layer + 0.5) * row_px * scale})
            note = t.text("#basket-note", "1 neurons in the basket")
            assert f"[{layer}]" in note
            table = page.locator("#basket-table").inner_text()
            assert str(neuron) in table
            rule = page.locator("#map-rule textarea, #map-rule input").first.input_value()
            expected = picker.add([(layer, neuron)], state.select(rule), state.settings.max_basket)  # takes the lock
            page.locator("#map-rule-run").click()
            t.text("#basket-note", f"{len(expected)} neurons in the basket")
            t.shot("map")
            t.bad_input(
                "map",
                "#map-rule-run",
                "out of range",
                "#map-rule textarea, #map-rule input",
                f"lowest 5% of layer {info.n_layers + 90} by wanda",
            )

            # the basket goes to Batch without typing an index; the batch's numbers are the library's
            page.locator("#basket-to-batch").click()
            page.locator("#batch-run").click()
            note = t.text("#batch-note", "can be pruned together safely", timeout=300_000)
            with state.model_work():  # the app's model: never two analyses on it at once
                batch = ns.batch_analysis(model, expected, ns.EXAMPLE_TEXTS[:2], progress=False)
            rec = batch.recommendations
            assert f"impact {rec['cumulative_impact']:.6f} nats ({rec['cumulative_verdict']})" in note
            assert f"the first {rec['max_safe_prefix']} can be pruned" in note
            recs = page.locator("#batch-recommendations").inner_text()
            for row in batch.individual.head(3).itertuples():
                assert row.label in recs and shown(row.impact_score) in recs
            t.shot("batch")
            t.bad_input("batch", "#batch-run", "empty", "#batch-texts textarea", "   ")

            # Candidates
            t.open("Candidates")
            page.locator("#cand-run").click()
            t.text("#cand-note", "flagged safe")
            with state.model_work():
                cands = ns.assess_candidates(model, 10.0)
            t.text("#cand-note", f"{len(cands):,} candidates")
            assert f"{int(cands.is_pruning_candidate.sum()):,} flagged safe" in page.locator("#cand-note").inner_text()
            t.shot("candidates")

            def threshold_refused_or_kept():
                # the slider either refuses it with its own message or keeps its value within (0, 100]
                page.wait_for_timeout(3000)
                toasts = [q.inner_text() for q in page.locator(TOAST).all()]
                assert all("maximum value 100" in q for q in toasts), toasts
                if not toasts:
                    assert 0 < float(page.locator("#cand-threshold input[type=number]").input_value() or 10) <= 150
                    t.text("#cand-note", "candidates")

            # a threshold past 100
            t.bad_input(
                "candidates",
                "#cand-run",
                None,
                "#cand-threshold input[type=number]",
                "150",
                enter=True,
                check=threshold_refused_or_kept,
            )

            # Impact (defaults: layer 0, neurons 0, 1, 2)
            t.open("Impact")
            page.locator("#impact-run").click()
            text = t.text("#impact-score", "Impact score")
            with state.model_work():
                r = ns.simulate_pruning(model, 0, [0, 1, 2], ns.EXAMPLE_TEXTS[0])
            assert f"Impact score: {r.impact_score:.6f} nats" in text and r.verdict in text
            t.shot("impact")
            t.bad_input("impact", "#impact-run", "out of range", "#impact-layer input", str(info.n_layers + 90))

            # Importance
            t.open("Importance")
            page.locator("#importance-run").click()
            t.text("#importance-note", "tokens")
            with state.model_work():
                imp = activations.neuron_importance(model, ns.EXAMPLE_TEXTS, layer_index=0, top_k=10)
            note = t.text("#importance-note", f"{imp.n_tokens} tokens")
            assert f"{imp.n_texts} texts" in note
            critical = page.locator("#importance-critical").inner_text()
            assert shown(imp.critical["importance"].iloc[0]) in critical
            t.shot("importance")
            t.bad_input("importance", "#importance-run", "out of range", "#importance-layer input", "-1")

            # Neuron contexts
            t.open("Neuron contexts")
            page.locator("#contexts-run").click()
            t.text("#contexts-note", "L0N0")
            t.shot("contexts")
            t.bad_input("contexts", "#contexts-run", "out of range", "#contexts-neuron input", str(info.d_mlp + 7))

            # Pruning curve with its defaults, against prune_curve on the app's kept calibration
            t.open("Pruning curve")
            page.locator("#curve-run").click()
            t.text("#curve-note", "Dense perplexity", timeout=1_800_000)
            methods = curves.curve_methods()
            _, ablation0 = curves.resolve_method(None, None)
            window = min(ns.evaluation.DEFAULT_WINDOW, info.n_ctx)
            with state.model_work():
                cal = state._calibrate(state.default_calib_tokens, methods)
                expected_curve = curves.prune_curve(
                    model,
                    methods,
                    [0.1, 0.2, 0.3],
                    "per_layer",
                    ablation0,
                    calibration=cal,
                    window=window,
                    domains=ns.domains.default_evaluation_sets(),
                    domain_windows_max=CURVE_DOMAIN_WINDOWS,
                )
            assert f"Dense perplexity {expected_curve.dense_perplexity:.2f}" in page.locator("#curve-note").inner_text()
            curve_table = page.locator("#curve-table").inner_text()
            assert shown(expected_curve.table["perplexity"].iloc[0]) in curve_table
            t.shot("curve")
            t.bad_input("curve", "#curve-run", "[0, 1)", "#curve-sparsities textarea, #curve-sparsities input", "0.1, 1.5")

            # Live pruning with its defaults (the recommendation, 0.2), against the library's live engine
            t.open("Live pruning")
            page.locator("#live-run").click()
            note = t.text("#live-note", "neurons pruned", timeout=1_800_000)
            method0, ablation0 = curves.resolve_method(None, None)
            with state.model_work():
                live = state.live_engine.run(
                    method0, "per_layer", 0.2, ablation0, page.locator("#live-prompt textarea").input_value()
                )
            assert f"x{live.geometric_mean:.4g} of dense" in note and f"{live.n_pruned:,} neurons pruned" in note
            table = page.locator("#live-table").inner_text()
            for row in live.table.itertuples():
                assert row.domain in table and shown(row.pruned) in table and shown(row.dense) in table
            assert page.locator("#live-pruned textarea").input_value() == live.pruned_text
            t.shot("live")
            t.bad_input("live", "#live-run", "prompt is empty", "#live-prompt textarea", "   ")

            # Compare models with its defaults (the app's model alone), against compare_models on the same model
            t.open("Compare models")
            assert page.locator("#compare-models textarea, #compare-models input").first.input_value() == state.model_name
            page.locator("#compare-run").click()
            note = t.text("#compare-note", "dense perplexity", timeout=1_800_000)
            with state.model_work():
                comp = compare.compare_models(
                    [model],
                    calib_tokens=min(compare.DEFAULT_COMPARE_CALIB_TOKENS, state.settings.max_calib_tokens),
                    eval_tokens=min(compare.DEFAULT_EVAL_TOKENS, state.settings.max_tokens),
                )
            r = comp.models[0]
            assert f"**{r.model}**" not in note and r.model in note  # markdown rendered
            assert (
                f"dense perplexity {r.dense_perplexity:.2f} on {r.n_eval_tokens} tokens; best method {r.winner['method']}" in note
            )
            row = compare.comparison_table(comp).iloc[0]
            table = page.locator("#compare-table").inner_text()
            for col in ("dense_ppl", "winner_x0.2", "random_x0.2", "most_sensitive_ratio", "importance_top1pct_share"):
                assert shown(row[col]) in table, col
            page.locator("#compare-plot img").first.wait_for(timeout=60_000)
            t.shot("compare")
            t.bad_input(
                "compare",
                "#compare-run",
                "unknown model 'no-such-model'; choose from this model",
                "#compare-models textarea, #compare-models input",
                "no-such-model",
            )
        finally:
            browser.close()
    # every screenshot taken above was written: eleven tabs, each with its defaults and with a bad input
    assert len(set(t.shots)) == 22 and all(p.stat().st_size > 0 for p in t.shots)
