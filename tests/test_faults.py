"""Fault injection: an exception inside a hook mid-analysis, a KeyboardInterrupt mid-scoring, a full disk or a
refused write during every export, and clients that vanish mid-request.

After each fault: no hook remains on the model, the state dict hashes as before, the probe logits are
bit-identical, no partial or temporary file is left in the output directory, and the next call (or the server's
next request) gives the same answer as before the fault.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import socket
import tempfile
import time

import httpx
import pytest
import torch
from _app_live import LiveServer
from conftest import probe_logits

import neuronscope_tl as ns
from neuronscope_tl import activations, cli, export, hooks
from neuronscope_tl.hooks import hook_count

TEXTS = ["The council met on Tuesday.", "Rain is expected across the coast.", "Shares fell in early trade."]
CANDS = [(0, 1), (1, 2), (2, 3), (0, 5)]
P = "/api/pruning"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def state_hash(model) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def model(tiny_dirs):
    return ns.load_model(tiny_dirs["llama"])


@pytest.fixture(scope="module")
def reference(model):
    """What a clean model answers, taken before any fault."""
    batch = ns.batch_analysis(model, CANDS, TEXTS, progress=False)
    return {
        "logits": probe_logits(model),
        "hash": state_hash(model),
        "grad_flags": [p.requires_grad for p in model.parameters()],
        "batch": batch.individual["impact_score"].tolist() + batch.cumulative["impact_score"].tolist(),
        "importance": ns.neuron_importance(model, TEXTS, progress=False).table["importance"].tolist(),
    }


def assert_intact(model, reference):
    assert hook_count(model) == 0
    assert not model.training
    assert [p.requires_grad for p in model.parameters()] == reference["grad_flags"]
    assert state_hash(model) == reference["hash"]
    assert torch.equal(probe_logits(model), reference["logits"])


def assert_no_leftovers(directory):
    """Nothing temporary, and every file that is there is complete (parses)."""
    names = sorted(p.name for p in directory.iterdir())
    assert not [n for n in names if n.startswith(".") or n.endswith(".tmp")], names
    for p in directory.iterdir():
        if p.suffix == ".json":
            json.loads(p.read_text())
        elif p.suffix == ".csv":
            text = p.read_text()
            assert text.endswith("\n") and len(text.splitlines()) >= 2
    return names


# ---------------------------------------------------------------------------------------------- hook exceptions


class Boom(RuntimeError):
    pass


@pytest.mark.parametrize("where", ["ablation", "capture"])
def test_exception_inside_a_hook_mid_batch(model, reference, monkeypatch, where):
    """The 5th call of an ablation (or residual capture) hook raises, in the middle of a batch analysis."""
    calls = {"n": 0}
    name = "ablation_hook" if where == "ablation" else "capture_hook"
    original = getattr(hooks, name)

    def failing(*args, **kwargs):
        inner = original(*args, **kwargs)

        def hook(act, hook=None):
            calls["n"] += 1
            if calls["n"] == 5:
                raise Boom("injected fault inside a hook")
            return inner(act, hook)

        return hook

    monkeypatch.setattr(hooks, name, failing)
    if where == "capture":
        monkeypatch.setattr(ns.engine, "capture_hook", failing)
        call = lambda: ns.simulate_pruning(model, 0, [1, 2], TEXTS)  # captures the residual stream
    else:
        call = lambda: ns.batch_analysis(model, CANDS, TEXTS, progress=False)
    with pytest.raises(Boom):
        call()
    assert calls["n"] == 5
    monkeypatch.undo()
    assert_intact(model, reference)
    again = ns.batch_analysis(model, CANDS, TEXTS, progress=False)
    assert again.individual["impact_score"].tolist() + again.cumulative["impact_score"].tolist() == reference["batch"]


@pytest.mark.parametrize("fn", ["stream_activations", "neuron_importance"])
def test_keyboard_interrupt_mid_activation_pass(model, reference, monkeypatch, fn):
    """Ctrl-C arrives in the 2nd batch of a streaming pass (inside the hook that feeds the accumulator)."""
    calls = {"n": 0}
    original = activations.NeuronAccumulator.update

    def interrupted(self, layer, acts):
        calls["n"] += 1
        if calls["n"] == 4:  # 3 layers per batch: the first layer of the 2nd batch
            raise KeyboardInterrupt
        return original(self, layer, acts)

    monkeypatch.setattr(activations.NeuronAccumulator, "update", interrupted)
    activations.forget_calibration(model)  # neuron_importance over all layers is served from that cache
    with pytest.raises(KeyboardInterrupt):
        if fn == "stream_activations":
            ns.stream_activations(model, TEXTS, progress=False)
        else:
            ns.neuron_importance(model, TEXTS, progress=False)
    monkeypatch.undo()
    assert_intact(model, reference)
    assert ns.neuron_importance(model, TEXTS, progress=False).table["importance"].tolist() == reference["importance"]


@pytest.mark.parametrize("where", ["update", "backward"])
def test_keyboard_interrupt_mid_scoring_pass(model, reference, monkeypatch, where):
    """Ctrl-C in the 2nd batch of the one-pass scoring (forward + backward): no hooks, no .grad, same scores after."""
    from neuronscope_tl import scoring

    clean = scoring.score_neurons(model, TEXTS)
    calls = {"n": 0}
    if where == "update":
        original = scoring.ScoreAccumulator.update

        def interrupted(self, *args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 4:
                raise KeyboardInterrupt
            return original(self, *args, **kwargs)

        monkeypatch.setattr(scoring.ScoreAccumulator, "update", interrupted)
    else:
        original = torch.autograd.grad

        def interrupted(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 2:
                raise KeyboardInterrupt
            return original(*args, **kwargs)

        monkeypatch.setattr(scoring.torch.autograd, "grad", interrupted)
    with pytest.raises(KeyboardInterrupt):
        scoring.score_neurons(model, TEXTS)
    monkeypatch.undo()
    assert_intact(model, reference)
    assert all(p.grad is None for p in model.parameters())
    again = scoring.score_neurons(model, TEXTS)
    assert again.drop(columns="label").equals(clean.drop(columns="label"))


def test_keyboard_interrupt_mid_impact_forward(model, reference, monkeypatch):
    """Ctrl-C during the ablated forward of a simulation (mean ablation: after its calibration pass)."""
    original = hooks.ablation_hook

    def interrupted(*args, **kwargs):
        def hook(act, hook=None):
            raise KeyboardInterrupt

        return hook

    monkeypatch.setattr(hooks, "ablation_hook", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ns.simulate_pruning(model, 1, [0, 3], TEXTS, ablation="mean", calib_texts=TEXTS)
    monkeypatch.setattr(hooks, "ablation_hook", original)
    assert_intact(model, reference)


# ---------------------------------------------------------------------------------------------- export faults


class FailingFile:
    """A file object that writes half of the first chunk to disk and then fails like a full disk."""

    def __init__(self, fh):
        self.fh = fh

    def write(self, text):
        self.fh.write(text[: len(text) // 2])
        self.fh.flush()
        raise OSError(errno.ENOSPC, "No space left on device")

    def __getattr__(self, name):
        return getattr(self.fh, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.fh.close()


def inject_write_fault(monkeypatch, kind: str, fail_at: int):
    """Make the ``fail_at``-th atomic write (1-based) fail: ``disk_full`` mid-write, or ``permission`` at creation."""
    count = {"n": 0}
    real_fdopen, real_mkstemp = os.fdopen, tempfile.mkstemp

    def fdopen(fd, *args, **kwargs):
        count["n"] += 1
        fh = real_fdopen(fd, *args, **kwargs)
        return FailingFile(fh) if kind == "disk_full" and count["n"] == fail_at else fh

    def mkstemp(*args, **kwargs):
        if kind == "permission" and count["n"] + 1 == fail_at:
            raise PermissionError(errno.EACCES, "Permission denied", kwargs.get("dir"))
        return real_mkstemp(*args, **kwargs)

    monkeypatch.setattr(export.os, "fdopen", fdopen)
    monkeypatch.setattr(export.tempfile, "mkstemp", mkstemp)
    return count


@pytest.mark.parametrize("kind", ["disk_full", "permission"])
@pytest.mark.parametrize("fail_at", [1, 2])
def test_weight_export_fault_leaves_nothing_partial(model, reference, tmp_path, monkeypatch, kind, fail_at):
    wa = ns.analyze_weights(model)
    inject_write_fault(monkeypatch, kind, fail_at)
    with pytest.raises(OSError) as info:
        ns.export_weights(wa, tmp_path / "w.json")
    assert info.value.errno in (errno.ENOSPC, errno.EACCES)
    monkeypatch.undo()
    names = assert_no_leftovers(tmp_path)
    assert names == []  # the JSON and its CSV are written as one set: a failure on either leaves neither
    assert_intact(model, reference)
    assert [p.name for p in ns.export_weights(wa, tmp_path / "w.json")] == ["w.json", "w_neurons.csv"]


@pytest.mark.parametrize("kind", ["disk_full", "permission"])
def test_impact_export_fault_keeps_the_previous_file(model, reference, tmp_path, monkeypatch, kind):
    """A failed re-export never damages the previous complete file (atomic replace)."""
    b = ns.batch_analysis(model, CANDS[:2], TEXTS[:1], progress=False)
    ns.export_impact(b, tmp_path / "b.json")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    inject_write_fault(monkeypatch, kind, 1)
    with pytest.raises(OSError):
        ns.export_impact(b, tmp_path / "b.json")
    monkeypatch.undo()
    assert_no_leftovers(tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    assert_intact(model, reference)


@pytest.mark.parametrize("kind", ["disk_full", "permission"])
def test_cli_analyze_write_fault_is_a_clean_error(tiny_dirs, tmp_path, monkeypatch, capsys, kind):
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(TEXTS) + "\n")
    out = tmp_path / "report"
    inject_write_fault(monkeypatch, kind, 4)  # after weights JSON + CSV and candidates CSV: mid-report
    argv = [
        "analyze",
        "--model",
        tiny_dirs["llama"],
        "--texts",
        str(texts),
        "--out",
        str(out),
        "--n-candidates",
        "2",
        "--max-texts",
        "2",
    ]
    rc = cli.main(argv)
    err = capsys.readouterr().err  # model loading may print progress bars first
    assert rc == 2
    err = err.strip().splitlines()[-1]
    assert err.startswith("neuronscope-tl: error:") and "Traceback" not in err
    assert ("No space left" in err) if kind == "disk_full" else ("Permission denied" in err)
    names = assert_no_leftovers(out)
    assert names == sorted(["weight_analysis.json", "weight_analysis_neurons.csv", "candidates.csv"])


# ---------------------------------------------------------------------------------------------- the server


@pytest.fixture(scope="module")
def live(model, reference):
    with LiveServer(model) as srv:
        yield srv


IMPACT = {"layer_index": 1, "neuron_indices": [0, 3], "input_text": TEXTS[0]}


def expected_impact(model):
    return ns.simulate_pruning(model, 1, [0, 3], TEXTS[0], token_detail=True).to_dict()["impact_score"]


def wait_idle(srv, timeout=60.0, quiet=0.5):
    """Until the model lock has stayed free for ``quiet`` seconds: abandoned requests still queued on the lock
    would otherwise take it between two polls (and hold their hooks while they run)."""
    deadline = time.monotonic() + timeout
    free_since = None
    while True:
        assert time.monotonic() < deadline, "the model lock was never released"
        if srv.state.lock.locked():
            free_since = None
        elif free_since is None:
            free_since = time.monotonic()
        elif time.monotonic() - free_since >= quiet:
            return
        time.sleep(0.02)


def raw(url: str, data: bytes, read: bool = False) -> bytes:
    host, port = url.rsplit("//", 1)[1].split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(data)
        return s.recv(65536) if read else b""


def server_answers_correctly(srv, model, reference):
    wait_idle(srv)
    r = httpx.post(srv.url + P + "/impact-analysis", json=IMPACT, timeout=60)
    assert r.status_code == 200 and r.json()["impact_score"] == expected_impact(model)
    wait_idle(srv)  # a request abandoned earlier may have run after this one; hooks are checked once all are done
    assert_intact(model, reference)


@pytest.mark.parametrize(
    "request_bytes",
    [
        # declares 1000 bytes, sends 20, hangs up
        b'POST /api/pruning/impact-analysis HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"layer_index": 0, ',
        # chunked, one chunk, hangs up before the last chunk
        b'POST /api/pruning/batch-analysis HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n10\r\n{"input_texts": \r\n',
        # headers only
        b"POST /api/pruning/neuron-importance HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n",
    ],
    ids=["content-length", "chunked", "headers-only"],
)
def test_client_disconnects_mid_body(live, model, reference, request_bytes):
    raw(live.url, request_bytes)
    server_answers_correctly(live, model, reference)


def test_client_disconnects_while_analysis_runs(live, model, reference):
    """A full batch request, then the client hangs up before the answer: the analysis ends, the lock is freed."""
    body = json.dumps(
        {"pruning_candidates": [{"layer_index": l, "neuron_index": n} for l, n in CANDS], "input_texts": TEXTS, "batch_size": 1}
    ).encode()
    head = f"POST {P}/batch-analysis HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
    for _ in range(3):
        raw(live.url, head + body)
    server_answers_correctly(live, model, reference)
    # the last abandoned analysis still became the last result: export works and is complete
    r = httpx.post(live.url + P + "/export", json={"type": "impact"}, timeout=60)
    assert r.status_code == 200 and r.json()["kind"] in ("batch_analysis", "impact_analysis")


def test_exception_inside_a_hook_during_a_request(live, model, reference, monkeypatch):
    """A bug inside a hook mid-request: a 500 without traceback or path, then the next request is correct."""

    def broken(*args, **kwargs):
        def hook(act, hook=None):
            raise Boom(f"injected fault in {os.getcwd()}")

        return hook

    monkeypatch.setattr(hooks, "ablation_hook", broken)
    r = httpx.post(live.url + P + "/impact-analysis", json=IMPACT, timeout=60)
    monkeypatch.undo()
    assert r.status_code == 500
    assert r.json() == {"detail": "internal error (Boom); see the server log."}
    assert os.getcwd() not in r.text and "Traceback" not in r.text
    server_answers_correctly(live, model, reference)
