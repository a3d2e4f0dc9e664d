"""Data-parallel and neuron-parallel passes under torch.distributed (gloo, two processes on this machine).

Two processes, started with torch.multiprocessing's spawn context (and once with ``torchrun``), compute every
distributed pass on a tiny random model; their results are compared with one process computing the same passes
(no ``WORLD_SIZE``). Each activation is computed in the same batch in both runs, so values that are not summed
(counts, maxima, top contexts, exact ablations) are compared exactly, and floating sums to a bound derived from
the number of partial sums whose order changes. Fault cases: a rank that raises, a rank that is killed, a rank that
hangs past the collective timeout, and bad input refused by every rank before the process group starts.
"""

from __future__ import annotations

import os
import pickle
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.multiprocessing as mp

import neuronscope_tl as ns
from neuronscope_tl import ablation, activations, cli, distill, distributed, engine, evaluation, scoring, sequential

pytestmark = pytest.mark.usefixtures("one_torch_thread")

WORLD = 2
TEXTS = [
    "The council met on Tuesday to discuss the new budget for schools and roads.",
    "Rain is expected across the coast.",
    "Shares fell in early trade after the bank cut its forecast for the year.",
    "A spokesman said the talks would resume next week in Geneva.",
    "Police closed the highway for several hours.",
    "The minister flew to Jakarta on Monday for a two-day visit with officials from the region.",
    "Fire crews worked through the night.",
]
PAIRS = [(0, 1), (2, 5), (1, 3), (0, 7), (2, 0), (1, 40), (0, 2)]
F32 = 2.0**-24
F64 = 2.0**-53


# ---------------------------------------------------------------------------------------------- launching ranks


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(rank: int, port: int, timeout_s: float = 60.0) -> dict:
    return {
        "RANK": str(rank),
        "LOCAL_RANK": str(rank),
        "WORLD_SIZE": str(WORLD),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        distributed.TIMEOUT_ENV: str(timeout_s),
    }


def _entry(rank: int, port: int, timeout_s: float, tmpdir: str, barrier, target, args) -> None:
    os.environ.update(rank_env(rank, port, timeout_s), TMPDIR=tmpdir)
    tempfile.tempdir = tmpdir  # the imports may have read TMPDIR already
    torch.set_num_threads(1)
    barrier.wait()  # start together, so that the collective timeout measures waiting, not start-up
    sys.exit(target(rank, *args) or 0)


def launch(target, *args, tmpdir: Path, timeout_s: float = 300.0, wait_s: float = 600.0) -> list:
    """Run ``target(rank, *args)`` in WORLD spawned processes with their temporary files in ``tmpdir``; their exit
    codes (an int ``target`` returns is the exit code)."""
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(WORLD)
    port = free_port()
    tmpdir.mkdir(exist_ok=True)
    procs = [ctx.Process(target=_entry, args=(r, port, timeout_s, str(tmpdir), barrier, target, args)) for r in range(WORLD)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + wait_s
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    return [p.exitcode for p in procs]


# ---------------------------------------------------------------------------------------------- the passes


def gram_state(model):
    acc = activations.GramAccumulator([0, 1, 2], ns.models.mlp_info(model).d_mlp)
    engine.run(model, ns.texts.tokenize(model, TEXTS), [acc], batch_size=2, by_length=False)
    return {"sums": {l: s.clone() for l, s in acc.sums.items()}, "count": acc.count}


def stats_state(acc: activations.NeuronAccumulator) -> dict:
    return {k: getattr(acc, k).clone() for k in ("count", "mean", "m2", "sum_abs", "sum_sq", "active", "max")}


def all_passes(model_dir: str) -> dict:
    """Every distributed pass on the tiny model, as plain data."""
    model = ns.load_model(model_dir)
    score = scoring.score_pass(model, TEXTS, batch_size=3, top_k_contexts=4)
    acc = score.accumulator
    ppl = evaluation.evaluate_perplexity(model, TEXTS, window=16)
    return {
        "stats": stats_state(activations.stream_activations(model, TEXTS, batch_size=3, progress=False)),
        "importance": ns.neuron_importance(
            model, TEXTS, layers=[0, 2], batch_size=2, active_threshold=0.05, progress=False
        ).table,
        "score_table": score.table,
        "score_stats": stats_state(acc.stats),
        "score_sums": {k: getattr(acc, k).clone() for k in ("sum_grad", "sum_grad_act", "top_value", "top_text", "top_pos")},
        "score_counts": (acc.n_targets, acc.n_texts),
        "grams": gram_state(model),
        "perplexity": (ppl.perplexity, ppl.mean_nll, ppl.n_tokens, ppl.n_windows),
        "ablate": ablation.ablate_each(model, PAIRS, TEXTS[:3], "mean", calib_texts=TEXTS, stack=2),
        "validate": scoring.validate_scores(model, None, TEXTS[:3], n=3, scores=["wanda", "rms"], max_tokens=48).measured,
        "sequential": sequential_state(model),
        "distill": distill_state(model),
    }


def distill_state(model) -> dict:
    """Distillation of a sequential spec on 5 windows, 2 a step (one per rank; in the last step one rank has none
    and joins the gradient sum with zeros), as plain data."""
    windows = sequential.calibration_windows(model, {"a": TEXTS[:4], "b": TEXTS[4:]}, 48, 8)
    spec = sequential.sequential_spec(model, windows, "obs", 0.3, "mean", 0.05, batch_size=2).spec
    res = distill.distill_spec(model, spec, windows.tokens[:5], 1, lr=1e-2, batch_size=2, bf16=False)
    return {"losses": res.losses, "delta_out": res.spec.delta_out, "bias": res.spec.bias}


def sequential_state(model) -> dict:
    """Sequential calibration (two folds, refit damping chosen on them) with OWL counts, as plain data."""
    windows = sequential.calibration_windows(model, {"a": TEXTS[:4], "b": TEXTS[4:]}, 96, 8)
    res = sequential.sequential_spec(model, windows, "obs", 0.3, "mean", "auto", batch_size=2, scope="owl")
    return {"neurons": res.spec.neurons, "damp": res.damp, "delta_out": res.spec.delta_out, "bias": res.spec.bias}


def passes_rank(rank: int, model_dir: str, out: str) -> int:
    with open(Path(out) / f"rank{rank}.pkl", "wb") as fh:
        pickle.dump(all_passes(model_dir), fh)
    distributed.stop()
    return 0


@pytest.fixture(scope="module")
def two_and_one(tiny_dirs, tmp_path_factory):
    """(results of rank 0, results of rank 1, results of one process) on the tiny Llama model."""
    out = tmp_path_factory.mktemp("ranks")
    codes = launch(passes_rank, tiny_dirs["llama"], str(out), tmpdir=out / "tmp")
    assert codes == [0, 0]
    ranks = [pickle.loads((out / f"rank{r}.pkl").read_bytes()) for r in range(WORLD)]
    assert not distributed.active()
    return ranks[0], ranks[1], all_passes(tiny_dirs["llama"])


def assert_same(a, b) -> None:
    """Bit for bit: tensors, tables and tuples."""
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, pd.DataFrame):
        pd.testing.assert_frame_equal(a, b, check_exact=True)
    else:
        assert a == b


def test_ranks_hold_the_same_result(two_and_one):
    """Every rank ends every pass with the same bits, so later decisions (selections, precision) agree."""
    rank0, rank1, _ = two_and_one
    assert_same(rank0, rank1)


def check_stats(two: dict, one: dict, n_batches: int) -> None:
    """Counts, active counts and maxima exactly; float64 sums over at most ``n_batches`` batch partial sums whose
    order changes: |difference| <= 2 * n_batches * 2^-53 * (sum of the magnitudes), with sum_sq bounding M2's."""
    for key in ("count", "active", "max"):
        assert torch.equal(two[key], one[key]), key
    count = one["count"][:, None]
    bound = lambda scale: 2 * n_batches * F64 * scale
    assert ((two["sum_abs"] - one["sum_abs"]).abs() <= bound(one["sum_abs"])).all()
    assert ((two["sum_sq"] - one["sum_sq"]).abs() <= bound(one["sum_sq"])).all()
    assert ((two["mean"] - one["mean"]).abs() <= 4 * bound(one["sum_abs"] / count)).all()
    assert ((two["m2"] - one["m2"]).abs() <= 8 * bound(one["sum_sq"])).all()


def test_statistics_and_importance(two_and_one):
    two, _, one = two_and_one
    check_stats(two["stats"], one["stats"], n_batches=len(TEXTS))
    a, b = two["importance"], one["importance"]
    assert a[["layer", "neuron", "label", "frac_active", "max", "w_out_norm"]].equals(
        b[["layer", "neuron", "label", "frac_active", "max", "w_out_norm"]]
    )
    for col in ("mean", "mean_abs", "var", "rms", "importance"):
        np.testing.assert_allclose(a[col], b[col], rtol=1e-12, atol=0, err_msg=col)


def test_scores_counts_and_top_contexts(two_and_one):
    two, _, one = two_and_one
    check_stats(two["score_stats"], one["score_stats"], n_batches=len(TEXTS))
    assert two["score_counts"] == one["score_counts"] and one["score_counts"][1] == len(TEXTS)
    for key in ("top_value", "top_text", "top_pos"):
        assert torch.equal(two["score_sums"][key], one["score_sums"][key]), key
    # gradient sums: float32 products summed in float64 per batch, then over the batches in another order
    for key in ("sum_grad", "sum_grad_act"):
        diff = (two["score_sums"][key] - one["score_sums"][key]).abs()
        assert diff.max() <= 2 * len(TEXTS) * F64 * one["score_sums"][key].abs().max() * 1e3, key
    a, b = two["score_table"], one["score_table"]
    assert list(a.columns) == list(b.columns)
    for col in a.columns:
        if a[col].dtype.kind in "iuOb":
            assert a[col].equals(b[col]), col
        else:
            np.testing.assert_allclose(a[col], b[col], rtol=1e-6, atol=1e-12 * np.nanmax(np.abs(b[col])), err_msg=col)


def test_grams(two_and_one):
    """fp32 Gram sums: the same per-batch products, added over 4 batches in another order:
    |difference| <= 2 * 4 * 2^-24 * sqrt(G_ii G_jj) (Cauchy-Schwarz bounds the sum of |a_i a_j|); 4.8e-7 <= 1e-6."""
    two, _, one = two_and_one
    n_batches = -(-len(TEXTS) // 2)
    assert 2 * n_batches * F32 <= 1e-6
    assert two["grams"]["count"] == one["grams"]["count"]
    for layer, g1 in one["grams"]["sums"].items():
        g2 = two["grams"]["sums"][layer]
        d = g1.diagonal().double()
        bound = 2 * n_batches * F32 * (d[:, None] * d[None, :]).sqrt()
        assert ((g2.double() - g1.double()).abs() <= bound).all(), layer


def test_sequential_calibration(two_and_one):
    """Sequential calibration over shared windows selects the same neurons with the same damping on both ranks and
    as one process. The refit differs only by the order of float64 Gram sums (relative changes near 1e-16, far
    below fp32 after the damped solve), then is rounded to fp32 once: at most one fp32 rounding of each entry,
    bounded by 2^-24 of the largest entry (twice that as the bound)."""
    two, _, one = two_and_one
    assert two["sequential"]["neurons"] == one["sequential"]["neurons"]
    assert len({len(v) for v in one["sequential"]["neurons"].values()}) > 1  # OWL counts differ per layer
    assert two["sequential"]["damp"] == one["sequential"]["damp"]
    for key in ("delta_out", "bias"):
        for layer, t1 in one["sequential"][key].items():
            t2 = two["sequential"][key][layer]
            assert (t2 - t1).abs().max() <= 2 * F32 * t1.abs().max()


def test_distillation(two_and_one):
    """Each rank trains on its window of every step and the gradients are summed before the step, so the ranks
    hold the same parameters (test_ranks_hold_the_same_result) and follow one process's training: the loss of
    each step's whole batch agrees to fp32 reduction order (the summed gradient differs from one batched backward
    in the order of its fp32 sums, and Adam's first steps move each entry by about the learning rate whatever the
    gradient's size, which limits what a parameter comparison could show)."""
    two, _, one = two_and_one
    assert len(one["distill"]["losses"]) == 3 and min(one["distill"]["losses"]) > 0
    np.testing.assert_allclose(two["distill"]["losses"], one["distill"]["losses"], rtol=1e-4, atol=0)


def test_perplexity(two_and_one):
    two, _, one = two_and_one
    assert two["perplexity"][2:] == one["perplexity"][2:]
    np.testing.assert_allclose(two["perplexity"][:2], one["perplexity"][:2], rtol=4 * one["perplexity"][3] * F64 * 10)


def test_ablate_each_and_validation(two_and_one):
    """Every ablation runs in the same stack as in one process and each row is filled by one rank: the tables are
    the same bits, in the given order."""
    two, _, one = two_and_one
    pd.testing.assert_frame_equal(two["ablate"], one["ablate"], check_exact=True)
    assert list(zip(two["ablate"]["layer"], two["ablate"]["neuron"])) == PAIRS
    pd.testing.assert_frame_equal(two["validate"], one["validate"], check_exact=False, rtol=1e-6)


# ---------------------------------------------------------------------------------------------- the command line


def score_args(model_dir: str, texts_file: str, out: str) -> list:
    return [
        "score",
        "--model",
        model_dir,
        "--calib-texts",
        texts_file,
        "--out",
        out,
        "--max-tokens",
        "200",
        "--validate-n",
        "3",
        "--validate-tokens",
        "48",
        "--scores",
        "wanda,rms",
        "--top-k-contexts",
        "3",
    ]


@pytest.fixture
def texts_file(tmp_path) -> str:
    path = tmp_path / "texts.txt"
    path.write_text("\n".join(TEXTS) + "\n")
    return str(path)


def read_outputs(out: Path) -> dict:
    return {name: pd.read_csv(out / name) for name in ("scores.csv", "top_contexts.csv", "validation_measured.csv")}


def test_torchrun_score_command_equals_one_process(tiny_dirs, texts_file, tmp_path):
    """``torchrun --standalone --nproc-per-node 2 -m neuronscope_tl score`` writes the files one process writes:
    identical except for floating sums (scores relative 1e-6, as the pass tests bound them far tighter); the other
    rank's scratch output directory is gone."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = {**os.environ, "TMPDIR": str(scratch), "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        str(WORLD),
        "-m",
        "neuronscope_tl",
        *score_args(tiny_dirs["llama"], texts_file, str(tmp_path / "two")),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert cli.main(score_args(tiny_dirs["llama"], texts_file, str(tmp_path / "one"))) == 0
    two, one = read_outputs(tmp_path / "two"), read_outputs(tmp_path / "one")
    pd.testing.assert_frame_equal(two["top_contexts.csv"], one["top_contexts.csv"], check_exact=True)
    pd.testing.assert_frame_equal(two["validation_measured.csv"], one["validation_measured.csv"], check_exact=False, rtol=1e-6)
    pd.testing.assert_frame_equal(two["scores.csv"], one["scores.csv"], check_exact=False, rtol=1e-6)
    assert not list(scratch.glob("neuronscope-rank*"))


def fault_rank(rank: int, model_dir: str, texts_file: str, out: str, fault: str) -> int:
    """The score command on every rank; rank 1 raises, or is killed, in the middle of its scoring pass."""
    sys.stderr = open(Path(out).parent / f"stderr{rank}.txt", "w", buffering=1)
    if rank == 1:

        def faulty(self, batch):
            if fault == "raise":
                raise RuntimeError("injected fault")
            os.kill(os.getpid(), signal.SIGKILL)

        scoring.ScoreAccumulator.end_batch = faulty
    return cli.main(score_args(model_dir, texts_file, out))


@pytest.mark.parametrize("fault", ["raise", "kill"])
def test_a_failed_rank_stops_every_rank_and_nothing_is_written(tiny_dirs, texts_file, tmp_path, fault):
    """Rank 1 raises (or is killed): rank 0 exits non-zero naming rank 1, rank 1 exits non-zero, no file is
    written, and nobody waits for the collective timeout (300 s here; a rank still running then fails the test)."""
    out = tmp_path / "out"
    t0 = time.monotonic()
    codes = launch(
        fault_rank, tiny_dirs["llama"], texts_file, str(out), fault, tmpdir=tmp_path / "tmp", timeout_s=300, wait_s=290
    )
    assert time.monotonic() - t0 < 290
    assert codes == [2, 2 if fault == "raise" else -signal.SIGKILL]
    if fault == "raise":  # rank 1 removed its scratch output directory (a killed rank cannot)
        assert not list((tmp_path / "tmp").glob("neuronscope-rank*"))
    err0 = (tmp_path / "stderr0.txt").read_text()
    assert "rank 1" in err0, err0
    if fault == "raise":
        assert "rank 1 raised RuntimeError: injected fault" in err0, err0
        assert "injected fault" in (tmp_path / "stderr1.txt").read_text()
    else:
        assert "stopped after collective 0" in err0, err0
    assert not [p for p in out.rglob("*") if p.is_file()]


def distill_fault_rank(rank: int, model_dir: str, out: str) -> int:
    """Rank 1's second distillation step raises; each rank records what it raised and when."""
    model = ns.load_model(model_dir)
    windows = sequential.calibration_windows(model, {"a": TEXTS[:4], "b": TEXTS[4:]}, 48, 8)
    spec = sequential.sequential_spec(model, windows, "wanda", 0.3, "mean", None, batch_size=2).spec
    calls = {"n": 0}
    real = distill.distillation_kl

    def faulty(*args, **kwargs):
        calls["n"] += 1
        if rank == 1 and calls["n"] == 2:
            raise RuntimeError("injected distillation fault")
        return real(*args, **kwargs)

    distill.distillation_kl = faulty
    try:
        distill.distill_spec(model, spec, windows.tokens, 1, lr=1e-2, batch_size=2, bf16=False)
    except Exception as exc:  # noqa: BLE001
        Path(out, f"error{rank}.txt").write_text(f"{type(exc).__name__}: {exc}\n{calls['n']}")
        return 3
    finally:
        distributed.stop()  # leave the process group before exiting, or gloo's teardown may abort the process
    return 0


def test_a_rank_failing_in_distillation_stops_every_rank_at_that_step(tiny_dirs, tmp_path):
    """Distillation runs collectives every step; a rank that raises in the middle still joins the step's gradient
    sum with its failure flag, so both ranks stop at that step (no hang until the collective timeout): rank 1
    re-raises its own error, rank 0 a DistributedError naming the distillation."""
    t0 = time.monotonic()
    codes = launch(distill_fault_rank, tiny_dirs["llama"], str(tmp_path), tmpdir=tmp_path / "tmp", timeout_s=120, wait_s=110)
    assert time.monotonic() - t0 < 100 and codes == [3, 3]
    err0, steps0 = (tmp_path / "error0.txt").read_text().rsplit("\n", 1)
    err1, steps1 = (tmp_path / "error1.txt").read_text().rsplit("\n", 1)
    assert err1 == "RuntimeError: injected distillation fault" and steps1 == "2"
    assert err0.startswith("DistributedError") and "during distillation" in err0 and steps0 == "2", err0


def hang_rank(rank: int, out: str, seconds: float) -> int:
    """Both ranks start the process group; rank 1 then takes ``seconds`` over its share of a pass while rank 0
    waits at the end of it. Each records when it gave up (rank 0) or woke up (rank 1)."""
    try:
        distributed.start()
        with distributed.shard_work("a pass"):
            if rank == 1:
                time.sleep(seconds)
                Path(out, "woke1.txt").write_text(str(time.time()))
    except distributed.DistributedError as exc:
        Path(out, f"error{rank}.txt").write_text(f"{time.time()}\n{exc}")
        return 3
    return 0


def test_a_hanging_rank_meets_the_collective_timeout(tmp_path):
    """With a 3 s timeout, rank 0 gives up on rank 1 (asleep for 12 s) before it wakes, naming it; rank 1 then
    finds rank 0 gone. Both exit non-zero."""
    codes = launch(hang_rank, str(tmp_path), 12.0, tmpdir=tmp_path / "tmp", timeout_s=3.0, wait_s=300)
    assert codes == [3, 3]
    gave_up, err0 = (tmp_path / "error0.txt").read_text().split("\n", 1)
    assert float(gave_up) < float((tmp_path / "woke1.txt").read_text())
    assert "rank 1 (stopped after collective 0" in err0 and "a pass: status" in err0, err0


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--batch-size", "0"], "batch_size"),
        (["--device", "tpu"], "valid devices here are cpu"),
        (["--max-tokens", "0"], "max_tokens must be >= 1"),
    ],
)
def test_bad_input_is_refused_by_every_rank_before_the_group_starts(monkeypatch, capsys, tmp_path, flags, message):
    """Each rank checks its input before any collective: both refuse with the same message, no process group is
    started (nothing waits for a peer), and no output directory appears."""
    errors = []
    for rank in range(WORLD):
        for key, value in rank_env(rank, free_port()).items():
            monkeypatch.setenv(key, value)
        assert cli.main(["score", "--out", str(tmp_path / "out"), *flags]) == 2
        assert not torch.distributed.is_initialized()
        errors.append(capsys.readouterr().err.replace(f"(rank {rank})", "(rank R)"))
    assert errors[0] == errors[1] and message in errors[0] and "(rank R)" in errors[0], errors
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------- in one process


def test_share_is_a_balanced_partition():
    """Every item goes to exactly one rank, the same split on every rank, and no rank carries more than the mean
    load plus the largest item (the greedy bound)."""
    costs = [5, 1, 1, 9, 3, 3, 2, 8, 1, 4]
    for world in (1, 2, 3, 4):
        parts = [distributed.share(costs, distributed.Rank(r, world, r)) for r in range(world)]
        assert sorted(i for p in parts for i in p) == list(range(len(costs)))
        assert all(p == sorted(p) for p in parts)
        loads = [sum(costs[i] for i in p) for p in parts]
        assert max(loads) <= sum(costs) / world + max(costs)
    assert distributed.share(costs) == list(range(len(costs)))  # one process takes everything


def test_devices_and_timeout_are_checked(monkeypatch):
    assert distributed.check_device(None) == "cpu" and str(distributed.resolve_device("cpu")) == "cpu"
    for bad in ("tpu", "cpu:1", "cuda:x", "gpu"):
        with pytest.raises(ValueError, match="valid devices here are"):
            distributed.check_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="not available"):
            distributed.check_device("cuda")
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "0")
    with pytest.raises(ValueError, match="seconds > 0"):
        distributed.timeout_s()
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "2.5")
    assert distributed.timeout_s() == 2.5


def test_without_torchrun_nothing_is_shared(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    assert distributed.current() == distributed.Rank(0, 1, 0) and distributed.is_writer() and not distributed.active()
    assert distributed.sum_values(1.5, 2) == (1.5, 2)
    t = torch.arange(3.0)
    assert distributed.sum_disjoint(t) is t
