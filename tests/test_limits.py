"""Resource limits at the limit and one past it, beyond what tests/test_app_api.py already covers (texts, top_k,
candidates, batch size and tokens per request through TestClient):

* the body limit on a real server, with ``Content-Length`` and with a chunked body that declares no length;
* tokens per text: a text of exactly the model's context passes, one token more is refused (never truncated);
* concurrent analyses queue on the lock (one at a time, all answered) and a wait past the timeout is a 503;
* every limit is a ``serve`` flag.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from _app_live import LiveServer
from fastapi.testclient import TestClient

import neuronscope_tl as ns
from neuronscope_tl import activations
from neuronscope_tl.app import AppSettings, create_app
from neuronscope_tl.app.server import BodyLimit
from neuronscope_tl.cli import parse_args

P = "/api/pruning"
LIMIT = 600

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model(tiny_dirs):
    return ns.load_model(tiny_dirs["llama"])


@pytest.fixture(scope="module")
def live(model):
    with LiveServer(model, AppSettings(max_body_bytes=LIMIT, lock_timeout_s=60)) as srv:
        yield srv


def body_of(size: int) -> bytes:
    """A valid impact request of exactly ``size`` bytes (JSON padded with spaces)."""
    core = json.dumps({"layer_index": 0, "neuron_indices": [1], "input_text": "The council met."}).encode()
    assert len(core) <= size
    return core[:-1] + b" " * (size - len(core)) + b"}"


def chunks(data: bytes, n: int = 7):
    for i in range(0, len(data), n):
        yield data[i : i + n]


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_body_limit_at_and_past_the_limit(live, chunked):
    headers = {"content-type": "application/json"}
    for size, status in [(LIMIT, 200), (LIMIT + 1, 413)]:
        data = body_of(size)
        assert len(data) == size
        content = chunks(data) if chunked else data  # an iterator makes httpx send Transfer-Encoding: chunked
        r = httpx.post(live.url + P + "/impact-analysis", content=content, headers=headers, timeout=60)
        if chunked:
            assert "content-length" not in r.request.headers and r.request.headers["transfer-encoding"] == "chunked"
        assert r.status_code == status, (size, r.text)
        if status == 413:
            assert r.json() == {"detail": f"request body too large; at most {LIMIT} bytes."}


def test_huge_chunked_body_is_refused_and_read_only_to_the_limit(live, monkeypatch):
    """10 MB chunked: the answer is a 413, the route never runs, and the middleware stops reading just past the
    limit (counted on the ASGI receive channel: at most limit + one chunk is ever held)."""
    ran = []
    monkeypatch.setattr(live.state, "impact", lambda *a, **k: ran.append(1))
    r = httpx.post(live.url + P + "/impact-analysis", content=(b"x" * 1000 for _ in range(10_000)), timeout=60)
    assert r.status_code == 413 and ran == []

    pulled = []

    async def receive():
        pulled.append(1000)
        return {"type": "http.request", "body": b"x" * 1000, "more_body": len(pulled) < 10_000}

    sent = []

    async def send(message):
        sent.append(message)

    async def app(scope, receive, send):
        raise AssertionError("the app must not run")

    scope = {"type": "http", "path": P + "/impact-analysis", "headers": [], "method": "POST"}
    asyncio.run(BodyLimit(app, lambda: LIMIT, P)(scope, receive, send))
    assert sent[0]["status"] == 413
    assert sum(pulled) == (LIMIT // 1000 + 1) * 1000  # stopped at the first chunk past the limit


def test_body_limit_leaves_gradio_alone(live):
    # the limit is the REST API's; Gradio's routes have their own
    assert httpx.get(live.url + "/", timeout=60).status_code == 200


def test_tokens_per_text_at_context_and_one_past(model):
    """The library refuses a text longer than the context (README: refused, never truncated)."""
    n_ctx = model.cfg.n_ctx
    c = TestClient(create_app(model, AppSettings(max_tokens=10_000), ui=False))
    count = lambda t: model.to_tokens(t, truncate=False).shape[1]  # to_tokens cuts at n_ctx by default
    text = "".join(ns.lee_articles()[:3])
    while count(text) > n_ctx:
        text = text[:-1]
    assert count(text) == n_ctx, "no prefix of exactly n_ctx tokens; pick another text"
    r = c.post(f"{P}/impact-analysis", json={"layer_index": 0, "neuron_indices": [0], "input_text": text})
    assert r.status_code == 200 and r.json()["n_tokens"] == n_ctx
    longer = next(text + extra for extra in (" x", "x", ".", " ") if count(text + extra) == n_ctx + 1)
    r = c.post(f"{P}/impact-analysis", json={"layer_index": 0, "neuron_indices": [0], "input_text": longer})
    assert r.status_code == 400
    assert (
        r.json()["detail"]
        == f"texts[0] has {n_ctx + 1} tokens, more than the model's context of {n_ctx}; texts must have 1..{n_ctx} tokens (split long documents first)."
    )


def test_concurrent_analyses_queue_one_at_a_time(live, model, monkeypatch):
    """10 importance requests at once: all answered 200 with the sequential result, never two on the model."""
    state = {"now": 0, "max": 0}
    guard = threading.Lock()
    original = activations.neuron_importance

    def counted(*args, **kwargs):
        with guard:
            state["now"] += 1
            state["max"] = max(state["max"], state["now"])
        try:
            time.sleep(0.02)  # widen the window in which an overlap would show
            return original(*args, **kwargs)
        finally:
            with guard:
                state["now"] -= 1

    monkeypatch.setattr(activations, "neuron_importance", counted)
    body = {"layer_index": 1, "input_texts": ["The council met.", "Rain fell."], "top_k": 5}
    expected = httpx.post(live.url + P + "/neuron-importance", json=body, timeout=60).json()
    with ThreadPoolExecutor(max_workers=10) as pool:
        answers = list(pool.map(lambda _: httpx.post(live.url + P + "/neuron-importance", json=body, timeout=60), range(10)))
    assert [r.status_code for r in answers] == [200] * 10
    assert all(r.json() == expected for r in answers)
    assert state["max"] == 1
    assert ns.hook_count(model) == 0


def test_lock_wait_within_and_past_the_timeout(model):
    """A request that waits less than lock_timeout_s is answered; one that would wait longer gets a 503."""
    body = {"layer_index": 0, "neuron_indices": [0], "input_text": "a b"}
    with LiveServer(model, AppSettings(lock_timeout_s=1.5)) as srv:
        srv.state.lock.acquire()
        threading.Timer(0.4, srv.state.lock.release).start()  # busy for 0.4 s < 1.5 s: queued, then served
        assert httpx.post(srv.url + P + "/impact-analysis", json=body, timeout=60).status_code == 200
        with srv.state.lock:  # busy for longer than 1.5 s
            r = httpx.post(srv.url + P + "/impact-analysis", json=body, timeout=60)
        assert r.status_code == 503 and r.json() == {
            "detail": "the model is busy with other analyses; waited 1.5 s, try again later."
        }
        assert httpx.post(srv.url + P + "/impact-analysis", json=body, timeout=60).status_code == 200


def test_every_limit_is_a_serve_flag():
    _, cfg = parse_args(
        [
            "serve",
            "--max-texts",
            "3",
            "--max-tokens",
            "50",
            "--max-candidates",
            "4",
            "--max-batch-size",
            "2",
            "--max-top-k",
            "7",
            "--max-body-bytes",
            "999",
            "--lock-timeout-s",
            "2.5",
        ]
    )
    s = cfg.settings
    assert (s.max_texts, s.max_tokens, s.max_candidates, s.max_batch_size, s.max_top_k, s.max_body_bytes, s.lock_timeout_s) == (
        3,
        50,
        4,
        2,
        7,
        999,
        2.5,
    )
    defaults = parse_args(["serve"])[1].settings
    assert defaults == AppSettings()
    for flag in ("--max-texts", "--max-tokens", "--max-candidates", "--max-batch-size", "--max-top-k", "--max-body-bytes"):
        with pytest.raises(ValueError, match=">= 1"):
            parse_args(["serve", flag, "0"])
