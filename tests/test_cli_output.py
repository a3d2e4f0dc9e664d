"""What the command line shows and writes: progress, help defaults, file listings, permissions, errors that name
flags, the top contexts file, report.html, and one measurement per analysis. Tiny models only."""

from __future__ import annotations

import json
import os
import re
import stat
import time

import pytest
import torch

import neuronscope_tl as ns
from neuronscope_tl import cli, impact, scoring


@pytest.fixture
def texts_file(tmp_path):
    f = tmp_path / "texts.txt"
    f.write_text(
        "The council met on Tuesday to discuss the budget.\nRain is expected across the coast tonight.\n"
        "Shares fell sharply in early trading.\n"
    )
    return f


def test_analyze_measures_each_impact_once_and_equals_simulate_pruning(tiny_dirs, texts_file, tmp_path, monkeypatch, capsys):
    """One measurement pass for the impacts (the batch test); each candidate's reported impact equals its own
    simulate_pruning on the same texts; every file written is listed."""
    calls = []
    real = impact.measure_plans
    monkeypatch.setattr(impact, "measure_plans", lambda *a, **k: calls.append(len(a[2])) or real(*a, **k))
    out = tmp_path / "out"
    assert (
        cli.main(["analyze", "--model", tiny_dirs["llama"], "--texts", str(texts_file), "--out", str(out), "--n-candidates", "3"])
        == 0
    )
    assert len(calls) == 1 and calls[0] == 3 + 2  # 3 alone, then the first 2 and 3 together
    printed = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    for f in report["files"]:
        assert f in printed  # listed at the end
    model = ns.load_model(tiny_dirs["llama"])
    evalt = ns.texts.read_text_file(str(texts_file))
    for item in report["impacts"]:
        r = ns.simulate_pruning(model, item["layer_index"], item["neuron_indices"], evalt, "zero", calib_texts=evalt)
        assert item["impact_score"] == pytest.approx(r.impact_score, rel=1e-5, abs=1e-9)


def test_report_html_is_self_contained_and_shows_the_batch(tiny_dirs, texts_file, tmp_path):
    out = tmp_path / "out"
    assert (
        cli.main(["analyze", "--model", tiny_dirs["gpt2"], "--texts", str(texts_file), "--out", str(out), "--n-candidates", "2"])
        == 0
    )
    page = (out / "report.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and page.count("data:image/png;base64,") >= 3
    assert not re.search(r'(src|href)="(https?:)?//', page)  # nothing fetched from the network
    batch = json.loads((out / "batch_analysis.json").read_text())["result"]
    for row in batch["individual"]:
        assert row["label"] in page and f"{row['impact_score']:.4g}".replace("e-0", "e-") in page.replace("e-0", "e-")


def test_score_writes_every_neurons_top_contexts_as_measured(tiny_dirs, texts_file, tmp_path):
    """top_contexts.csv: for each neuron its k largest activations over the scored tokens, each equal to the
    activation TransformerLens's own run_with_cache reports at that text and position."""
    import pandas as pd

    out = tmp_path / "scores"
    assert (
        cli.main(
            [
                "score",
                "--model",
                tiny_dirs["llama"],
                "--calib-texts",
                str(texts_file),
                "--out",
                str(out),
                "--top-k-contexts",
                "3",
                "--validate-n",
                "0",
            ]
        )
        == 0
    )
    ctx = pd.read_csv(out / "top_contexts.csv", keep_default_na=False)
    model = ns.load_model(tiny_dirs["llama"])
    tokens = ns.texts.tokenize(model, ns.texts.read_text_file(str(texts_file)), max_tokens=2048)
    acts = {}
    with torch.no_grad():
        for i, ids in enumerate(tokens):
            _, cache = model.run_with_cache(ids[None], names_filter=lambda n: n.endswith("mlp.hook_post"))
            for layer in range(model.cfg.n_layers):
                acts[(layer, i)] = cache[f"blocks.{layer}.mlp.hook_post"][0]
    n_layers, d = model.cfg.n_layers, model.cfg.d_mlp
    assert len(ctx) == n_layers * d * 3
    for layer, neuron in [(0, 0), (1, 17), (n_layers - 1, d - 1)]:
        rows = ctx[(ctx.layer == layer) & (ctx.neuron == neuron)].sort_values("rank")
        every = torch.cat([acts[(layer, i)][:, neuron] for i in range(len(tokens))])
        assert rows["activation"].to_numpy() == pytest.approx(every.topk(3).values.numpy(), rel=1e-5, abs=1e-6)
        for r in rows.itertuples():
            assert float(acts[(layer, r.text_index)][r.position, neuron]) == pytest.approx(r.activation, rel=1e-5, abs=1e-6)
            assert r.token == model.tokenizer.decode([int(tokens[r.text_index][r.position])])
    assert str(out / "top_contexts.csv") in json.loads((out / "score_report.json").read_text())["files"]


def test_every_command_has_its_own_default_output_folder():
    outs = {}
    for name, (cls, _, _) in cli.COMMANDS.items():
        field = next((f for f in cli.dataclasses.fields(cls) if f.name == "out"), None)
        if field is not None:
            outs[name] = field.default
    assert len(set(outs.values())) == len(outs), outs


def test_help_names_every_default():
    parser = cli.build_parser()
    for name in cli.COMMANDS:
        sub = parser._subparsers._group_actions[0].choices[name]
        for action in sub._actions:
            if action.option_strings == ["-h", "--help"]:
                continue
            assert action.help and ("default:" in action.help or "required" in action.help), (name, action.option_strings)
            assert "default: )" not in action.help, (name, action.help)
            if action.dest == "model":
                assert "default: the embedded" in action.help
    text = cli.build_parser()._subparsers._group_actions[0].choices["prune"].format_help()
    method, ablation = cli.curves.resolve_method(None, None)
    assert f"the recommended method, {method}" in re.sub(r"\s+", " ", text)


def test_unknown_model_fails_fast_and_names_the_flag(monkeypatch, capsys, tmp_path):
    """With the hub unreachable, a hub id not in the cache fails without the hub client's retries (offline mode is
    on during the load and restored after), and the message says to omit --model."""
    import huggingface_hub.constants as hub

    seen = []
    real = ns.models.load_model
    monkeypatch.setattr(cli, "hub_reachable", lambda timeout=3.0: False)
    monkeypatch.setattr(ns.models, "load_model", lambda *a, **k: seen.append(hub.HF_HUB_OFFLINE) or real(*a, **k))
    before = hub.HF_HUB_OFFLINE
    assert cli.main(["analyze", "--model", "no-such-org/no-such-model-xyz", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "Omit --model" in err and "name=None" not in err and "unreachable" in err
    assert seen == [True] and hub.HF_HUB_OFFLINE == before
    assert not (tmp_path / "o").exists()


def test_hub_ids_and_local_names_are_told_apart(tmp_path):
    assert cli.is_hub_id("someone/some-model")
    assert not cli.is_hub_id(None) and not cli.is_hub_id("default") and not cli.is_hub_id("hooked:default")
    assert not cli.is_hub_id(str(tmp_path))


def test_heartbeat_speaks_during_a_silent_step():
    lines = []
    with cli.Heartbeat(lines.append, every=0.2) as log:
        log("calibrating")
        time.sleep(0.7)
        log("done")
    assert lines[0] == "calibrating" and lines[-1] == "done"
    assert any(line.startswith("  ... still working") and "calibrating" in line for line in lines[1:-1])


def test_busy_machine_note(monkeypatch):
    monkeypatch.setattr(os, "getloadavg", lambda: (6.0, 5.0, 4.0))
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert "busy" in cli.machine_load_note() and "6.0" in cli.machine_load_note()
    monkeypatch.setattr(os, "getloadavg", lambda: (0.2, 0.2, 0.2))
    assert "busy" not in cli.machine_load_note()


def test_outputs_get_the_users_normal_permissions(tmp_path, capsys):
    """A pruned model directory and its files, and report.html: 0777 / 0666 minus the umask (never mkstemp's 0600).
    The latency line carries the machine's load."""
    from conftest import save_tiny

    model_dir = save_tiny(tmp_path / "tiny", "llama", max_position_embeddings=1024)
    old = os.umask(0o022)
    try:
        out = tmp_path / "pruned"
        assert (
            cli.main(
                ["prune", "--model", model_dir, "--sparsity", "0.25", "--calib-tokens", "200", "--no-evaluate", "--out", str(out)]
            )
            == 0
        )
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    names = {f.name for f in out.iterdir()}
    assert {"model.safetensors", "config.json", "pruning_report.json", "report.html"} <= names
    for f in out.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, f
    printed = capsys.readouterr().out
    m = re.search(
        r"latency, median of 5 forwards over \d+ tokens: dense (\d+) ms \(IQR (\d+)-(\d+) ms\), pruned (\d+) ms "
        r"\(IQR (\d+)-(\d+) ms\); .*load average",
        printed,
    )
    assert m, printed
    rep = json.loads((out / "pruning_report.json").read_text())["model"]
    shown = [
        rep["latency_s_before"],
        *rep["latency_quartiles_s_before"],
        rep["latency_s_after"],
        *rep["latency_quartiles_s_after"],
    ]
    assert [int(g) for g in m.groups()] == [round(x * 1e3) for x in shown]
    assert str(out / "model.safetensors") in printed


def test_contexts_table_equals_top_contexts(tiny_dirs):
    """The file's rows equal the library's per-neuron top_contexts (same pass, both read from its accumulator)."""
    model = ns.load_model(tiny_dirs["gpt2"])
    result = scoring.score_pass(model, ns.EXAMPLE_TEXTS, top_k_contexts=2)
    table = cli.contexts_table(result, window=3)
    for layer, neuron in [(0, 5), (2, 40)]:
        mine = table[(table.layer == layer) & (table.neuron == neuron)].reset_index(drop=True)
        lib = scoring.top_contexts(result, layer, neuron, window=3)
        assert mine["activation"].tolist() == lib["activation"].tolist()
        assert mine["position"].tolist() == lib["position"].tolist() and mine["token"].tolist() == lib["token"].tolist()
