"""Benchmark: the default ``neuronscope-tl prune`` on the default model, per evaluation domain, against the
Lee-calibrated structured-Wanda baseline, each physically pruned and reloaded in plain transformers.

For each sparsity (default 20% and 30% of every layer's MLP neurons):

* ``default``: :func:`neuronscope_tl.pipelines.prune_and_save` with no method, i.e. the recommended recipe
  (:data:`neuronscope_tl.recipes.RECOMMENDED`) on the default calibration mix;
* ``lee_wanda``: structured Wanda with mean ablation, calibrated one-shot on 8,192 tokens of Lee articles 0-199.

Each pruned directory is loaded with ``AutoModelForCausalLM.from_pretrained`` and every evaluation set (held-out
news, forum and docs; all of reviews and legal; 12 x 512-token windows each) is scored with transformers' own
``labels=`` loss, fp32: the ratio to the dense model's loss on the same windows is what the table shows. Prints one
JSON line.

    PYTHONPATH=$PWD python benchmarks/bench_curves.py [--sparsities 0.2,0.3] [--threads 2]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import tempfile
import time

import torch


def hf_perplexities(hf, sets) -> dict:
    """Perplexity of a plain transformers model on each set's windows, from its own ``labels=`` loss."""
    out = {}
    with torch.no_grad():
        for d in sets:
            total, count = 0.0, 0
            for ids in d.wins.tokens:
                n = ids.numel() - 1
                total += float(hf(ids[None], labels=ids[None]).loss) * n
                count += n
            out[d.name] = math.exp(total / count)
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--sparsities", default="0.2,0.3")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    import neuronscope_tl as ns
    from transformers import AutoModelForCausalLM

    from neuronscope_tl import domains, evaluation, pipelines, recipes
    from neuronscope_tl.surgery import fresh_hf_copy

    model = ns.load_model()
    sets = evaluation.domain_windows(model, domains.default_evaluation_sets())
    dense = hf_perplexities(fresh_hf_copy(model), sets)
    out = {
        "model": ns.models.model_name(model),
        "recommended": dataclasses.asdict(recipes.RECOMMENDED),
        "dense": {k: round(v, 3) for k, v in dense.items()},
        "sets": [d.wins.texts for d in sets],
        "runs": [],
    }
    runs = {
        "default": {},
        "lee_wanda": {"method": "wanda", "ablation": "mean", "calib_texts": ns.calibration_texts(), "calib_tokens": 8192},
    }
    for sparsity in [float(s) for s in args.sparsities.split(",")]:
        for name, kwargs in runs.items():
            with tempfile.TemporaryDirectory() as tmp:
                t = time.perf_counter()
                report = pipelines.prune_and_save(model, sparsity, f"{tmp}/pruned", measure_latency=False, **kwargs)
                prune_s = time.perf_counter() - t
                hf = AutoModelForCausalLM.from_pretrained(f"{tmp}/pruned").eval()
                ppl = hf_perplexities(hf, sets)
            ratios = {k: ppl[k] / dense[k] for k in ppl}
            summary = evaluation.domain_summary(ppl, dense, sets)
            row = {
                "run": name,
                "sparsity": sparsity,
                "recipe": report.recipe,
                "calibration": report.calibration,
                "ratios": {k: round(v, 4) for k, v in ratios.items()},
                "in_domain": round(summary["in_domain"], 4),
                "out_of_domain": round(summary["out_of_domain"], 4),
                "all": round(summary["all"], 4),
                "d_mlp_after": report.model.d_mlp_after,
                "prune_s": round(prune_s, 1),
            }
            out["runs"].append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    out["threads"] = torch.get_num_threads()
    out["load_avg_1m"] = round(os.getloadavg()[0], 2)
    print(json.dumps(out, default=str))
    return out


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
