"""Export documents, CSV round trips, and atomic writes that leave nothing behind on error."""

import json

import pandas as pd
import pytest

import neuronscope_tl as ns
from neuronscope_tl import export


def test_weight_export_document_and_csv(tiny_model, tmp_path):
    wa = ns.analyze_weights(tiny_model)
    json_path, csv_path = ns.export_weights(wa, tmp_path / "weights.json")
    doc = json.loads(json_path.read_text())
    assert doc["schema_version"] == ns.SCHEMA_VERSION
    assert doc["kind"] == "weight_analysis" and doc["model"] == tiny_model.cfg.model_name
    assert doc["settings"] == {"near_zero_threshold": 0.01} and doc["created"].endswith("+00:00")
    assert doc["result"]["total_parameters"] == wa.total_parameters
    table = pd.read_csv(csv_path)
    pd.testing.assert_frame_equal(table[["layer", "neuron", "w_out_norm"]], wa.neurons[["layer", "neuron", "w_out_norm"]], check_dtype=False, rtol=1e-6)
    assert len(doc["result"]["neurons"]) == len(table)


def test_impact_export_records_texts_and_settings(tiny_model, tmp_path):
    texts = ["The council met on Tuesday.", "Rain is expected."]
    b = ns.batch_analysis(tiny_model, [(0, 1), (1, 2)], texts, progress=False)
    paths = ns.export_impact(b, tmp_path / "batch.json")
    assert [p.name for p in paths] == ["batch.json", "batch_individual.csv", "batch_cumulative.csv"]
    doc = json.loads(paths[0].read_text())
    assert doc["kind"] == "batch_analysis"
    assert doc["texts"] == {"n_texts": 2, "n_tokens": sum(tiny_model.to_tokens(t).shape[1] for t in texts)}
    assert doc["settings"]["ablation"] == "zero" and doc["settings"]["thresholds"] == {"safe_below": 0.1, "risky_from": 0.3}
    assert doc["result"]["recommendations"]["max_safe_prefix"] == b.recommendations["max_safe_prefix"]
    ind = pd.read_csv(paths[1])
    assert ind.impact_score.tolist() == pytest.approx(b.individual.impact_score.tolist())


def test_result_item_access_and_nan_is_null(tiny_model):
    r = ns.simulate_pruning(tiny_model, 0, [1], "The council met.")
    assert r["impact_score"] == r.impact_score and "verdict" in r
    with pytest.raises(KeyError):
        r["nope"]
    assert json.loads(json.dumps(export.to_jsonable({"x": float("nan")}))) == {"x": None}


def test_failed_write_leaves_no_file(tmp_path):
    target = tmp_path / "out.json"

    def explode(fh):
        fh.write("partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        export.atomic_write(target, explode)
    assert list(tmp_path.iterdir()) == []


def test_unserialisable_document_leaves_no_file(tmp_path):
    with pytest.raises(TypeError):
        export.write_json(tmp_path / "x.json", {"bad": object()})
    assert list(tmp_path.iterdir()) == []


def test_failed_write_keeps_previous_file(tmp_path):
    target = tmp_path / "out.json"
    export.write_json(target, {"v": 1})
    with pytest.raises(OSError):
        export.atomic_write(target, lambda fh: (_ for _ in ()).throw(OSError("boom")))
    assert json.loads(target.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_missing_directory_is_a_value_error(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        export.write_json(tmp_path / "nope" / "x.json", {})
