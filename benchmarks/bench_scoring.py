"""Benchmark of one-pass scoring and tail-only exact ablation on the default model. Prints ONE JSON line.

(a) ``score_all_s`` / ``score_all_peak_rss_mb``: ``score_pass`` over 2,048 Lee calibration tokens (peak RSS of
    the process, model included).
    ``bare_fwd_bwd_s``: a forward and a backward over the same tokens (same texts, one at a time) through the HF
    model with no hook attached and gradients for the input embeddings only; ``score_overhead`` = score_all_s /
    bare_fwd_bwd_s, both timed in this run.
(b) ``ablate_ours_s`` / ``ablate_naive_s``: each of 256 random neurons ablated alone over 256 tokens, with
    ``ablate_each`` and with the naive TransformerLens loop (one full ``run_with_hooks`` per neuron, clean logits
    computed once, same metric functions), timed in the same run.
(c) ``ablate_gflops``: matmul FLOPs of (b)-ours (counted with ``torch.utils.flop_counter`` on one clean forward,
    one tail layer and one unembedding, times the runs made) per second, next to ``matmul_peak_gflops``, the best
    fp32 GEMM rate of shapes like the model's measured in the same process.
Spearman: ``validate_scores`` (zero ablation, 200 lowest-scored and 200 random neurons, 256 tokens).

Usage: ``PYTHONPATH=. python benchmarks/bench_scoring.py`` (env: BENCH_THREADS, default 2; BENCH_NEURONS, default
256; BENCH_VALIDATE_N, default 200).
"""

from __future__ import annotations

import json
import os
import random
import resource
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

import neuronscope_tl as ns
from neuronscope_tl import ablation, hooks, metrics, scoring
from neuronscope_tl.texts import tokenize


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def matmul_peak_gflops(rows: int, d: int, d_mlp: int, reps: int = 10) -> float:
    best = 0.0
    for m, k, n in ((rows, d, d_mlp), (rows, d_mlp, d), (rows, d, d)):
        a, b = torch.randn(m, k), torch.randn(k, n)
        a @ b  # warm-up
        for _ in range(reps):
            t = time.perf_counter()
            a @ b
            best = max(best, 2 * m * k * n / (time.perf_counter() - t) / 1e9)
    return best


def flops(fn) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        fn()
    return counter.get_total_flops()


def naive_loop(model, ids, pairs):
    """The reference: one full forward with a TransformerLens hook per neuron."""
    with torch.no_grad():
        logp_orig = metrics.log_probs(model(ids))
        out = []
        for layer, neuron in pairs:
            logits = model.run_with_hooks(ids, fwd_hooks=[(hooks.mlp_post_name(layer), hooks.ablation_hook([neuron]))])
            logp = metrics.log_probs(logits)
            out.append(
                (float(metrics.nll_from_log_probs(logp, ids).mean()), float(metrics.kl_from_log_probs(logp_orig, logp).mean()))
            )
    return out


def bare_fwd_bwd(model, token_lists) -> float:
    """Seconds for forward + backward over ``token_lists`` with frozen weights and no hooks (the floor of scoring)."""
    hf = model.original_model
    flags = [p.requires_grad for p in hf.parameters()]
    for p in hf.parameters():
        p.requires_grad_(False)
    try:
        t = time.perf_counter()
        for ids in token_lists:
            emb = hf.get_input_embeddings()(ids[None]).detach().requires_grad_(True)
            logits = hf(inputs_embeds=emb).logits
            loss = metrics.nll_from_log_probs(metrics.log_probs(logits), ids[None]).sum()
            torch.autograd.grad(loss, emb)
        return time.perf_counter() - t
    finally:
        for p, flag in zip(hf.parameters(), flags):
            p.requires_grad_(flag)


def main() -> dict:
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    n_neurons = int(os.environ.get("BENCH_NEURONS", "256"))
    validate_n = int(os.environ.get("BENCH_VALIDATE_N", "200"))
    model = ns.load_model()
    info = ns.mlp_info(model)
    calib, evalt = ns.calibration_texts(), ns.evaluation_texts()

    t = time.perf_counter()
    scores = scoring.score_pass(model, calib, max_tokens=2048)
    score_s = time.perf_counter() - t
    rss = peak_rss_mb()
    bare_s = bare_fwd_bwd(model, scores.token_lists)

    rng = random.Random(0)
    pairs = [(rng.randrange(info.n_layers), rng.randrange(info.d_mlp)) for _ in range(n_neurons)]
    pairs = list(dict.fromkeys(pairs))
    ids = tokenize(model, evalt, max_tokens=256)[0][None]
    t = time.perf_counter()
    ours = ablation.ablate_each(model, pairs, evalt, max_tokens=256)
    ours_s = time.perf_counter() - t
    t = time.perf_counter()
    naive = naive_loop(model, ids, pairs)
    naive_s = time.perf_counter() - t
    max_diff = max(abs(r.kl - kl) for r, (_, kl) in zip(ours.itertuples(), naive))

    tail = ablation.model_tail(model)
    store: dict = {}
    with hooks.attached_hooks(model, [(f"blocks.{info.n_layers - 1}.hook_resid_pre", hooks.capture_hook(store, "r"))]):
        f_clean = flops(lambda: model(ids))
    resid = store["r"]
    f_layer = flops(lambda: ablation.run_body(tail, resid, info.n_layers - 1))
    f_head = flops(lambda: tail.head(tail.norm(resid)))
    total = f_clean + sum((info.n_layers - layer) * f_layer + f_head for layer, _ in pairs)
    peak = matmul_peak_gflops(ablation.DEFAULT_STACK * ids.shape[1], info.d_model, info.d_mlp)

    validation = scoring.validate_scores(model, None, calib, n=validate_n, max_tokens=256) if validate_n else None
    result = {
        "score_all_s": round(score_s, 2),
        "score_all_peak_rss_mb": round(rss, 1),
        "score_tokens": scores.n_tokens,
        "bare_fwd_bwd_s": round(bare_s, 2),
        "score_overhead": round(score_s / bare_s, 3),
        "ablate_neurons": len(pairs),
        "ablate_tokens": int(ids.shape[1]),
        "ablate_ours_s": round(ours_s, 2),
        "ablate_naive_s": round(naive_s, 2),
        "ablate_speedup": round(naive_s / ours_s, 2),
        "ablate_gflops": round(total / ours_s / 1e9, 1),
        "matmul_peak_gflops": round(peak, 1),
        "spearman_candidates": {k: round(v, 3) for k, v in validation.spearman_candidates.items()} if validation else None,
        "spearman_random": {k: round(v, 3) for k, v in validation.spearman_random.items()} if validation else None,
        "ablate_max_kl_diff_vs_naive": max_diff,
        "validate_tokens": validation.n_tokens if validation else None,
        "threads": torch.get_num_threads(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
