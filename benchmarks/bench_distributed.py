"""Benchmark of data-parallel scoring under torchrun on the default model. Prints ONE JSON line.

In the same run, the scoring pass (``scoring.accumulate_scores``: one forward and one backward per text, every
layer) over the first ``--tokens`` Lee calibration tokens, cut into ``--piece``-token texts:

* ``one_proc_tok_s``: one process with 2 torch threads;
* ``two_proc_tok_s``: ``torchrun --standalone --nproc-per-node 2``, one thread each (gloo), the same tokens;
  ``speedup`` = two / one;
* ``collective_s``: per rank, seconds inside collectives during the timed pass (the end-of-pass agreement, the
  gather of the score state, waiting for the slower rank included); ``state_mb``: the pickled score state each
  rank sends in the gather; ``gram_mb_per_layer``: the fp32 Gram sum one layer's ``all_reduce`` carries.

Each process loads the model and runs a short warm-up pass (which also starts the process group) before the timed
pass; tokens/s counts the pass alone, between two barriers. ``load_avg_1m`` says how busy the machine was.

Usage: ``python benchmarks/bench_distributed.py`` (``--tokens``, default 1024; ``--piece``, default 128).
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import subprocess
import sys
import time

WORKER = "--worker"


def worker(tokens: int, piece: int, threads: int) -> None:
    """Time one scoring pass; rank 0 (or the only process) prints its measurements as JSON."""
    import torch

    torch.set_num_threads(threads)
    import neuronscope_tl as ns
    from neuronscope_tl import distributed, scoring, texts

    model = ns.load_model()
    token_lists = [t for ids in texts.calibration_tokens(model, texts.calibration_texts(), tokens) for t in ids.split(piece)]
    scoring.accumulate_scores(model, token_lists[:2])  # warm-up; under torchrun it also starts the process group
    if distributed.active():
        torch.distributed.barrier()
    before = distributed.collective_seconds()
    t0 = time.perf_counter()
    acc = scoring.accumulate_scores(model, token_lists)
    if distributed.active():
        torch.distributed.barrier()
    seconds = time.perf_counter() - t0
    here = distributed.current()
    mine = {"collective_s": round(distributed.collective_seconds() - before, 3)}
    every = [None] * here.world_size
    if distributed.active():
        torch.distributed.all_gather_object(every, mine)
    else:
        every = [mine]
    if here.rank == 0:
        d = acc.d_mlp
        print(
            json.dumps(
                {
                    "tokens": sum(int(t.numel()) for t in token_lists),
                    "seconds": round(seconds, 3),
                    "collective_s": [e["collective_s"] for e in every],
                    "state_mb": round(len(pickle.dumps(acc)) / 1e6, 2),
                    "gram_mb_per_layer": round((d + 1) ** 2 * 4 / 1e6, 2),
                }
            ),
            flush=True,
        )
    distributed.stop()


def run(cmd, threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--piece", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(WORKER, action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.tokens, args.piece, args.threads)
        return
    me = [os.path.abspath(__file__), WORKER, "--tokens", str(args.tokens), "--piece", str(args.piece)]
    t0 = time.perf_counter()
    one = run([sys.executable, *me, "--threads", "2"], threads=2)
    two = run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *me, "--threads", "1"], threads=1
    )
    assert one["tokens"] == two["tokens"]
    one_tok_s, two_tok_s = one["tokens"] / one["seconds"], two["tokens"] / two["seconds"]
    print(
        json.dumps(
            {
                "model": "SmolLM2-135M-Instruct",
                "tokens": one["tokens"],
                "piece": args.piece,
                "one_proc_threads": 2,
                "one_proc_s": one["seconds"],
                "one_proc_tok_s": round(one_tok_s, 1),
                "two_proc_threads": 1,
                "two_proc_s": two["seconds"],
                "two_proc_tok_s": round(two_tok_s, 1),
                "speedup": round(two_tok_s / one_tok_s, 3),
                "collective_s": two["collective_s"],
                "state_mb": two["state_mb"],
                "gram_mb_per_layer": two["gram_mb_per_layer"],
                "wall_s": round(time.perf_counter() - t0, 1),
                "load_avg_1m": round(os.getloadavg()[0], 2),
            }
        )
    )


if __name__ == "__main__":
    main()
