"""The user's own domains on the command line (--calib-texts FILE, --eval-texts NAME=FILE) and the search under a
budget over several evaluation sets."""

from __future__ import annotations

import json

import pytest

import neuronscope_tl as ns
from neuronscope_tl import cli, evaluation, search, selection
from neuronscope_tl.domains import TextSet

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # many tiny forwards: one thread, no spin-waiting


@pytest.fixture
def files(tmp_path):
    good = tmp_path / "good.txt"
    good.write_text("\n".join(ns.lee_articles()[10:14]))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    small = tmp_path / "small.txt"
    small.write_text("Only a few words here.\n")
    return {"good": str(good), "empty": str(empty), "small": str(small), "missing": str(tmp_path / "nope.txt")}


@pytest.mark.parametrize("command", ["prune", "curve", "search"])
@pytest.mark.parametrize(
    "case,message",
    [
        ("empty calib", "holds no non-empty line"),
        ("missing calib", "cannot read calibration text file"),
        ("empty eval", "holds no non-empty line"),
        ("duplicate eval", "mine given more than once"),
        ("eval named like a domain", "news given more than once"),
    ],
)
def test_bad_text_files_are_refused_before_any_work(command, case, message, files, tmp_path, capsys):
    out = tmp_path / "out"
    base = [command, "--out", str(out)] + (["--sparsity", "0.2"] if command == "prune" else [])
    extra = {
        "empty calib": ["--calib-texts", files["empty"]],
        "missing calib": ["--calib-texts", files["missing"]],
        "empty eval": ["--eval-texts", f"e={files['empty']}"],
        "duplicate eval": ["--eval-texts", f"mine={files['good']}", "--eval-texts", f"mine={files['good']}"],
        "eval named like a domain": ["--eval-texts", f"news={files['good']}"],
    }[case]
    assert cli.main(base + extra) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_too_few_calibration_tokens_says_how_many(tiny_dirs, files, tmp_path, capsys):
    out = tmp_path / "pruned"
    argv = [
        "prune",
        "--model",
        tiny_dirs["llama"],
        "--sparsity",
        "0.2",
        "--out",
        str(out),
        "--calib-texts",
        files["small"],
        "--calib-tokens",
        "500",
        "--no-evaluate",
    ]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "the calibration texts hold" in err and "fewer than the 500 asked for" in err
    assert not out.exists() or not any(out.iterdir())


def test_search_over_domains_budgets_the_out_of_domain_mean(tiny_dirs):
    model = ns.load_model(tiny_dirs["llama"])
    calib = [" ".join(a.split()[i : i + 20]) for a in ns.lee_articles()[:2] for i in range(0, len(a.split()), 20)]
    cal = selection.calibrate(model, calib, calib_tokens=500)
    sets = [
        TextSet("near", list(ns.lee_articles()[201:203]), "lee", "LGPL", "evaluation", True),
        TextSet("far1", list(ns.lee_articles()[290:291]), "lee", "LGPL", "user", False),
        TextSet("far2", [" ".join(ns.lee_articles()[5].split()[::-1])], "reversed", "LGPL", "user", False),
    ]
    res = search.search_pruning(
        model, 0.3, "wanda", "zero", step=0.1, min_step=0.05, window=128, calibration=cal, domains=sets, bf16=False
    )
    dws = evaluation.domain_windows(model, sets, 128)
    dense = evaluation.domain_perplexities(model, dws)
    for row in res.steps.itertuples():
        spec = selection.build_spec(model, cal, "wanda", row.sparsity, "per_layer", "zero")
        ppl = evaluation.domain_perplexities(model, dws, ns.surgery.simulation_hooks(spec))
        ood = (ppl["far1"] / dense["far1"] * ppl["far2"] / dense["far2"]) ** 0.5
        assert row.ratio == pytest.approx(ood, rel=1e-9)
        assert row.ratio_near == pytest.approx(ppl["near"] / dense["near"], rel=1e-9)
        assert row.accepted == (ood <= 1.3)
    assert res.protocol["budget_on"] == ["far1", "far2"]
    accepted = res.steps[res.steps.accepted]
    assert res.sparsity == (accepted.sparsity.max() if len(accepted) else 0.0)


def test_search_command_writes_its_steps(tiny_dirs, files, tmp_path):
    out = tmp_path / "s"
    argv = [
        "search",
        "--model",
        tiny_dirs["gpt2"],
        "--out",
        str(out),
        "--loss-budget",
        "0.5",
        "--method",
        "wanda",
        "--ablation",
        "zero",
        "--calib-texts",
        files["good"],
        "--calib-tokens",
        "300",
    ]
    assert cli.main(argv) == 0
    doc = json.loads((out / "search.json").read_text())
    # calibrated on the user's file: every default set is out-of-domain, so the budget applies to all of them
    assert doc["method"] == "wanda" and doc["protocol"]["budget_on"] == ["news", "forum", "docs", "reviews", "legal"]
    assert (out / "search_steps.csv").read_text().startswith("sparsity,perplexity,ratio,accepted")
