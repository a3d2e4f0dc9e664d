"""Soak run of the app: many mixed REST requests from several threads against one server on loopback.

    python benchmarks/soak.py                      # starts `neuronscope-tl serve --port 0` (default model), stops it after
    python benchmarks/soak.py --url http://127.0.0.1:7860 --pid 1234   # an app already running (RSS needs --pid)

The mix is light on purpose (short texts, few candidates; the machine is shared): weight summary, candidates,
impact, importance, batch and impact export, plus refused requests (400, 413, 422). A warm-up round of every kind
runs first (the first weight analysis alone takes seconds), then the server's RSS is read, then ``--requests``
requests are timed. Prints ONE JSON line: requests, status_counts, p50_ms, p99_ms, rss_start_mb, rss_end_mb
(and rss_growth, threads, wall_s). Exits 1 if the RSS grew by more than 10 % after warm-up or any answer was a 5xx.

A benchmark, not a CI test.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import List, Optional

import httpx

ROOT = Path(__file__).resolve().parents[1]
P = "/api/pruning"
TEXTS = ["The quick brown fox jumps over the lazy dog.", "Shares fell in early trade.", "Rain is expected on the coast."]


def mix() -> List[tuple]:
    """One round of the request mix: (method, path, json body)."""
    return [
        ("GET", "/weight-analysis", None),
        ("GET", "/candidates?threshold=5", None),
        ("POST", "/impact-analysis", {"layer_index": 3, "neuron_indices": [1, 2], "input_text": TEXTS[0]}),
        ("POST", "/impact-analysis", {"layer_index": 20, "neuron_indices": [7], "input_text": TEXTS[1]}),
        ("POST", "/neuron-importance", {"layer_index": 5, "input_texts": TEXTS[:2], "top_k": 5}),
        (
            "POST",
            "/batch-analysis",
            {
                "pruning_candidates": [{"layer_index": 2, "neuron_index": 3}, {"layer_index": 9, "neuron_index": 4}],
                "input_texts": TEXTS[2:],
                "batch_size": 1,
            },
        ),
        ("POST", "/export", {"type": "impact"}),
        ("POST", "/impact-analysis", {"layer_index": 999, "neuron_indices": [0], "input_text": "x"}),  # 400
        ("POST", "/neuron-importance", {"layer_index": 0, "input_texts": ["a"] * 17}),  # 413: 17 texts
        ("POST", "/impact-analysis", {"layer_index": "zero"}),  # 422
    ]


def rss_mb(pid: Optional[int]) -> Optional[float]:
    if pid is None:
        return None
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return None


def start_server(model: Optional[str]):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "neuronscope_tl.cli", "serve", "--port", "0"] + (["--model", model] if model else [])
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env, cwd=ROOT)
    line = proc.stdout.readline()  # the banner; the socket is bound by then
    if not line.startswith("neuronscope-tl: serving on "):
        proc.kill()
        raise SystemExit(f"the server did not start: {line!r}")
    url = line.split()[3]
    deadline = time.monotonic() + 300
    while True:  # the banner comes before uvicorn accepts; wait until it answers
        try:
            httpx.get(url + P + "/candidates?threshold=1", timeout=120)
            return proc, url
        except httpx.TransportError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise SystemExit("the server never answered")
            time.sleep(0.5)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", help="an app already running (default: start one on 127.0.0.1)")
    ap.add_argument("--pid", type=int, help="the running app's process id, for RSS (with --url)")
    ap.add_argument("--model", help="model for the app this script starts (default: the embedded default)")
    ap.add_argument("--requests", type=int, default=600, help="timed requests after warm-up (default 600)")
    ap.add_argument("--threads", type=int, default=4, help="client threads (default 4)")
    ap.add_argument("--warmup-rounds", type=int, default=3, help="rounds of the whole mix before RSS is read (default 3)")
    args = ap.parse_args(argv)
    if args.requests < 1 or args.threads < 1:
        ap.error("--requests and --threads must be >= 1")

    proc = None
    if args.url:
        url, pid = args.url.rstrip("/"), args.pid
    else:
        proc, url = start_server(args.model)
        pid = proc.pid
    try:
        local = threading.local()

        def client() -> httpx.Client:
            if not hasattr(local, "c"):
                local.c = httpx.Client(base_url=url + P, timeout=300)
            return local.c

        def send(job):
            method, path, body = job
            t = time.perf_counter()
            r = client().request(method, path, json=body)
            r.read()
            return r.status_code, (time.perf_counter() - t) * 1000.0

        for job in mix() * args.warmup_rounds:
            send(job)
        rss_start = rss_mb(pid)
        jobs = list(itertools.islice(itertools.cycle(mix()), args.requests))
        t0 = time.perf_counter()
        with ThreadPoolExecutor(max_workers=args.threads) as pool:
            results = list(pool.map(send, jobs))
        wall = time.perf_counter() - t0
        rss_end = rss_mb(pid)
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()

    lat = sorted(ms for _, ms in results)
    pct = lambda q: round(lat[min(len(lat) - 1, int(q * len(lat)))], 1)
    counts = Counter(str(s) for s, _ in results)
    growth = (rss_end - rss_start) / rss_start if rss_start and rss_end else None
    print(
        json.dumps(
            {
                "requests": len(results),
                "status_counts": dict(sorted(counts.items())),
                "p50_ms": pct(0.50),
                "p99_ms": pct(0.99),
                "rss_start_mb": round(rss_start, 1) if rss_start else None,
                "rss_end_mb": round(rss_end, 1) if rss_end else None,
                "rss_growth": round(growth, 4) if growth is not None else None,
                "threads": args.threads,
                "wall_s": round(wall, 1),
            }
        )
    )
    bad = any(int(s) >= 500 for s in counts) or (growth is not None and growth > 0.10)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
