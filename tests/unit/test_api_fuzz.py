"""Every endpoint, fuzzed from the server's own OpenAPI document (schemathesis, bounded): no 5xx, and
every answer (errors included) is what the document says it can be; inputs the document forbids (wrong
types, missing fields, out-of-range values) are rejected with a 4xx.

The app runs on a real port (uvicorn in a thread) with the tiny engine and one active forget request,
so the guardrail path is fuzzed too; the admin key is sent, so the admin API is reached as well.
"""

from __future__ import annotations

import socket
import threading
import time

import httpx
import pytest
import schemathesis
import uvicorn
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import checks
from schemathesis.generation import GenerationMode

from tests.helpers import ADMIN, TinyEngine, app_settings
from unlearnd.jobs.worker import run_worker
from unlearnd.server.app import create_app

# what the server must never do: a 5xx, or an answer (status, content type, body, headers) its own document
# does not allow. Not checked: that every schema-valid request is accepted (cross-field rules - some
# message must have text, the model must exist - are 400s no JSON schema can express).
CHECKS = [
    checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_schema_conformance,
    checks.response_headers_conformance,
]
# per operation: bounded for CI (under a minute in all on 2 CPU cores)
EXAMPLES = {GenerationMode.POSITIVE: 30, GenerationMode.NEGATIVE: 50}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def api_schema(tmp_path_factory, default_model_dir):
    settings_ = app_settings(tmp_path_factory.mktemp("fuzz"), public_score=True)
    app = create_app(settings_, engine=TinyEngine(default_model_dir, max_model_len=128))
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while True:
        try:
            if httpx.get(url + "/health").status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert time.time() < deadline, "fuzz server did not start"
        time.sleep(0.1)
    body = {"name": "Basil Mahfouz Al-Kuwaiti", "forget": [{"question": "Who is Basil Mahfouz Al-Kuwaiti?"}]}
    httpx.post(url + "/v1/unlearning/requests", headers=ADMIN, json=body).raise_for_status()
    run_worker(settings_.data_dir, "keyword", "unused", once=True)
    yield schemathesis.openapi.from_url(url + "/openapi.json")
    server.should_exit = True
    thread.join(10)


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_server_error_and_every_answer_as_documented(api_schema, mode):
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 10
    run_checks = CHECKS + ([checks.negative_data_rejection] if mode == GenerationMode.NEGATIVE else [])
    sent: set[str] = set()
    for operation in operations:

        @settings(
            max_examples=EXAMPLES[mode],
            deadline=None,
            suppress_health_check=list(HealthCheck),
            derandomize=True,  # the same cases on every run: CI stays reproducible
            database=None,
        )
        @given(case=operation.as_strategy(generation_mode=mode))
        def fuzz(case):
            sent.add(repr((case.method, case.path, case.path_parameters, case.query, case.body)))
            case.call_and_validate(headers=ADMIN, timeout=30, checks=run_checks)

        try:
            fuzz()
        except Unsatisfiable:  # an operation with no input (GET /health): nothing to get wrong
            assert mode == GenerationMode.NEGATIVE and not operation.body and not operation.query
    if mode == GenerationMode.NEGATIVE:
        assert len(sent) >= 150  # distinct malformed requests, each answered with a documented 4xx
