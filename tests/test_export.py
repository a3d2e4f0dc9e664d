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
    pd.testing.assert_frame_equal(
        table[["layer", "neuron", "w_out_norm"]], wa.neurons[["layer", "neuron", "w_out_norm"]], check_dtype=False, rtol=1e-6
    )
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
    ind = pd.read_csv(paths[1], float_precision="round_trip")
    assert ind.impact_score.tolist() == b.individual.impact_score.tolist()  # CSV floats round-trip exactly


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


# ---------------------------------------------------------------------------------------------- file sets


def _snapshot(directory):
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def _first_set(tmp_path):
    files = {
        tmp_path / "a.json": {"v": 1, "x": [1.5, float("nan")]},
        tmp_path / "a_rows.csv": pd.DataFrame({"layer": [0, 1], "score": [0.25, float("nan")]}),
        tmp_path / "a_more.csv": pd.DataFrame({"n": [3]}),
    }
    return files, {k: (pd.DataFrame({"n": [7, 8]}) if k.suffix == ".csv" else {"v": 2}) for k in files}


def test_write_set_writes_json_and_csv_like_the_single_writers(tmp_path):
    files, _ = _first_set(tmp_path)
    assert export.write_set(files) == list(files)
    single = tmp_path / "single"
    single.mkdir()
    export.write_json(single / "a.json", files[tmp_path / "a.json"])
    export.write_csv(single / "a_rows.csv", files[tmp_path / "a_rows.csv"])
    assert (tmp_path / "a.json").read_bytes() == (single / "a.json").read_bytes()
    assert json.loads((tmp_path / "a.json").read_text()) == {"v": 1, "x": [1.5, None]}  # strict JSON
    assert (tmp_path / "a_rows.csv").read_text() == "layer,score\n0,0.25\n1,\n"  # no index column
    assert (tmp_path / "a_rows.csv").read_bytes() == (single / "a_rows.csv").read_bytes()


@pytest.mark.parametrize("fail_at", [0, 1, 2])
@pytest.mark.parametrize("stage", ["write", "rename"])
def test_write_set_failure_on_any_file_keeps_the_previous_set(tmp_path, monkeypatch, stage, fail_at):
    """A full disk while writing file k, or a failing rename of file k after the files before it were already
    replaced: afterwards every file holds its previous bytes and no temporary or backup file is left."""
    import errno
    import os

    first, second = _first_set(tmp_path)
    export.write_set(first)
    before = _snapshot(tmp_path)
    targets = [str(p) for p in second]
    real_fdopen, real_replace = os.fdopen, os.replace
    calls = {"write": 0}

    class HalfThenFull:
        def __init__(self, fh):
            self.fh = fh

        def write(self, text):
            self.fh.write(text[: len(text) // 2])
            self.fh.flush()
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.fh, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

    def fdopen(fd, *args, **kwargs):
        fh = real_fdopen(fd, *args, **kwargs)
        calls["write"] += 1
        return HalfThenFull(fh) if calls["write"] == fail_at + 1 else fh

    def replace(src, dst):
        if str(dst) == targets[fail_at] and str(src).endswith(".tmp"):
            raise OSError(errno.EIO, "Input/output error", str(dst))
        return real_replace(src, dst)

    if stage == "write":
        monkeypatch.setattr(export.os, "fdopen", fdopen)
    else:
        monkeypatch.setattr(export.os, "replace", replace)
    with pytest.raises(OSError) as info:
        export.write_set(second)
    monkeypatch.undo()
    assert info.value.errno == (errno.ENOSPC if stage == "write" else errno.EIO)
    assert _snapshot(tmp_path) == before  # byte for byte, and nothing else in the directory
    # the same set then goes through, and replaces every file
    export.write_set(second)
    assert json.loads((tmp_path / "a.json").read_text()) == {"v": 2}
    assert pd.read_csv(tmp_path / "a_more.csv")["n"].tolist() == [7, 8]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(before)


def test_write_set_rename_failure_removes_files_that_were_new(tmp_path, monkeypatch):
    import os

    export.write_json(tmp_path / "old.json", {"keep": True})
    before = _snapshot(tmp_path)
    real_replace = os.replace

    def replace(src, dst):
        if str(dst).endswith("third.csv"):
            raise PermissionError(13, "Permission denied", str(dst))
        return real_replace(src, dst)

    monkeypatch.setattr(export.os, "replace", replace)
    with pytest.raises(PermissionError):
        export.write_set(
            {
                tmp_path / "first.json": {"a": 1},
                tmp_path / "old.json": {"keep": False},
                tmp_path / "third.csv": pd.DataFrame({"x": [1]}),
            }
        )
    monkeypatch.undo()
    assert _snapshot(tmp_path) == before


def test_write_set_refuses_bad_sets_before_writing(tmp_path):
    (tmp_path / "sub").mkdir()
    with pytest.raises(ValueError, match="given twice"):
        export.write_set({tmp_path / "a.json": {}, tmp_path / "sub" / ".." / "a.json": {}})
    (tmp_path / "sub").rmdir()
    with pytest.raises(ValueError, match="does not exist"):
        export.write_set({tmp_path / "a.json": {}, tmp_path / "nope" / "b.json": {}})
    with pytest.raises(TypeError):
        export.write_set({tmp_path / "a.json": {}, tmp_path / "b.json": {"bad": object()}})
    assert list(tmp_path.iterdir()) == []


def test_impact_export_is_all_or_nothing(tiny_model, tmp_path, monkeypatch):
    """export_impact writes its JSON and both CSVs as one set: a failing last rename leaves the previous export."""
    import os

    texts = ["The council met on Tuesday.", "Rain is expected."]
    ns.export_impact(ns.batch_analysis(tiny_model, [(0, 1), (1, 2)], texts, progress=False), tmp_path / "b.json")
    before = _snapshot(tmp_path)
    other = ns.batch_analysis(tiny_model, [(2, 3)], texts[:1], progress=False)
    real_replace = os.replace

    def replace(src, dst):
        if str(dst).endswith("b_cumulative.csv"):
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(export.os, "replace", replace)
    with pytest.raises(OSError):
        ns.export_impact(other, tmp_path / "b.json")
    monkeypatch.undo()
    assert _snapshot(tmp_path) == before
    ns.export_impact(other, tmp_path / "b.json")
    assert pd.read_csv(tmp_path / "b_cumulative.csv")["label"].tolist() == ["L2N3"]
