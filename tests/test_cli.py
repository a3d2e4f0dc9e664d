"""The analyze command: argument parsing, a full run on a tiny model, and bad arguments."""

import json

import pytest

from neuronscope_tl import cli


def test_parse_args_defaults():
    name, cfg = cli.parse_args(["analyze"])
    assert name == "analyze"
    assert cfg == cli.AnalyzeConfig()
    assert cfg.model is None and cfg.threshold == 10.0


def test_analyze_on_tiny_model_writes_report(tiny_dirs, tmp_path):
    texts = tmp_path / "texts.txt"
    texts.write_text("The council met on Tuesday.\n\nRain is expected across the coast.\nShares fell.\n")
    out = tmp_path / "report"
    rc = cli.main(["analyze", "--model", tiny_dirs["llama"], "--texts", str(texts), "--out", str(out), "--n-candidates", "3"])
    assert rc == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(
        [
            "weight_analysis.json",
            "weight_analysis_neurons.csv",
            "candidates.csv",
            "neuron_importance.csv",
            "neuron_importance.json",
            "batch_analysis.json",
            "batch_analysis_individual.csv",
            "batch_analysis_cumulative.csv",
            "report.json",
            "report.html",
        ]
    )
    report = json.loads((out / "report.json").read_text())
    batch = json.loads((out / "batch_analysis.json").read_text())
    assert len(report["impacts"]) == 3 == len(batch["result"]["individual"])
    # the report's numbers are the exported batch analysis's numbers
    assert [i["impact_score"] for i in report["impacts"]] == [d["impact_score"] for d in batch["result"]["individual"]]
    assert batch["texts"]["n_texts"] == 3


@pytest.mark.parametrize(
    "argv,message",
    [
        (["analyze", "--threshold", "0"], "(0, 100]"),
        (["analyze", "--threshold", "150"], "(0, 100]"),
        (["analyze", "--batch-size", "0"], ">= 1"),
        (["analyze", "--texts", "/no/such/file.txt"], "no such file"),
        (["analyze", "--n-candidates", "0"], ">= 1"),
    ],
)
def test_bad_arguments_exit_2_without_files(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(argv + ["--out", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_texts_file_with_only_blank_lines(tiny_dirs, tmp_path, capsys):
    texts = tmp_path / "t.txt"
    texts.write_text("\n   \n")
    assert cli.main(["analyze", "--model", tiny_dirs["gpt2"], "--texts", str(texts), "--out", str(tmp_path / "o")]) == 2
    assert "no non-empty line" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
