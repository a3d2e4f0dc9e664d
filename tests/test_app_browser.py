"""The app on the embedded default model: the seed's example requests answer, and a real headless Chromium
(Debian's /usr/bin/chromium driven by Playwright) runs the Impact tab and sees the library's score."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from _app_live import LiveServer
from fastapi.testclient import TestClient

import neuronscope_tl as ns
from neuronscope_tl.app import create_app

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--no-first-run",
]
P = "/api/pruning"

pytestmark = pytest.mark.default_model


def test_seed_examples_on_default_model(default_model):
    c = TestClient(create_app(default_model, ui=False))
    r = c.post(f"{P}/impact-analysis", json={"layer_index": 0, "neuron_indices": [0, 1, 2], "input_text": ns.EXAMPLE_TEXTS[0]})
    assert r.status_code == 200 and r.json()["verdict"] in ("safe", "moderate", "high")
    r = c.post(f"{P}/neuron-importance", json={"layer_index": 0, "input_texts": ns.EXAMPLE_TEXTS})
    assert r.status_code == 200 and len(r.json()["neurons"]) == default_model.cfg.d_mlp
    body = {"pruning_candidates": [{"layer_index": 0, "neuron_index": n} for n in range(3)], "input_texts": ns.EXAMPLE_TEXTS[:2], "batch_size": 10}
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
            str(tmp_path / "profile"), executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
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
