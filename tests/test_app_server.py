"""The app on a real loopback server: the Gradio handlers through gradio_client, the ``serve`` command, and >= 20
concurrent mixed REST and Gradio requests that must each equal their sequential result and leave the model as it was."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from _app_live import LiveServer
from conftest import FP32_EPS, fp32_forward_error, probe_logits
from gradio_client import Client
from gradio_client.exceptions import AppError

import neuronscope_tl as ns
from neuronscope_tl import impact, plots
from neuronscope_tl.plots import round_significant
from neuronscope_tl.curves import CURVE_DOMAIN_WINDOWS
from neuronscope_tl.cli import ServeConfig, parse_args

P = "/api/pruning"


@pytest.fixture(scope="module")
def model(tiny_dirs):
    return ns.load_model(tiny_dirs["gpt2"])


@pytest.fixture(scope="module")
def live(model):
    with LiveServer(model) as srv:
        yield srv


@pytest.fixture(scope="module")
def gclient(live):
    return Client(live.url + "/", verbose=False)


def test_gradio_impact_shows_library_score_and_token_kl(gclient, model):
    score, _plot, shaded, tokens = gclient.predict(0, "0, 1, 2", ns.EXAMPLE_TEXTS[0], "zero", api_name="/impact")
    expected = impact.simulate_pruning(model, 0, [0, 1, 2], ns.EXAMPLE_TEXTS[0])
    assert f"Impact score: {expected.impact_score:.6f} nats" in score
    assert f"Verdict: **{expected.verdict}**" in score
    (detail,) = expected.token_kl
    assert [item["token"] for item in shaded] == detail["tokens"]
    top = max(detail["kl"])
    # the UI shows the library's numbers: the same floats through JSON (which round-trips them exactly)
    assert [item["class_or_confidence"] for item in shaded] == [k / top for k in detail["kl"]]
    assert [row[2] for row in tokens["data"]] == detail["kl"]


def test_gradio_errors_carry_the_library_message(gclient, model):
    with pytest.raises(AppError) as info:
        gclient.predict(9, "0", "some text", "zero", api_name="/impact")
    assert str(info.value) == str(pytest.raises(ValueError, impact.check_layer, model, 9).value)
    with pytest.raises(AppError, match="empty or whitespace-only"):
        gclient.predict(0, "0", "   ", "zero", api_name="/impact")
    with pytest.raises(AppError, match="neurons must be integers"):
        gclient.predict(0, "zero, one", "text", "zero", api_name="/impact")


def test_gradio_weights_candidates_importance_batch_export(gclient, model):
    summary, per_layer, hist = gclient.predict(1, api_name="/weights")
    wa = ns.analyze_weights(model)
    assert f"{wa.total_parameters:,} parameters" in summary
    assert per_layer is not None and hist is not None  # the figures' numbers: tests/test_plots.py
    note, table, csv_file, json_file = gclient.predict(10.0, api_name="/candidates")
    cands = ns.assess_candidates(model, 10.0)
    assert f"**{len(cands):,} candidates**" in note and len(table["data"]) == len(cands)
    # on screen 4 significant digits; the download in full precision
    col = table["headers"].index("activation_score")
    assert [row[col] for row in table["data"]] == [round_significant(v) for v in cands["activation_score"]]
    assert json.loads(open(json_file).read())[0]["activation_score"] == cands["activation_score"].iloc[0]
    assert f"**{int(cands.is_pruning_candidate.sum()):,} flagged safe**" in note and "poor guide" in note
    assert len(json.loads(open(json_file).read())) == len(cands)
    sent = gclient.predict(10.0, 4, api_name="/send_to_batch")
    assert len(sent["data"]) == 4 and {row[0] for row in sent["data"]} == {0, 1, 2}  # one per layer first
    note, _plot, critical = gclient.predict(0, "\n".join(ns.EXAMPLE_TEXTS), 5, api_name="/importance")
    expected = ns.neuron_importance(model, ns.EXAMPLE_TEXTS, layer_index=0, top_k=5, progress=False)
    assert [row[1] for row in critical["data"]] == expected.critical["neuron"].tolist()
    table = {"headers": ["layer_index", "neuron_index"], "data": [[0, 1], [2, 3]]}
    note, individual, _curve, rec, _basket_note, _basket = gclient.predict(
        table, "\n".join(ns.EXAMPLE_TEXTS[:2]), 1, "zero", api_name="/batch"
    )
    batch = impact.batch_analysis(model, [(0, 1), (2, 3)], ns.EXAMPLE_TEXTS[:2], progress=False)
    # same call, same floats, shown to 4 significant digits
    assert [row[1] for row in individual["data"]] == [round_significant(v) for v in batch.individual["impact_score"]]
    assert f"the first {batch.recommendations['max_safe_prefix']} can be pruned together safely" in note
    for row in batch.individual.itertuples():  # the coloured table: each candidate with its verdict's colour
        assert row.label in rec and plots.VERDICT_COLOURS[row.verdict] in rec
    doc = json.loads(open(gclient.predict("impact", api_name="/export")).read())
    assert doc["kind"] == "batch_analysis"


def test_gradio_top_contexts_equal_scoring_pass(gclient, model):
    from neuronscope_tl import scoring

    note, table = gclient.predict(1, 5, "\n".join(ns.EXAMPLE_TEXTS), api_name="/contexts")
    expected = scoring.top_contexts(scoring.score_pass(model, ns.EXAMPLE_TEXTS), 1, 5)
    assert "L1N5" in note and len(table["data"]) == len(expected) > 0
    assert [row[0] for row in table["data"]] == expected["activation"].tolist()  # same pass, same floats
    assert [row[3] for row in table["data"]] == (expected["left"] + "[" + expected["token"] + "]" + expected["right"]).tolist()
    with pytest.raises(AppError, match="out of range"):
        gclient.predict(1, 10_000, "some text", api_name="/contexts")


@pytest.fixture(scope="module")
def long_ctx_model(tmp_path_factory):
    """A tiny GPT-2 with a 1024-token context, so the Lee articles fit (the default protocol's calibration)."""
    from conftest import save_tiny

    return ns.load_model(save_tiny(tmp_path_factory.mktemp("tiny-gpt2-1024"), "gpt2", n_positions=1024))


def test_gradio_pruning_curve_and_pruned_download(long_ctx_model, tmp_path):
    """The curve tab equals prune_curve on the same calibration; the zip reloads in plain transformers and its
    logits equal the hook-simulated pruning."""
    with LiveServer(long_ctx_model) as srv:
        _check_curve_and_prune(Client(srv.url + "/", verbose=False), long_ctx_model, tmp_path)


def _check_curve_and_prune(gclient, model, tmp_path):
    import zipfile

    from transformers import AutoModelForCausalLM

    from neuronscope_tl import curves, selection, surgery

    note, png, table = gclient.predict(["wanda", "random"], "0.25", "per_layer", "mean", 256, api_name="/curve")
    cal = selection.calibrate(model, calib_tokens=256, with_grams=False, with_gradients=False)
    expected = curves.prune_curve(
        model,
        ["wanda", "random"],
        [0.25],
        "per_layer",
        "mean",
        calibration=cal,
        domains=ns.domains.default_evaluation_sets(),
        domain_windows_max=CURVE_DOMAIN_WINDOWS,
    )
    got = dict(zip([r[0] for r in table["data"]], [r[table["headers"].index("perplexity")] for r in table["data"]]))
    for row in expected.table.itertuples():
        # the same calibration and windows: the same computation, shown to 4 significant digits
        assert got[row.method] == round_significant(row.perplexity)
    assert f"{expected.dense_perplexity:.2f}" in note and open(png, "rb").read(4) == b"\x89PNG"

    archive = gclient.predict("wanda", 0.25, "per_layer", "mean", 256, api_name="/prune")
    with zipfile.ZipFile(archive) as z:
        z.extractall(tmp_path / "pruned")
    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned").eval()
    spec = selection.build_spec(model, cal, "wanda", 0.25, "per_layer", "mean")
    assert pruned.config.n_inner == ns.mlp_info(model).d_mlp - len(spec.neurons[0])
    toks = model.to_tokens(ns.EXAMPLE_TEXTS[0])
    from neuronscope_tl.hooks import attached_hooks

    with torch.no_grad(), attached_hooks(model, surgery.simulation_hooks(spec)):
        simulated = model(toks)
    # two fp32 routes (a smaller model; hooks on the dense bridge): each within the forward's measured fp32 error
    # (floored at 4 ulps of the largest logit), twice that, doubled as a margin
    atol = 4 * max(fp32_forward_error(pruned, [toks[0]]), 4 * FP32_EPS * float(simulated.abs().max()))
    torch.testing.assert_close(pruned(toks).logits, simulated, atol=atol, rtol=0)
    with pytest.raises(AppError, match=r"\[0, 1\)"):
        gclient.predict(["wanda"], "1.5", "per_layer", "zero", 256, api_name="/curve")


def rest(url, method, path, body=None):
    with httpx.Client(base_url=url, timeout=120) as c:
        r = c.request(method, P + path, json=body)
    return r.status_code, r.json()


def test_concurrent_mixed_requests_equal_sequential(live, model):
    """24 mixed requests, 8 at a time; each must equal its own sequential result; logits and hooks unchanged."""
    url = live.url
    texts = ns.EXAMPLE_TEXTS
    jobs = []
    for i in range(4):
        jobs.append(
            ("rest", "POST", "/impact-analysis", {"layer_index": i % 3, "neuron_indices": [i, i + 5], "input_text": texts[i % 3]})
        )
        jobs.append(("rest", "POST", "/neuron-importance", {"layer_index": i % 3, "input_texts": texts[: 1 + i % 3]}))
        jobs.append(
            (
                "rest",
                "POST",
                "/batch-analysis",
                {
                    "pruning_candidates": [{"layer_index": i % 3, "neuron_index": i}, {"layer_index": 2, "neuron_index": 9}],
                    "input_texts": texts[:2],
                    "batch_size": 2,
                },
            )
        )
        jobs.append(("rest", "GET", f"/candidates?threshold={5 + 5 * i}", None))
        jobs.append(("gradio", "/impact", (i % 3, f"{i}, {i + 7}", texts[(i + 1) % 3], "zero")))
        jobs.append(("gradio", "/importance", (i % 3, "\n".join(texts[i % 2 :]), 5)))
    assert len(jobs) >= 20

    def run(job):
        if job[0] == "rest":
            return rest(url, *job[1:])
        out = Client(url + "/", verbose=False).predict(*job[2], api_name=job[1])
        return out[0], json.dumps(out[1:][-1], sort_keys=True)  # the summary text and the last table

    before = probe_logits(model)
    hooks_before = ns.hook_count(model)
    sequential = [run(job) for job in jobs]
    with ThreadPoolExecutor(max_workers=8) as pool:
        concurrent = list(pool.map(run, jobs))
    for job, seq, con in zip(jobs, sequential, concurrent):
        assert con == seq, job
    assert all(r[0] == 200 for job, r in zip(jobs, concurrent) if job[0] == "rest")
    assert torch.equal(probe_logits(model), before)
    assert ns.hook_count(model) == hooks_before == 0


def test_busy_model_answers_503(model):
    from neuronscope_tl.app import AppSettings

    with LiveServer(model, AppSettings(lock_timeout_s=0.2)) as srv:
        with srv.state.lock:  # another analysis holds the model
            status, body = rest(
                srv.url, "POST", "/impact-analysis", {"layer_index": 0, "neuron_indices": [0], "input_text": "a b"}
            )
        assert status == 503 and "busy" in body["detail"]
        assert rest(srv.url, "GET", "/weight-analysis")[0] == 200


def test_serve_config_defaults_to_loopback():
    name, cfg = parse_args(["serve"])
    assert name == "serve" and cfg.host == "127.0.0.1" and cfg.port == 7860 and cfg.model is None
    _, cfg = parse_args(["serve", "--model", "m", "--host", "0.0.0.0", "--port", "0"])
    assert (cfg.model, cfg.host, cfg.port) == ("m", "0.0.0.0", 0)
    with pytest.raises(ValueError):
        ServeConfig(port=70000)
    with pytest.raises(ValueError, match="max_texts must be an integer >= 1"):
        parse_args(["serve", "--max-texts", "0"])


def test_serve_command_prints_bound_address_and_answers(tiny_dirs):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(
        [sys.executable, "-m", "neuronscope_tl.cli", "serve", "--model", tiny_dirs["llama"], "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    try:
        line = proc.stdout.readline()  # blocks until the banner; the socket is already bound then
        assert line.startswith("neuronscope-tl: serving on http://127.0.0.1:"), line
        url = line.split()[3]
        deadline = time.monotonic() + 60
        while True:
            try:
                status, body = rest(url, "GET", "/weight-analysis")
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.2)
        assert status == 200 and body["total_parameters"] > 0
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_basket_keeps_measured_impacts_when_neurons_are_added(live, model):
    """Neurons measured by a batch run keep their impact in the basket table after more neurons join it (by rule,
    or from the candidates); the new ones show none until measured."""
    client = Client(live.url + "/", verbose=False)  # a session of its own: an empty basket
    _img, _note, shown = client.predict("lowest 2 of layer 0 by wanda", "wanda", "zero", api_name="/select_rule")
    first = [(row[0], row[1]) for row in shown["data"]]
    table = {"headers": ["layer_index", "neuron_index"], "data": [list(p) for p in first]}
    client.predict(table, "\n".join(ns.EXAMPLE_TEXTS[:2]), 1, "zero", api_name="/batch")
    _img, _note, shown = client.predict("lowest 1 of layer 2 by wanda", "wanda", "zero", api_name="/select_rule")
    batch = impact.batch_analysis(model, first, ns.EXAMPLE_TEXTS[:2], progress=False)
    col = shown["headers"].index("impact_score")
    rows = {(row[0], row[1]): row[col] for row in shown["data"]}
    assert len(rows) == 3
    for pair, value in zip(first, batch.individual["impact_score"]):
        assert rows[pair] == round_significant(value)
    new = [p for p in rows if p not in first]
    assert len(new) == 1 and str(rows[new[0]]).lower() in ("none", "", "nan")
