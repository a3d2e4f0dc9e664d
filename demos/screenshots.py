"""Full-page screenshots of every tab of the demo on one model, for the README and release notes.

    python demos/screenshots.py --model default --out docs/screenshots

Serves the app in this process on a free loopback port (``LiveServer`` of the app tests), drives each tab in
headless Chromium as ``tests/test_app_browser.py`` does (Playwright over /usr/bin/chromium), runs it with its
default inputs, waits for its result and saves ``<out>/<tab id>.png``. The pruning curve and the comparison are
cut to wanda and random at sparsity 0.2, so a real model takes minutes, not an hour. Progress goes to stderr; the
last line on stdout is one JSON object: per tab its seconds and file, the model, the load average, torch's threads.
Needs the test extra (``pip install -e ".[test]"``) and a Chromium binary.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the app tests' live server and browser helpers, reused as they are

SHORT_METHODS = ("wanda", "random")  # the curve and the comparison: the recommended score against chance
SHORT_SPARSITIES = "0.2"


def log(message: str) -> None:
    print(f"screenshots: {message}", file=sys.stderr, flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default", help="a name load_model accepts, or a local model directory")
    p.add_argument("--out", type=Path, default=Path("docs/screenshots"), help="folder for <tab id>.png")
    p.add_argument("--timeout-s", type=float, default=1800, help="longest wait for one result (a first calibration)")
    p.add_argument("--chromium", default="/usr/bin/chromium", help="the Chromium binary Playwright drives")
    return p.parse_args(argv)


def check_browser(chromium: str) -> None:
    """Refuse early, before the model loads, when Playwright or Chromium is missing."""
    if importlib.util.find_spec("playwright") is None:
        sys.exit('screenshots: Playwright is missing: pip install -e ".[test]" (or pip install playwright)')
    if not Path(chromium).is_file():
        sys.exit(f"screenshots: no Chromium at {chromium}: apt-get install -y chromium (or pass --chromium PATH)")


class Demo:
    """The app's page with the waits the steps share (``Tabs`` of the browser test opens tabs and reads text)."""

    def __init__(self, tabs, state, timeout_ms: float):
        self.tabs, self.page, self.state, self.timeout_ms = tabs, tabs.page, state, timeout_ms

    def run(self, button: str, result: str, contains: str) -> str:
        """Click ``button`` and wait until ``result`` shows ``contains``."""
        self.page.locator(button).click()
        return self.tabs.text(result, contains, timeout=self.timeout_ms)

    def wait_for(self, selector: str, text: Optional[re.Pattern] = None) -> None:
        loc = self.page.locator(selector)
        (loc.get_by_text(text) if text else loc).first.wait_for(timeout=self.timeout_ms)

    def methods(self, wanted) -> None:
        """Tick exactly ``wanted`` in the open tab's method checkboxes (role queries see only the open tab)."""
        from neuronscope_tl import scores

        for name in scores.method_names():
            self.page.get_by_role("checkbox", name=name, exact=True).set_checked(name in wanted)

    def fill(self, selector: str, value: str) -> None:
        self.page.locator(f"{selector} textarea, {selector} input").first.fill(value)


def basket_size(n: Optional[int] = None) -> re.Pattern:
    """The basket note holding ``n`` neurons (None: any but zero)."""
    return re.compile(rf"(?<!\d){'[1-9][0-9]*' if n is None else n} neurons in the basket")


# ---------------------------------------------------------------------------------------------- the tabs
# One step per tab, in the order the UI shows them; each leaves its result on screen for the screenshot.


def weights(d: Demo) -> None:
    d.run("#weights-run", "#weights-summary", "parameters")
    d.wait_for("#weights-hist img, #weights-hist svg, #weights-hist canvas")


def neuron_map(d: Demo) -> None:
    d.run("#map-run", "#basket-note", "neurons in the basket")
    d.wait_for("#map-image img")
    d.page.locator("#map-rule-run").click()  # the default rule, so the basket has neurons for Batch
    d.wait_for("#basket-note", basket_size())


def candidates(d: Demo) -> None:
    d.run("#cand-run", "#cand-note", "flagged safe")


def impact(d: Demo) -> None:
    d.run("#impact-run", "#impact-score", "Impact score")
    d.wait_for("#impact-tokens", re.compile(r"\S"))


def importance(d: Demo) -> None:
    d.run("#importance-run", "#importance-note", "tokens")


def contexts(d: Demo) -> None:
    d.run("#contexts-run", "#contexts-note", "L0N0")


def batch(d: Demo) -> None:
    d.tabs.open("Neuron map")
    held = int(re.search(r"(\d+) neurons in the basket", d.page.locator("#basket-note").inner_text())[1])
    limit = d.state.settings.max_candidates
    if held > limit:
        # A real model's default rule (5% of a layer) picks more neurons than a batch analysis takes: pick the
        # lowest ``limit`` of the same layer by the same score instead.
        log(f"the basket holds {held} neurons, a batch takes {limit}: refilling it with the rule's lowest {limit}")
        d.page.get_by_role("button", name="Clear basket", exact=True).click()
        d.wait_for("#basket-note", basket_size(0))
        rule = d.page.locator("#map-rule textarea, #map-rule input").first
        rule.fill(re.sub(r"^\s*lowest\s+\S+", f"lowest {limit}", rule.input_value()))
        d.page.locator("#map-rule-run").click()
        d.wait_for("#basket-note", basket_size(limit))
    d.page.locator("#basket-to-batch").click()  # fills the Batch table and opens the Batch tab
    d.run("#batch-run", "#batch-note", "can be pruned together safely")


def curve(d: Demo) -> None:
    d.methods(SHORT_METHODS)
    d.fill("#curve-sparsities", SHORT_SPARSITIES)
    d.run("#curve-run", "#curve-note", "Dense perplexity")


def live(d: Demo) -> None:
    d.run("#live-run", "#live-note", "neurons pruned")


def compare(d: Demo) -> None:
    d.methods(SHORT_METHODS)
    d.fill("#compare-sparsities", SHORT_SPARSITIES)
    d.run("#compare-run", "#compare-note", "dense perplexity")
    d.wait_for("#compare-plot img")


def export(d: Demo) -> None:
    d.run("#export-run", "#export-file", "weight_analysis")


# (tab id as in neuronscope_tl/app/ui.py, tab label, step)
STEPS = (
    ("weights", "Weight analysis", weights),
    ("map", "Neuron map", neuron_map),
    ("candidates", "Candidates", candidates),
    ("impact", "Impact", impact),
    ("importance", "Importance", importance),
    ("contexts", "Neuron contexts", contexts),
    ("batch", "Batch", batch),
    ("curve", "Pruning curve", curve),
    ("live", "Live pruning", live),
    ("compare", "Compare models", compare),
    ("export", "Export", export),
)


def take_screenshots(model, out: Path, chromium: str, timeout_s: float) -> dict:
    """Serve ``model``, run every tab in headless Chromium and save ``out/<tab id>.png``: {tab id: seconds, file}."""
    from _app_live import LiveServer
    from playwright.sync_api import sync_playwright
    from test_app_browser import CHROMIUM_ARGS, Tabs

    out.mkdir(parents=True, exist_ok=True)
    done = {}
    with LiveServer(model) as srv, sync_playwright() as pw, tempfile.TemporaryDirectory() as profile:
        browser = pw.chromium.launch_persistent_context(
            profile, executable_path=chromium, headless=True, args=CHROMIUM_ARGS, viewport={"width": 1280, "height": 1200}
        )
        try:
            page = browser.new_page()
            page.goto(srv.url + "/", timeout=timeout_s * 1000)
            page.get_by_role("tab").first.wait_for(timeout=timeout_s * 1000)  # Gradio renders after the load
            shown = page.get_by_role("tab").all_inner_texts()
            if [s.strip() for s in shown] != [label for _, label, _ in STEPS]:
                raise SystemExit(f"screenshots: the demo's tabs are {shown}; update STEPS in {Path(__file__).name}")
            demo = Demo(Tabs(page, "screenshots"), srv.state, timeout_s * 1000)
            for i, (tab_id, label, step) in enumerate(STEPS, 1):
                start = time.perf_counter()
                (out / f"{tab_id}_failed.png").unlink(missing_ok=True)  # a failed run's leftover
                demo.tabs.open(label)
                try:
                    step(demo)
                except Exception as exc:  # a timeout or a missing element: say which tab, keep what it showed
                    page.screenshot(path=str(out / f"{tab_id}_failed.png"), full_page=True)
                    raise SystemExit(f"screenshots: the {label} tab failed ({out / f'{tab_id}_failed.png'}): {exc}")
                page.wait_for_timeout(700)  # let plots and tables render
                path = out / f"{tab_id}.png"
                page.screenshot(path=str(path), full_page=True)
                done[tab_id] = {"seconds": round(time.perf_counter() - start, 1), "file": str(path)}
                log(f"[{i}/{len(STEPS)}] {label}: {done[tab_id]['seconds']} s -> {path}")
        finally:
            browser.close()
    return done


def main(argv=None) -> int:
    args = parse_args(argv)
    check_browser(args.chromium)
    import torch

    import neuronscope_tl as ns
    from neuronscope_tl.models import model_name

    log(f"loading {args.model}")
    model = ns.load_model(args.model)
    try:
        tabs = take_screenshots(model, args.out, args.chromium, args.timeout_s)
    except BaseException as exc:
        # The server and the browser are closed by now, but an analysis may still run in a server thread, and
        # torch aborts ("terminate called ...") when the interpreter shuts down under it: report and leave at once.
        if isinstance(exc, SystemExit):
            print(exc, file=sys.stderr)
        else:
            traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    summary = {
        "model": model_name(model),
        "tabs": tabs,
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "torch_threads": torch.get_num_threads(),
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
