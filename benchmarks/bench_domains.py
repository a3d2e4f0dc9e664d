"""Per-domain pruning quality on the default model: calibration source x method, measured on held-out text of
every domain (:mod:`neuronscope_tl.domains`). Prints ONE JSON line.

For each calibration (``lee``: Lee articles 0-199; ``mix``: news + forum + docs interleaved) and token budget, one
:func:`~neuronscope_tl.curves.prune_curve` at the given sparsities over the default evaluation sets (held-out parts
of news, forum and docs; all of reviews and legal), 12 x 512-token windows each, bf16 autocast when within 0.5% of
fp32.

Usage: ``PYTHONPATH=. python benchmarks/bench_domains.py`` (env: BENCH_THREADS=2, BENCH_METHODS=obs,wanda,
BENCH_SPARSITIES=0.2, BENCH_CALIBS=lee:8192,mix:8192, BENCH_ABLATION=mean).
"""

from __future__ import annotations

import json
import os
import time

import torch

import neuronscope_tl as ns
from neuronscope_tl import curves, domains, selection


def main() -> dict:
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    methods = os.environ.get("BENCH_METHODS", "obs,wanda").split(",")
    sparsities = [float(x) for x in os.environ.get("BENCH_SPARSITIES", "0.2").split(",")]
    calibs = [c.split(":") for c in os.environ.get("BENCH_CALIBS", "lee:8192,mix:8192").split(",")]
    ablation = os.environ.get("BENCH_ABLATION", "mean")
    model = ns.load_model()
    sets = domains.default_evaluation_sets()
    texts = {"lee": ns.calibration_texts(), "mix": domains.mixed_calibration_texts()}
    out = {"model": ns.models.model_name(model), "ablation": ablation, "runs": [], "domains": None}
    for name, tokens in calibs:
        t = time.perf_counter()
        cal = selection.calibrate(model, texts[name], int(tokens), with_grams=any(ns.scores.get(m).needs_grams for m in methods))
        cal_s = time.perf_counter() - t
        res = curves.prune_curve(model, methods, sparsities, "per_layer", ablation, calibration=cal, domains=sets)
        out["domains"] = res.protocol["domains"]
        for row in res.table.itertuples():
            per = res.domains[(res.domains.method == row.method) & (res.domains.sparsity == row.sparsity)]
            out["runs"].append({
                "calibration": name, "calib_tokens": int(tokens), "method": row.method, "sparsity": row.sparsity,
                "ratio_in_domain": round(row.ratio_in_domain, 4), "ratio_out_of_domain": round(row.ratio_out_of_domain, 4),
                "ratios": {r.domain: round(r.ratio, 4) for r in per.itertuples()},
            })
        out.setdefault("dense", {r.domain: round(r.dense, 3) for r in res.domains.drop_duplicates("domain").itertuples()})
        out.setdefault("timings_s", {})[f"{name}:{tokens}"] = {"calibration": round(cal_s, 1), "curve": round(res.timings["total_s"], 1)}
        print(json.dumps(out["runs"][-len(res.table):]), flush=True)
    out["threads"] = torch.get_num_threads()
    out["load_avg_1m"] = round(os.getloadavg()[0], 2)
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
