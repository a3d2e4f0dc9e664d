"""Ablations of pruning calibration on the default model, measured on held-out text of every domain
(:mod:`neuronscope_tl.domains`): calibration source and size, one-shot against sequential (layer-by-layer)
calibration, and the refit's damping (none, fixed, or chosen on held-out folds).

Each configuration prunes the same fraction of every layer's MLP neurons (mean ablation) and is measured with hook
simulation on the default evaluation sets: the held-out parts of news, forum and docs (in-domain for the mixed
calibration) and all of reviews and legal (out-of-domain), 12 x 512-token windows each, bf16 autocast. Prints one
JSON line per configuration as it finishes, then one summary line.

A configuration is ``CALIB:TOKENS:MODE:METHOD:REFIT[:SPARSITY[:SCOPE[:DISTILL]]]``: CALIB ``lee`` (Lee articles 0-199) or ``mix`` (news + forum +
docs, the default); MODE ``oneshot`` or ``seq``; REFIT ``none``, a damping such as ``0.01``, or ``auto`` (seq only);
SPARSITY defaults to ``--sparsity``; SCOPE is ``per_layer`` (the default) or ``owl``; DISTILL is the epochs of
distillation of the kept output weights (:mod:`neuronscope_tl.distill`, learning rate ``--distill-lr``, on
``--distill-tokens`` tokens of the calibration sources; default 0). Sequential runs calibrate in 6 layer groups under bf16 autocast, as
``neuronscope-tl prune`` does.

Usage: ``PYTHONPATH=. python benchmarks/bench_domains.py [--sparsity 0.2] [--configs CFG,CFG,...]``
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

import neuronscope_tl as ns
from neuronscope_tl import distill, domains, evaluation, recipes, selection, sequential, surgery

DEFAULT_CONFIGS = (
    "lee:8192:oneshot:wanda:none",  # the baseline: Lee-calibrated structured Wanda
    "lee:8192:oneshot:obs:0.01",  # the former recommendation
    "mix:8192:oneshot:obs:0.01",  # calibration mix
    "mix:32768:oneshot:obs:0.01",  # calibration size
    "mix:32768:oneshot:fluctuation:0.01",
    "mix:32768:seq:obs:0.01",  # sequential calibration, fixed damping
    "mix:32768:seq:obs:auto",  # sequential, damping chosen on held-out domains
    "mix:32768:seq:obs:auto:0.2:per_layer:1",  # + one epoch of distillation: the recommendation
    "mix:32768:seq:fluctuation:auto",
    "mix:32768:seq:wanda:auto",
    "mix:32768:seq:obs:auto:0.3",
    "mix:32768:seq:obs:auto:0.3:per_layer:1",  # the recommendation at 30% per layer
    "lee:8192:oneshot:wanda:none:0.3",
    "mix:131072:seq:obs:auto",  # calibration size
    "mix:32768:seq:obs:auto:0.2:owl",  # non-uniform allocation (OWL) on the recommendation
    "mix:32768:seq:obs:auto:0.3:owl",
)


def parse(cfg: str, sparsity: float) -> dict:
    """``CALIB:TOKENS:MODE:METHOD:REFIT[:SPARSITY[:SCOPE[:DISTILL]]]`` (scope: per_layer, the default, or owl)."""
    calib, tokens, mode, method, refit, *rest = cfg.split(":")
    return {
        "calib": calib,
        "tokens": int(tokens),
        "mode": mode,
        "method": method,
        "refit": None if refit == "none" else refit if refit == "auto" else float(refit),
        "sparsity": float(rest[0]) if rest else sparsity,
        "scope": rest[1] if len(rest) > 1 else "per_layer",
        "distill": int(rest[2]) if len(rest) > 2 else 0,
    }


def run_config(
    model,
    sets,
    dense,
    c: dict,
    cache: dict,
    distill_lr: float = distill.DEFAULT_DISTILL_LR,
    distill_tokens: int = recipes.DISTILL_TOKENS,
) -> dict:
    t = time.perf_counter()
    sparsity = c["sparsity"]
    sources = {"lee": ns.calibration_texts()} if c["calib"] == "lee" else domains.calibration_sources()
    if c["mode"] == "seq":
        wins = sequential.calibration_windows(model, sources, c["tokens"])
        spec = sequential.sequential_spec(
            model, wins, c["method"], sparsity, "mean", c["refit"], bf16=True, scope=c["scope"]
        ).spec
    else:
        key = (c["calib"], c["tokens"])
        if key not in cache:
            texts = ns.calibration_texts() if c["calib"] == "lee" else None
            cache.clear()  # one calibration's Gram matrices at a time
            cache[key] = selection.calibrate(model, texts, c["tokens"], with_grams=True, with_gradients=False)
        spec = selection.build_spec(model, cache[key], c["method"], sparsity, c["scope"], "mean", refit=c["refit"])
    fit_s = time.perf_counter() - t
    distilled = None
    if c["distill"]:
        t_d = time.perf_counter()
        train = recipes.distill_windows(model, calib_sources=sources, calib_tokens=c["tokens"], distill_tokens=distill_tokens)
        trained = distill.distill_spec(model, spec, train.tokens, c["distill"], lr=distill_lr, bf16=True)
        spec, distilled = trained.spec, {**trained.record(), "seconds": round(time.perf_counter() - t_d, 1)}
    widths = [spec.d_mlp - len(spec.neurons.get(l, ())) for l in range(ns.mlp_info(model).n_layers)]
    ppl = evaluation.domain_perplexities(model, sets, surgery.simulation_hooks(spec), bf16=True)
    summary = evaluation.domain_summary(ppl, dense, sets)
    return {
        **c,
        "ratios": {k: round(v, 4) for k, v in summary["ratios"].items()},
        "in_domain": round(summary["in_domain"], 4),
        "out_of_domain": round(summary["out_of_domain"], 4),
        "widest_kept": max(widths),
        "narrowest_kept": min(widths),
        "fit_s": round(fit_s, 1),
        **({"distill_lr": distill_lr, "distill_tokens": distill_tokens, "distillation": distilled} if distilled else {}),
        "total_s": round(time.perf_counter() - t, 1),
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser()
    p.add_argument("--sparsity", type=float, default=0.2)
    p.add_argument("--configs", default=",".join(DEFAULT_CONFIGS))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--distill-lr", type=float, default=distill.DEFAULT_DISTILL_LR)
    p.add_argument("--distill-tokens", type=int, default=recipes.DISTILL_TOKENS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = ns.load_model()
    sets = evaluation.domain_windows(model, domains.default_evaluation_sets())
    dense = evaluation.domain_perplexities(model, sets, bf16=True)
    out = {
        "model": ns.models.model_name(model),
        "sparsity": args.sparsity,
        "ablation": "mean",
        "dense": {k: round(v, 3) for k, v in dense.items()},
        "sets": [d.wins.texts for d in sets],
        "runs": [],
    }
    cache: dict = {}
    for cfg in args.configs.split(","):
        row = run_config(model, sets, dense, parse(cfg, args.sparsity), cache, args.distill_lr, args.distill_tokens)
        out["runs"].append(row)
        print(json.dumps(row), flush=True)
    out["threads"] = torch.get_num_threads()
    out["load_avg_1m"] = round(os.getloadavg()[0], 2)
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
