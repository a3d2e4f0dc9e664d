"""Benchmark: the full pruning curve on the default model and protocol, a search, and the 20% pruned model.

Prints one JSON line: the curve table (every method at 10/20/30/50% per-layer; zero ablation for all, and mean
ablation for the methods built around it: FLAP-style fluctuation and obs), its wall time, the search result, and
the size and latency change of the per-layer 20% pruned model of the recommended method.

Protocol (the default): 8,192 calibration tokens of Lee articles 0-199; every third 512-token window of Lee
articles 200-299; bf16 autocast evaluation when dense bf16 is within 0.5% of fp32.

    PYTHONPATH=$PWD python benchmarks/bench_curves.py [--threads 2] [--no-search]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time

import pandas as pd
import torch


def main(argv=None) -> dict:
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-search", action="store_true")
    p.add_argument("--budget", type=float, default=0.25, help="search: allowed relative perplexity increase")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    import neuronscope_tl as ns
    from neuronscope_tl import curves, evaluation, scores, search, selection, surgery

    t0 = time.perf_counter()
    model = ns.load_model()
    t_load = time.perf_counter() - t0
    t1 = time.perf_counter()
    cal = selection.calibrate(model)
    t_cal = time.perf_counter() - t1
    def log(row):
        print(json.dumps({"run": row, "elapsed_s": round(time.perf_counter() - t1, 1)}), file=sys.stderr, flush=True)

    print(json.dumps({"calibration_s": t_cal}), file=sys.stderr, flush=True)
    mean = curves.prune_curve(model, ["obs", "fluctuation", "wanda"], ablation="mean", calibration=cal, on_run=log)
    precision = "bf16" if mean.dense_perplexity == mean.dense_bf16 else "fp32"
    zero = curves.prune_curve(model, scores.METHODS, ablation="zero", calibration=cal, precision=precision, on_run=log)
    t_curve = time.perf_counter() - t1
    table = pd.concat([mean.table, zero.table], ignore_index=True)
    rec = curves.recommend(table)

    out = {
        "model": zero.protocol["model"],
        "protocol": zero.protocol,
        "dense_perplexity": mean.dense_perplexity,
        "dense_fp32": mean.dense_fp32,
        "dense_bf16": mean.dense_bf16,
        "bf16_rel_diff": None if mean.dense_bf16 is None else mean.dense_bf16 / mean.dense_fp32 - 1,
        "table": [
            {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}
            for r in table[["method", "ablation", "sparsity", "perplexity", "ratio", "perplexity_min", "perplexity_max", "n_seeds"]].to_dict("records")
        ],
        "recommended": rec,
        "timings_s": {"load": t_load, "calibration": t_cal, "curve_total_incl_calibration": t_curve},
        "threads": args.threads,
    }

    if not args.no_search:
        t = time.perf_counter()
        s = search.search_pruning(model, args.budget, rec["method"], rec["ablation"], calibration=cal)
        out["search"] = {"loss_budget": s.loss_budget, "method": s.method, "ablation": s.ablation, "sparsity": s.sparsity,
                         "perplexity": s.perplexity, "ratio": s.perplexity / s.dense_perplexity,
                         "steps": s.steps.to_dict("records"), "time_s": time.perf_counter() - t}

    spec = selection.build_spec(model, cal, rec["method"], 0.2, "per_layer", rec["ablation"])
    with tempfile.TemporaryDirectory() as tmp:
        r = surgery.prune_model(model, None, rec["ablation"], out=f"{tmp}/pruned", spec=spec)
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(r.out).eval()
        ids = evaluation.eval_windows(model, None, 512, 3).tokens[0][None]
        with torch.no_grad():
            plain = hf(ids).logits
        from neuronscope_tl.hooks import attached_hooks

        with attached_hooks(model, surgery.simulation_hooks(spec)), torch.no_grad():
            sim = model(ids)
    out["pruned_20pct"] = {
        **{k: v for k, v in r.to_dict().items() if k != "out"},
        "mlp_parameter_reduction": 1 - r.mlp_parameters_after / r.mlp_parameters_before,
        "parameter_reduction": 1 - r.parameters_after / r.parameters_before,
        "file_size_reduction": 1 - r.file_bytes_after / r.file_bytes_before,
        "latency_reduction": 1 - r.latency_s_after / r.latency_s_before,
        "max_abs_logit_diff_plain_vs_simulated": float((plain - sim).abs().max()),
    }
    out["timings_s"]["total"] = time.perf_counter() - t0
    print(json.dumps(out, default=float))
    return out


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
