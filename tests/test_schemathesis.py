"""Fuzz the REST API from its own OpenAPI schema (schemathesis) against the app on a loopback server.

Every generated request (valid and invalid bodies, query strings, unicode, huge numbers) must get a non-5xx answer
whose status code, content type and body match what ``/openapi.json`` documents for that route (400/409/413/422/503
included). Afterwards the model is as it was: no hook attached, logits bit-identical, state dict unchanged.
Examples per route are bounded so the run takes about a minute on 2 cores.
"""

from __future__ import annotations

import hashlib

import pytest
import schemathesis
import torch
from _app_live import LiveServer
from conftest import probe_logits
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

import neuronscope_tl as ns
from neuronscope_tl.app import AppSettings
from neuronscope_tl.hooks import hook_count

# Small limits so that random requests reach the 413 refusals too.
LIMITS = AppSettings(max_texts=4, max_tokens=200, max_candidates=4, max_batch_size=4, max_top_k=20, max_body_bytes=20_000)
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    negative_data_rejection,
]

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
def before(model):
    return probe_logits(model), state_hash(model)


@pytest.fixture(scope="module")
def live(model, before):
    with LiveServer(model, LIMITS) as srv:
        yield srv


@pytest.fixture(scope="module")
def api_schema(live):
    return schemathesis.openapi.from_url(live.url + "/openapi.json").include(path_regex="^/api/pruning/")


schema = schemathesis.pytest.from_fixture("api_schema")
SEEN: dict = {}  # (route, status) -> count, to show what the fuzzing reached


@schema.parametrize()
@settings(max_examples=50, deadline=None, suppress_health_check=list(HealthCheck), database=None)
def test_rest_api_conforms_to_its_schema(case, live):
    response = case.call_and_validate(base_url=live.url, checks=CHECKS, timeout=60)
    assert response.status_code < 500
    key = (case.operation.path.rsplit("/", 1)[-1], response.status_code)
    SEEN[key] = SEEN.get(key, 0) + 1
    if response.status_code >= 400:
        detail = response.json()["detail"]
        text = str(detail)
        assert "Traceback" not in text and 'File "' not in text


def test_model_unchanged_after_fuzzing(live, model, before):
    # runs after the fuzzing above (same module, file order)
    logits, digest = before
    print("schemathesis (route, status): count", sorted(SEEN.items()))
    assert sum(SEEN.values()) >= 60, SEEN  # the fuzzing really ran
    assert {status for _, status in SEEN} >= {200, 400, 422}, SEEN
    assert hook_count(model) == 0
    assert torch.equal(probe_logits(model), logits)
    assert state_hash(model) == digest
