"""Latency of the app's Live pruning tab on the default model: seconds from a slider release to the updated numbers
and texts (``AppState.live``: selection, per-domain perplexity on the fixed subset, pruned continuation), after the
one-off warm-up (calibration, subset windows, dense numbers and continuation).

Prints one JSON line: the warm-up time, every slider move (a new sparsity, then a revisit) with its breakdown, the
median and maximum per method, the machine's load and the torch threads. Usage::

    python benchmarks/bench_live.py [--methods obs,wanda] [--sparsities 0.1,0.2,0.3,0.5] [--threads 2]
                                    [--calib-tokens 8192]

``--calib-tokens`` below the app's default shortens only the one-off warm-up: a slider move reads the kept scores
(and Gram matrices), whose size does not depend on the number of calibration tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

import neuronscope_tl as ns
from neuronscope_tl.app.live import DEFAULT_PROMPT
from neuronscope_tl.app.state import AppSettings, AppState
from neuronscope_tl.curves import resolve_method


def main() -> None:
    parser = argparse.ArgumentParser()
    recommended, rec_ablation = resolve_method(None, None)
    parser.add_argument("--methods", default=f"wanda,{recommended}")
    parser.add_argument("--sparsities", default="0.1,0.2,0.3,0.5")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--calib-tokens", type=int, default=None, help="default: the app's (the CLI's) calibration size")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sparsities = [float(x) for x in args.sparsities.split(",")]
    load0 = os.getloadavg()[0]
    t = time.perf_counter()
    settings = AppSettings(max_calib_tokens=args.calib_tokens) if args.calib_tokens else AppSettings()
    state = AppState(ns.load_model(), settings)
    load_s = time.perf_counter() - t
    out = {
        "model": state.model_name,
        "threads": args.threads,
        "load_s": load_s,
        "calib_tokens": state.default_calib_tokens,
        "subset": {
            "window": state.live_engine.window,
            "windows_per_domain": state.live_engine.windows_per_domain,
            "new_tokens": state.live_engine.new_tokens,
        },
        "methods": {},
    }
    for method in args.methods.split(","):
        ablation = rec_ablation if method == recommended else "zero"
        t = time.perf_counter()
        with state.model_work():
            state.live_engine.warm(method, DEFAULT_PROMPT, "per_layer", ablation)
        warm_s = time.perf_counter() - t
        moves = []
        for s in sparsities + sparsities[:1]:  # each new sparsity, then one revisit
            t = time.perf_counter()
            r = state.live(method, "per_layer", s, ablation, DEFAULT_PROMPT)
            moves.append(
                {
                    "sparsity": s,
                    "seconds": time.perf_counter() - t,
                    **{k: round(v, 3) for k, v in r.timings.items()},
                    "geometric_mean_x_dense": r.geometric_mean,
                    "pruned_text": r.pruned_text,
                }
            )
            print(json.dumps({"method": method, "warm_s": warm_s, **moves[-1]}), file=sys.stderr, flush=True)  # progress
        secs = [m["seconds"] for m in moves]
        out["methods"][method] = {
            "ablation": ablation,
            "warm_s": warm_s,
            "median_s": statistics.median(secs),
            "max_s": max(secs),
            "moves": moves,
        }
    out["dense_text"] = state.live_engine.dense_text(DEFAULT_PROMPT)
    out["load_average"] = {"start": load0, "end": os.getloadavg()[0], "cpus": os.cpu_count()}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
