"""Security defaults, one test each:

* the server binds 127.0.0.1 unless told otherwise, says where at start-up, and warns when it is reachable from
  other machines;
* models load with ``trust_remote_code=False`` unless the user passes ``--trust-remote-code``;
* no endpoint takes a path: the REST inputs are a fixed set of non-path fields, extra fields are refused, the REST
  export writes nothing to disk, and Gradio's file route serves nothing outside the app's own download folder;
* no error response carries a traceback or a local path (model directory, working directory, install directory).
"""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest
import uvicorn
from _app_live import LiveServer

import neuronscope_tl as ns
from neuronscope_tl import cli, hooks, models
from neuronscope_tl.app import AppSettings
from neuronscope_tl.app import server as app_server

P = "/api/pruning"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model(tiny_dirs):
    return ns.load_model(tiny_dirs["gpt2"])


# ---------------------------------------------------------------------------------------------- binding


class FakeSocket:
    def __init__(self, host):
        self.host = host

    def getsockname(self):
        return (self.host, 7860)


def test_serve_binds_loopback_by_default_and_says_so(model, monkeypatch):
    bound, loads = [], []
    real_bind = app_server.bind

    def bind(host, port):
        sock = real_bind(host, port)
        bound.append(sock)
        return sock

    monkeypatch.setattr(app_server, "bind", bind)
    monkeypatch.setattr(models, "load_model", lambda name, **kw: loads.append(kw) or model)
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets=None: None)  # start-up only, no serving
    lines = []
    _, cfg = cli.parse_args(["serve", "--port", "0"])
    cli.run_serve(cfg, log=lines.append)
    try:
        assert bound[0].getsockname()[0] == "127.0.0.1"
        assert lines == [
            f"neuronscope-tl: serving on {app_server.address(bound[0])} (demo {app_server.address(bound[0])}/, "
            f"REST {app_server.address(bound[0])}{P}, docs {app_server.address(bound[0])}/docs)"
        ]
        assert lines[0].startswith("neuronscope-tl: serving on http://127.0.0.1:")
        assert loads == [{"trust_remote_code": False}]
    finally:
        bound[0].close()


@pytest.mark.parametrize(
    "host, warned", [("127.0.0.1", False), ("::1", False), ("0.0.0.0", True), ("192.168.1.20", True), ("::", True)]
)
def test_start_up_warns_when_reachable_from_other_machines(model, monkeypatch, host, warned):
    # a fake socket: nothing is bound to a non-loopback interface by the tests
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets=None: None)
    lines = []
    app_server.serve(app_server.create_app(model, ui=False), FakeSocket(host), log=lines.append)
    assert lines[0].startswith("neuronscope-tl: serving on http://")
    assert any("reachable from other machines" in line for line in lines) == warned


# ---------------------------------------------------------------------------------------------- remote code


def test_load_model_never_trusts_remote_code_unless_asked(tiny_dirs, monkeypatch):
    import transformers
    from transformer_lens.model_bridge import TransformerBridge

    seen = []
    for owner, attr in [
        (transformers.AutoModelForCausalLM, "from_pretrained"),
        (transformers.AutoTokenizer, "from_pretrained"),
        (TransformerBridge, "boot_transformers"),
    ]:
        real = getattr(owner, attr)

        def spy(*args, _real=real, _name=f"{owner.__name__}.{attr}", **kwargs):
            seen.append((_name, kwargs.get("trust_remote_code", "absent")))
            return _real(*args, **kwargs)

        monkeypatch.setattr(owner, attr, spy)
    ns.load_model(tiny_dirs["llama"])
    # our three calls pass False explicitly; TransformerLens may load the tokenizer once more without the keyword,
    # which is transformers' default: False
    assert set(seen) >= {
        ("AutoModelForCausalLM.from_pretrained", False),
        ("AutoTokenizer.from_pretrained", False),
        ("TransformerBridge.boot_transformers", False),
    }
    assert {flag for _, flag in seen} <= {False, "absent"}
    seen.clear()
    ns.load_model(tiny_dirs["llama"], trust_remote_code=True)
    assert {flag for name, flag in seen if flag != "absent"} == {True} and len(seen) >= 3


@pytest.mark.parametrize("command", ["serve", "analyze", "score", "curve", "prune"])
def test_cli_trust_remote_code_flag_is_off_by_default(command, monkeypatch, tmp_path):
    extra = {
        "analyze": ["--out", str(tmp_path / "r")],
        "score": ["--out", str(tmp_path / "s")],
        "curve": ["--out", str(tmp_path / "c")],
        "prune": ["--sparsity", "0.2", "--out", str(tmp_path / "p")],
    }.get(command, [])
    assert cli.parse_args([command] + extra)[1].trust_remote_code is False
    assert cli.parse_args([command, "--trust-remote-code"] + extra)[1].trust_remote_code is True
    loads = []

    class Stop(Exception):
        pass

    def fake_load(name, **kwargs):
        loads.append(kwargs)
        raise Stop

    monkeypatch.setattr(models, "load_model", fake_load)
    monkeypatch.setattr(app_server, "bind", lambda host, port: FakeSocket(host))
    for argv, expected in [([command], False), ([command, "--trust-remote-code"], True)]:
        _, cfg = cli.parse_args(argv + extra)
        with pytest.raises(Stop):
            cli.COMMANDS[command][1](cfg, log=lambda *_: None)
        assert loads[-1]["trust_remote_code"] is expected and set(loads[-1]) <= {"trust_remote_code", "device"}
        assert loads[-1].get("device", "cpu") == "cpu"  # nothing but the flag and the default device is passed


# ---------------------------------------------------------------------------------------------- no client paths


def test_rest_inputs_are_a_fixed_set_without_paths(model, tmp_path, monkeypatch):
    from fastapi.testclient import TestClient

    from neuronscope_tl.app import create_app

    c = TestClient(create_app(model, ui=False))
    spec = c.get("/openapi.json").json()
    names = set()
    for path, ops in spec["paths"].items():
        assert path.startswith(P)
        for op in ops.values():
            names |= {p["name"] for p in op.get("parameters", [])}
    for schema in spec["components"]["schemas"].values():
        if schema["title"].endswith("Request") or schema["title"] == "Candidate":
            names |= set(schema["properties"])
            assert schema.get("additionalProperties") is False, schema["title"]
    assert names == {
        "threshold",
        "layer_index",
        "neuron_indices",
        "input_text",
        "ablation",
        "input_texts",
        "top_k",
        "pruning_candidates",
        "batch_size",
        "type",
        "neuron_index",
        "models",
        "methods",
        "sparsities",
        "calib_tokens",
        "eval_tokens",
    }
    good = {
        "/impact-analysis": {"layer_index": 0, "neuron_indices": [0], "input_text": "a b"},
        "/neuron-importance": {"layer_index": 0, "input_texts": ["a b"]},
        "/batch-analysis": {"pruning_candidates": [{"layer_index": 0, "neuron_index": 0}], "input_texts": ["a b"]},
        "/export": {"type": "weight"},
    }
    for route, body in good.items():
        for field in ("path", "file", "output_dir", "model"):
            r = c.post(P + route, json={**body, field: "/tmp/evil"})
            assert r.status_code == 422, (route, field)
    # the one field that names models takes only the app's model and its allow-list: a path or a hub id is a 400
    loads = []
    monkeypatch.setattr("neuronscope_tl.compare.load_model", lambda *a, **k: loads.append(a) or model)
    for name in (str(tmp_path), "/tmp/evil", "someone/model"):
        r = c.post(P + "/compare", json={"models": [name], "methods": ["random"], "sparsities": [0.2]})
        assert r.status_code == 400 and "Traceback" not in r.text, (name, r.text)
    assert loads == []


def test_rest_export_writes_nothing_to_disk(model, tmp_path, monkeypatch):
    from fastapi.testclient import TestClient

    from neuronscope_tl.app import create_app

    monkeypatch.chdir(tmp_path)
    app = create_app(model, ui=False)
    c = TestClient(app)
    assert c.post(P + "/impact-analysis", json={"layer_index": 0, "neuron_indices": [0], "input_text": "a b"}).status_code == 200
    for kind in ("weight", "impact"):
        r = c.post(P + "/export", json={"type": kind})
        assert r.status_code == 200 and r.headers["content-disposition"].startswith("attachment")
    assert list(tmp_path.iterdir()) == []
    assert app.state.neuronscope._downloads is None  # not even the app's private download folder was made


def test_gradio_serves_no_file_outside_its_download_folder(model, tiny_dirs):
    """The README promises 403 for any file outside the app's private download folder; a file inside it is served
    (so the 403s are the route's decision, not a route that serves nothing)."""
    secret = Path(tiny_dirs["gpt2"]) / "config.json"
    with LiveServer(model) as srv:
        downloads = srv.state.downloads_dir()
        (downloads / "served.txt").write_text("the app's own download")
        r = httpx.get(f"{srv.url}/gradio_api/file={downloads / 'served.txt'}", timeout=30)
        assert (r.status_code, r.text) == (200, "the app's own download")
        outside = [
            "/etc/passwd",
            str(secret),
            str(Path(ns.__file__)),
            "/no/such/file",
            str(downloads / ".." / "outside.txt"),
            str(downloads) + "/../" + secret.name,
        ]
        for target in outside:
            r = httpx.get(f"{srv.url}/gradio_api/file={target}", timeout=30)
            assert r.status_code == 403, (target, r.status_code, r.text)
            assert secret.read_text()[:40] not in r.text and "root:" not in r.text


# ---------------------------------------------------------------------------------------------- errors


def test_error_responses_carry_no_traceback_or_local_path(model, tiny_dirs, monkeypatch):
    local = [tiny_dirs["gpt2"], os.getcwd(), str(Path(ns.__file__).parent), str(Path(uvicorn.__file__).parent.parent)]
    bad = [
        ("POST", "/impact-analysis", {"layer_index": 9, "neuron_indices": [0], "input_text": "a"}, 400),
        ("POST", "/impact-analysis", {"layer_index": 0, "neuron_indices": [0], "input_text": "word " * 400}, 400),
        ("POST", "/impact-analysis", {"layer_index": "x"}, 422),
        ("POST", "/neuron-importance", {"layer_index": 0, "input_texts": ["a"] * 20}, 413),
        ("POST", "/batch-analysis", {"pruning_candidates": [], "input_texts": ["a"]}, 400),
        ("POST", "/export", {"type": "impact"}, 409),
        ("POST", "/export", {"type": "../../etc/passwd"}, 400),
        ("GET", "/candidates?threshold=nan", None, 400),
        ("GET", "/candidates?threshold=1e999", None, 400),
        ("GET", "/nowhere", None, 404),
    ]
    with LiveServer(model, AppSettings(max_texts=16, lock_timeout_s=0.3)) as srv:
        answers = []
        with httpx.Client(base_url=srv.url + P, timeout=60) as c:
            for method, route, body, status in bad:
                r = c.request(method, route, json=body)
                assert r.status_code == status, (route, r.text)
                answers.append(r.text)
            r = c.post("/impact-analysis", content=b'{"layer_index": 0, "neuron', headers={"content-type": "application/json"})
            assert r.status_code == 422
            answers.append(r.text)
            with srv.state.lock:
                r = c.post("/impact-analysis", json={"layer_index": 0, "neuron_indices": [0], "input_text": "a"})
            assert r.status_code == 503
            answers.append(r.text)

            def broken(*args, **kwargs):
                def hook(act, hook=None):
                    raise FileNotFoundError(2, "No such file", str(Path(tiny_dirs["gpt2"]) / "secret.bin"))

                return hook

            monkeypatch.setattr(hooks, "ablation_hook", broken)
            r = c.post("/impact-analysis", json={"layer_index": 0, "neuron_indices": [0], "input_text": "a"})
            monkeypatch.undo()
            assert r.status_code == 500 and r.json() == {"detail": "internal error (FileNotFoundError); see the server log."}
            answers.append(r.text)
    for text in answers:
        assert "Traceback" not in text and 'File "' not in text, text
        for path in local:
            assert path not in text, (path, text)
