"""``neuronscope-tl prune`` end to end: the written directory reloads in plain transformers, in a separate Python
process that never imports neuronscope_tl, and its logits equal the hook simulation of the same pruning.

Per-layer scope (a smaller intermediate size), global and owl scopes (stored at the widest layer's width), zero
and mean ablation (the means, or the least-squares refit, carried as an output bias), both MLP kinds. The tiny
models get a 1024-token context so that the default calibration articles fit.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import neuronscope_tl as ns
from neuronscope_tl import cli, recipes, surgery
from neuronscope_tl.hooks import attached_hooks, hook_count

from conftest import FP32_EPS, PROBE_TEXT, fp32_forward_error, load_hf, save_tiny

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CALIB_TOKENS = 300
# (kind, scope, ablation, method); method None: the command's default (the recommended method and its ablation)
RUNS = [
    ("llama", "per_layer", "zero", "wanda"),
    ("llama", "global", "mean", "obs"),
    ("llama", "per_layer", None, None),
    ("llama", "owl", None, None),
    ("gpt2", "per_layer", "mean", "fluctuation"),
    ("gpt2", "global", "zero", "wanda"),
]
SPARSITY = 0.25

RELOAD = textwrap.dedent("""
    import json, sys
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM
    jobs = json.load(open(sys.argv[1]))
    out = {}
    for name, job in jobs.items():
        model = AutoModelForCausalLM.from_pretrained(job["dir"]).eval()
        with torch.no_grad():
            logits = model(torch.tensor([job["tokens"]])).logits[0]
        np.save(job["npy"], logits.numpy())
        cfg = model.config
        out[name] = {"width": getattr(cfg, "intermediate_size", None) or getattr(cfg, "n_inner", None),
                     "mlp_bias": bool(getattr(cfg, "mlp_bias", False))}
    assert not any(m == "neuronscope_tl" or m.startswith("neuronscope_tl.") for m in sys.modules), "imported neuronscope_tl"
    json.dump(out, open(sys.argv[2], "w"))
""")


@pytest.fixture(scope="module")
def long_ctx_dirs(tmp_path_factory):
    return {
        "llama": save_tiny(tmp_path_factory.mktemp("prune-llama"), "llama", max_position_embeddings=1024),
        "gpt2": save_tiny(tmp_path_factory.mktemp("prune-gpt2"), "gpt2", n_positions=1024),
    }


def run_name(run):
    return "-".join(str(x) for x in run)


@pytest.fixture(scope="module")
def pruned(long_ctx_dirs, tmp_path_factory):
    """Run every prune command, then reload all outputs in one plain-transformers subprocess."""
    base = tmp_path_factory.mktemp("pruned")
    jobs, reports = {}, {}
    for run in RUNS:
        kind, scope, ablation, method = run
        out = base / run_name(run)
        argv = [
            "prune",
            "--model",
            long_ctx_dirs[kind],
            "--sparsity",
            str(SPARSITY),
            "--scope",
            scope,
            "--calib-tokens",
            str(CALIB_TOKENS),
            "--no-evaluate",
            "--out",
            str(out),
        ]
        argv += ["--ablation", ablation] if ablation else []
        argv += ["--method", method] if method else []
        assert cli.main(argv) == 0, argv
        reports[run] = json.loads((out / "pruning_report.json").read_text())
        model = ns.load_model(long_ctx_dirs[kind])
        tokens = model.to_tokens(PROBE_TEXT)[0].tolist()
        jobs[run_name(run)] = {"dir": str(out), "tokens": tokens, "npy": str(base / f"{run_name(run)}.npy")}
    (base / "jobs.json").write_text(json.dumps(jobs))
    proc = subprocess.run(
        [sys.executable, "-c", RELOAD, str(base / "jobs.json"), str(base / "configs.json")],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=str(base),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    configs = json.loads((base / "configs.json").read_text())
    return {
        run: (np.load(jobs[run_name(run)]["npy"]), configs[run_name(run)], reports[run], jobs[run_name(run)]["tokens"])
        for run in RUNS
    }


@pytest.mark.parametrize("run", RUNS, ids=run_name)
def test_prune_output_reloads_in_plain_transformers_and_equals_the_simulation(pruned, long_ctx_dirs, run):
    kind, scope, ablation, method = run
    logits, config, report, tokens = pruned[run]
    method = method or report["method"]
    ablation = ablation or report["ablation"]
    assert (report["method"], report["ablation"], report["scope"]) == (method, ablation, scope)

    # the same pruning, simulated with hooks on the bridge (selection is deterministic: same calibration tokens)
    model = ns.load_model(long_ctx_dirs[kind])
    recipe = recipes.Recipe(**report["recipe"])
    if run[3] is None:  # the command's default is the recommended recipe
        assert recipe == recipes.RECOMMENDED
    spec, _ = recipes.recipe_spec(model, recipe, SPARSITY, scope, calib_tokens=CALIB_TOKENS)
    ids = torch.tensor([tokens])
    with torch.no_grad(), attached_hooks(model, surgery.simulation_hooks(spec)):
        simulated = model(ids)[0].double()
    with torch.no_grad():
        dense = model(ids)[0].double()
    assert hook_count(model) == 0

    # two fp32 routes (hooks on the dense bridge; a smaller or masked, refit model): each within the forward's
    # measured fp32 error of the exact logits (floored at 4 ulps of the largest), twice that, doubled as a margin
    hf = load_hf(long_ctx_dirs[kind])
    atol = 4 * max(fp32_forward_error(hf, [ids[0]]), 4 * FP32_EPS * float(simulated.abs().max()))
    got = torch.from_numpy(logits).double()
    torch.testing.assert_close(got, simulated, atol=atol, rtol=0)
    assert (got - dense).abs().max() > 100 * atol  # the pruning changed the model's output

    d_mlp = ns.mlp_info(model).d_mlp
    k = round(SPARSITY * d_mlp)
    widest = d_mlp - min(len(spec.neurons.get(l, ())) for l in range(ns.mlp_info(model).n_layers))
    padded = surgery.padded(spec, ns.mlp_info(model).n_layers)
    assert config["width"] == widest and report["model"]["masked"] == padded
    if scope == "per_layer":
        assert widest == d_mlp - k and all(len(v) == k for v in spec.neurons.values())
    else:
        assert spec.n_pruned == round(SPARSITY * d_mlp * ns.mlp_info(model).n_layers)
    if scope == "global":
        assert padded
    assert report["model"]["n_pruned"] == spec.n_pruned
    if kind == "llama":  # an output bias (mean ablation or refit) needs mlp_bias in the config
        assert config["mlp_bias"] == bool(spec.bias)
    assert bool(spec.bias) == (ablation == "mean")
