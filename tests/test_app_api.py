"""REST API through FastAPI's TestClient on a tiny model: the seed's example bodies give the library's numbers,
and every bad input gets the exact status code and the library's message, never a 500."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

import neuronscope_tl as ns
from neuronscope_tl import impact, weights
from neuronscope_tl.app import AppSettings, create_app
from neuronscope_tl.texts import tokenize

from _reference import bridge_noise, impact_reference, impact_tolerances
from conftest import zero_output_weights

P = "/api/pruning"
SEED_IMPACT = {"layer_index": 0, "neuron_indices": [0, 1, 2], "input_text": ns.EXAMPLE_TEXTS[0]}
SEED_IMPORTANCE = {"layer_index": 0, "input_texts": ns.EXAMPLE_TEXTS}
SEED_BATCH = {
    "pruning_candidates": [
        {"layer_index": 0, "neuron_index": 0},
        {"layer_index": 1, "neuron_index": 1},
        {"layer_index": 2, "neuron_index": 2},
    ],
    "input_texts": ns.EXAMPLE_TEXTS[:2],
    "batch_size": 10,
}


@pytest.fixture(scope="module")
def model(tiny_dirs):
    return ns.load_model(tiny_dirs["llama"])


@pytest.fixture
def client(model):
    """A fresh app (fresh state: no last impact) over the module's model; REST only, the UI is tested elsewhere."""
    return TestClient(create_app(model, ui=False))


def core_error(fn, *args, **kwargs) -> str:
    with pytest.raises(ValueError) as info:
        fn(*args, **kwargs)
    return str(info.value)


def test_weight_analysis_matches_library(client, model):
    r = client.get(f"{P}/weight-analysis")
    assert r.status_code == 200
    body = r.json()
    expected = weights.analyze_weights(model)
    # counted another way: every parameter of the HF model, tied embeddings once
    n_params = sum(p.numel() for p in model.original_model.parameters())
    assert body["total_parameters"] == expected.total_parameters == n_params
    assert body["overall_sparsity"] == expected.overall_sparsity  # the same computation; JSON floats round-trip
    assert len(body["layers"]) == model.cfg.n_layers
    assert "neurons" not in body  # the per-neuron table belongs to the export, not the summary


def test_candidates_match_library(client, model):
    r = client.get(f"{P}/candidates", params={"threshold": 10.0})
    assert r.status_code == 200
    body = r.json()
    expected = weights.pruning_candidates(model, 10.0)
    assert body["total_candidates"] == len(expected) == len(body["candidates"])
    assert [(c["layer_index"], c["neuron_index"]) for c in body["candidates"]] == list(zip(expected["layer"], expected["neuron"]))
    # the evidence is the library's, computed on the default calibration texts
    evidence = ns.activation_evidence(model).set_index(["layer", "neuron"])
    for c in body["candidates"]:
        row = evidence.loc[(c["layer_index"], c["neuron_index"])]
        assert c["is_pruning_candidate"] == bool(row.is_pruning_candidate)
        assert c["safety_score"] == float(row.safety_score)  # the same cached computation; JSON round-trips floats
        assert c["activation_score"] == float(row.activation_score)
    assert body["safe_candidates"] == sum(c["is_pruning_candidate"] for c in body["candidates"])
    assert body["safe_percentile"] == 25.0 and "poor guide" in body["limits"]
    # default threshold is the seed's 10th percentile
    assert client.get(f"{P}/candidates").json()["total_candidates"] == len(expected)


@pytest.mark.parametrize("threshold", ["0", "101", "-5", "nan"])
def test_candidates_bad_threshold(client, threshold):
    r = client.get(f"{P}/candidates", params={"threshold": threshold})
    assert r.status_code == 400
    assert r.json() == {"detail": core_error(weights.check_percentile, float(threshold))}


def test_candidates_malformed_threshold(client):
    assert client.get(f"{P}/candidates", params={"threshold": "ten"}).status_code == 422


def test_impact_seed_example(client, model):
    r = client.post(f"{P}/impact-analysis", json=SEED_IMPACT)
    assert r.status_code == 200
    body = r.json()
    expected = impact.simulate_pruning(model, 0, [0, 1, 2], ns.EXAMPLE_TEXTS[0])
    for key in ("impact_score", "loss_change", "loss_original", "loss_pruned", "top1_agreement"):
        assert body[key] == getattr(expected, key), key  # the same call on the same model: the same numbers
    assert body["verdict"] == expected.verdict and body["safe_to_prune"] == (expected.verdict == "safe")
    assert [c["layer"] for c in body["activation_changes"]] == list(range(model.cfg.n_layers))
    # the per-token KL shown in the UI averages to the impact score (one text: every position counts once)
    (detail,) = body["token_kl"]
    assert len(detail["kl"]) == len(detail["tokens"]) == body["n_tokens"]
    # float64 sums of the same fp32 values in two orders: rounding ~n * 1e-16 relative
    assert sum(detail["kl"]) / len(detail["kl"]) == pytest.approx(body["impact_score"], rel=1e-12)


@pytest.mark.parametrize(
    "change, core_call",
    [
        ({"layer_index": 3}, lambda m: impact.check_layer(m, 3)),
        ({"layer_index": -1}, lambda m: impact.check_layer(m, -1)),
        ({"neuron_indices": [0, 48]}, lambda m: impact.check_neurons(m, [0, 48], 0)),
        ({"neuron_indices": [1, 1]}, lambda m: impact.check_neurons(m, [1, 1], 0)),
        ({"neuron_indices": []}, lambda m: impact.check_neurons(m, [], 0)),
        ({"input_text": ""}, lambda m: ns.texts.check_texts([""])),
        ({"input_text": " \n\t"}, lambda m: ns.texts.check_texts([" \n\t"])),
    ],
)
def test_impact_bad_values_get_400_with_core_message(client, model, change, core_call):
    r = client.post(f"{P}/impact-analysis", json={**SEED_IMPACT, **change})
    assert r.status_code == 400
    assert r.json() == {"detail": core_error(core_call, model)}


@pytest.mark.parametrize(
    "body",
    [
        {"layer_index": "zero", "neuron_indices": [0], "input_text": "x"},
        {"layer_index": True, "neuron_indices": [0], "input_text": "x"},
        {"layer_index": 0.5, "neuron_indices": [0], "input_text": "x"},
        {"neuron_indices": [0], "input_text": "x"},
        {"layer_index": 0, "neuron_indices": "0,1", "input_text": "x"},
        {"layer_index": 0, "neuron_indices": [0], "input_text": ["x"]},
        {"layer_index": 0, "neuron_indices": [0], "input_text": "x", "ablation": "random"},
        {"layer_index": 0, "neuron_indices": [0], "input_text": "x", "path": "/tmp/out.json"},
    ],
)
def test_impact_malformed_bodies_get_422(client, body):
    r = client.post(f"{P}/impact-analysis", json=body)
    assert r.status_code == 422
    assert isinstance(r.json()["detail"], list)


def test_impact_not_json_gets_422(client):
    r = client.post(f"{P}/impact-analysis", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422


def test_neuron_importance_seed_example(client, model):
    r = client.post(f"{P}/neuron-importance", json=SEED_IMPORTANCE)
    assert r.status_code == 200
    body = r.json()
    expected = ns.neuron_importance(model, ns.EXAMPLE_TEXTS, layer_index=0, progress=False)
    assert body["layer_index"] == 0 and body["n_texts"] == 3 and body["n_tokens"] == expected.n_tokens
    assert [c["neuron"] for c in body["critical_neurons"]] == expected.critical["neuron"].tolist()
    imp = [n["importance"] for n in body["neurons"]]
    assert imp == expected.table["importance"].tolist()  # the same computation; JSON round-trips floats
    # critical = the 10 largest importances, computed another way
    top = sorted(range(len(imp)), key=lambda i: -imp[i])[:10]
    assert sorted(c["neuron"] for c in body["critical_neurons"]) == sorted(top)


def test_neuron_importance_bad_inputs(client, model):
    r = client.post(f"{P}/neuron-importance", json={"layer_index": 0, "input_texts": []})
    assert (r.status_code, r.json()) == (400, {"detail": core_error(ns.texts.check_texts, [])})
    r = client.post(f"{P}/neuron-importance", json={"layer_index": 7, "input_texts": ["a b"]})
    assert (r.status_code, r.json()) == (400, {"detail": core_error(impact.check_layer, model, 7)})
    r = client.post(f"{P}/neuron-importance", json={"layer_index": 0, "input_texts": ["a b"], "top_k": 0})
    assert r.status_code == 400 and "top_k" in r.json()["detail"]
    r = client.post(f"{P}/neuron-importance", json={"layer_index": 0, "input_texts": "a b"})
    assert r.status_code == 422


def test_batch_seed_example(client, model):
    r = client.post(f"{P}/batch-analysis", json=SEED_BATCH)
    assert r.status_code == 200
    body = r.json()
    rec = body["recommendations"]
    assert set(rec) >= {"safe_to_prune", "risky_to_prune", "moderate", "max_safe_prefix"}
    # each candidate's own impact equals a separate single-candidate simulation (two texts padded into one batch
    # against one text per pass): within the fp32 bound of the padding noise (conftest.kl_tolerance, runs=2)
    tokens = tokenize(model, ns.EXAMPLE_TEXTS[:2])
    model_dir = model.original_model.config._name_or_path
    eta = max(bridge_noise(model, model_dir, tokens, 10), bridge_noise(model, model_dir, tokens, 1))
    for row in body["individual"]:
        alone = impact.simulate_pruning(model, row["layer"], [row["neuron"]], ns.EXAMPLE_TEXTS[:2])
        change = lambda hf, l=row["layer"], n=row["neuron"]: zero_output_weights(hf, l, [n])
        _, _, _, clean, pruned = impact_reference(model_dir, tokens, change)
        kl_tol, _ = impact_tolerances(clean, pruned, tokens, eta, runs=2)
        assert abs(row["impact_score"] - alone.impact_score) <= kl_tol, (row, alone.impact_score, kl_tol)
    # the last cumulative step prunes all three together
    assert [c["n_pruned"] for c in body["cumulative"]] == [1, 2, 3]
    assert len(rec["safe_to_prune"]) + len(rec["moderate"]) + len(rec["risky_to_prune"]) == 3


def test_batch_bad_inputs(client, model):
    dup = {**SEED_BATCH, "pruning_candidates": [{"layer_index": 0, "neuron_index": 4}] * 2}
    r = client.post(f"{P}/batch-analysis", json=dup)
    assert (r.status_code, r.json()) == (400, {"detail": core_error(impact.check_candidates, model, [(0, 4), (0, 4)])})
    r = client.post(f"{P}/batch-analysis", json={**SEED_BATCH, "pruning_candidates": []})
    assert (r.status_code, r.json()) == (400, {"detail": core_error(impact.check_candidates, model, [])})
    r = client.post(f"{P}/batch-analysis", json={**SEED_BATCH, "pruning_candidates": [{"layer_index": 0, "neuron_index": 99}]})
    assert (r.status_code, r.json()) == (400, {"detail": core_error(impact.check_neurons, model, [99], 0)})
    r = client.post(f"{P}/batch-analysis", json={**SEED_BATCH, "batch_size": 0})
    assert (r.status_code, r.json()) == (400, {"detail": core_error(impact.check_batch_size, 0)})
    r = client.post(f"{P}/batch-analysis", json={**SEED_BATCH, "pruning_candidates": [{"layer_index": 0}]})
    assert r.status_code == 422


def test_size_limits_413_at_limit_plus_one(model):
    s = AppSettings(max_texts=2, max_candidates=2, max_batch_size=4, max_top_k=5, max_tokens=40, max_body_bytes=2000)
    c = TestClient(create_app(model, s, ui=False))
    two = ["a b c", "d e f"]
    assert c.post(f"{P}/neuron-importance", json={"layer_index": 0, "input_texts": two, "top_k": 5}).status_code == 200
    r = c.post(f"{P}/neuron-importance", json={"layer_index": 0, "input_texts": two + ["g"], "top_k": 5})
    assert r.status_code == 413 and r.json() == {"detail": "3 texts given; at most 2 texts per request."}
    r = c.post(f"{P}/neuron-importance", json={"layer_index": 0, "input_texts": two, "top_k": 6})
    assert r.status_code == 413 and r.json() == {"detail": "top_k 6 is too large; at most 5."}
    cands = [{"layer_index": 0, "neuron_index": n} for n in range(3)]
    body = {"pruning_candidates": cands[:2], "input_texts": two, "batch_size": 4}
    assert c.post(f"{P}/batch-analysis", json=body).status_code == 200
    assert c.post(f"{P}/batch-analysis", json={**body, "pruning_candidates": cands}).status_code == 413
    assert c.post(f"{P}/batch-analysis", json={**body, "batch_size": 5}).status_code == 413
    # tokens: a text of exactly max_tokens tokens passes, one more token is refused
    text = " ".join(["fox"] * 12)
    n_tok = model.to_tokens(text).shape[1]
    c2 = TestClient(create_app(model, AppSettings(max_tokens=n_tok), ui=False))
    assert c2.post(f"{P}/impact-analysis", json={**SEED_IMPACT, "input_text": text}).status_code == 200
    longer = text + " fox"
    assert model.to_tokens(longer).shape[1] > n_tok
    r = c2.post(f"{P}/impact-analysis", json={**SEED_IMPACT, "input_text": longer})
    assert r.status_code == 413
    assert r.json() == {
        "detail": f"the texts have {model.to_tokens(longer).shape[1]} tokens; at most {n_tok} tokens per request."
    }
    r = c.post(f"{P}/impact-analysis", json={**SEED_IMPACT, "input_text": "x" * 3000})
    assert r.status_code == 413 and "body" in r.json()["detail"]


def test_export_before_impact_then_after(client, model):
    r = client.post(f"{P}/export", json={"type": "impact"})
    assert r.status_code == 409
    assert r.json() == {"detail": "no impact analysis has run yet; run an impact or batch analysis before exporting its results."}
    impact_body = client.post(f"{P}/impact-analysis", json=SEED_IMPACT).json()
    r = client.post(f"{P}/export", json={"type": "impact"})
    assert r.status_code == 200
    assert r.headers["content-disposition"] == 'attachment; filename="impact_analysis.json"'
    doc = r.json()
    assert doc["kind"] == "impact_analysis" and doc["schema_version"] == ns.SCHEMA_VERSION
    assert doc["result"]["impact_score"] == impact_body["impact_score"]
    # a batch analysis becomes the last result
    client.post(f"{P}/batch-analysis", json=SEED_BATCH)
    r = client.post(f"{P}/export", json={"type": "impact"})
    assert (
        r.headers["content-disposition"] == 'attachment; filename="batch_analysis.json"' and r.json()["kind"] == "batch_analysis"
    )


def test_export_weight_is_the_python_export_document(client, model, tmp_path):
    r = client.post(f"{P}/export", json={"type": "weight"})
    assert r.status_code == 200
    assert r.headers["content-disposition"] == 'attachment; filename="weight_analysis.json"'
    doc = r.json()
    ns.export_weights(ns.analyze_weights(model), tmp_path / "w.json")
    written = json.loads((tmp_path / "w.json").read_text())
    doc.pop("created"), written.pop("created")
    assert doc == written


@pytest.mark.parametrize("body, status", [({"type": "csv"}, 400), ({"type": "weight", "path": "/tmp/x.json"}, 422), ({}, 422)])
def test_export_bad_requests(client, body, status):
    r = client.post(f"{P}/export", json=body)
    assert r.status_code == status
    if status == 400:
        assert r.json() == {"detail": "unknown export type 'csv'; valid types are weight, impact."}


def test_docs_ui_and_openapi(model):
    c = TestClient(create_app(model))
    assert c.get("/docs").status_code == 200
    paths = c.get("/openapi.json").json()["paths"]
    for route in ("weight-analysis", "candidates", "impact-analysis", "neuron-importance", "batch-analysis", "export"):
        assert f"{P}/{route}" in paths
    page = c.get("/")
    assert page.status_code == 200 and "gradio" in page.text.lower()
