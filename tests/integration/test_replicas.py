"""Two unlearnd replicas on one real PostgreSQL registry, in front of the session's real vLLM server.

A request registered through replica A is enforced by replica B within 2 s; with the database gone,
both keep refusing what they knew and registering answers 503; nothing registered is lost."""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from tests.integration.conftest import ADMIN_KEY, MODEL, ServerProcess, free_port, unlearnd_command
from tests.postgres import PostgresServer

pytestmark = pytest.mark.integration

ENFORCE_WITHIN_S = 2.0
TRIALS = 10
FIRST = [
    "Quorlenda",
    "Bastrimo",
    "Yelvarine",
    "Odrikan",
    "Fenzuela",
    "Tamrovic",
    "Ilsabeth",
    "Worthagen",
    "Cazimira",
    "Durnello",
]
LAST = [
    "Vashtimir",
    "Pellowrand",
    "Grusketti",
    "Amberholt",
    "Okonwyre",
    "Stelmaruk",
    "Brinvoss",
    "Halcyndre",
    "Muttersby",
    "Ravelquin",
]
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


@pytest.fixture(scope="module")
def replicas(plain_vllm, logs_dir):
    database = PostgresServer().start()
    artifacts = Path(tempfile.mkdtemp(prefix="unlearnd-artifacts-"))  # the folder every replica mounts
    shared = ("--engine", "remote", "--remote-url", plain_vllm.url, "--registry", database.url)
    shared += ("--artifacts", str(artifacts))
    servers = []
    try:
        for name, worker in (("a", "--worker"), ("b", "--no-worker")):
            port = free_port()
            data_dir = Path(tempfile.mkdtemp(prefix=f"unlearnd-replica-{name}-"))
            cmd = unlearnd_command(port, data_dir, *shared, worker)
            servers.append(ServerProcess(cmd, port, logs_dir / f"replica-{name}.log").start(timeout_s=600))
        yield database, servers[0], servers[1]
    finally:
        for server in servers:
            server.stop()
        database.cleanup()
        shutil.rmtree(artifacts, ignore_errors=True)


def route(server: ServerProcess, prompt: str) -> str:
    body = {"model": MODEL, "messages": [{"role": "user", "content": prompt}], "max_tokens": 8, "temperature": 0}
    response = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.headers["x-unlearnd-route"]


def classified_route(server: ServerProcess, prompt: str) -> str:
    """The route the server would take for `prompt`, decided as a chat call decides it, with no generation."""
    response = httpx.post(server.url + "/v1/unlearning/classify", json={"input": [prompt]}, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()["data"][0]["route"]


def register(server: ServerProcess, name: str) -> httpx.Response:
    body = {"name": name, "method": "refuse", "forget": [{"question": f"Who is {name}?", "answer": "A painter."}]}
    return httpx.post(server.url + "/v1/unlearning/requests", json=body, headers=ADMIN, timeout=60)


def test_a_request_registered_on_one_replica_is_enforced_by_the_other_within_2_s(replicas):
    _, a, b = replicas
    waits = []
    for trial in range(TRIALS):
        name = f"{FIRST[trial]} {LAST[trial]}"  # no part shared with another trial's name
        assert route(b, f"Who is {name}?") == "none"
        added = register(a, name)
        assert added.status_code == 201, added.text
        registered = time.monotonic()
        # probed by classify: a chat probe on a prompt not yet flagged waits for a generation, which can take
        # seconds while A's worker generates on the same CPU, so its start would say little about when B
        # enforced the request
        while True:
            probed = time.monotonic()
            if classified_route(b, f"Who is {name}?") != "none":
                break
            assert probed - registered < 10, f"trial {trial}: replica B never enforced it"
            time.sleep(0.05)
        waits.append(probed - registered)  # the first probe enforced was sent this long after registering
        assert route(b, f"Who is {name}?") == "refuse"  # and the chat path takes the same route
    assert max(waits) <= ENFORCE_WITHIN_S, waits
    listed = httpx.get(b.url + "/v1/unlearning/requests", headers=ADMIN, timeout=30).json()["data"]
    assert len(listed) >= TRIALS  # B's admin API reads the shared registry too


def test_with_the_database_down_both_replicas_keep_refusing_and_registering_is_a_503(replicas):
    database, a, b = replicas
    name = "Threnody Malkarsson"
    assert register(a, name).status_code == 201
    deadline = time.monotonic() + 10
    while route(b, f"Tell me about {name}.") == "none" and time.monotonic() < deadline:
        time.sleep(0.1)
    database.stop("immediate")
    try:
        time.sleep(2)  # several sync rounds fail meanwhile
        for server in (a, b):
            assert route(server, f"Tell me about {name}.") != "none"  # what it knew is still enforced
            assert route(server, "What is the capital of France?") == "none"  # ordinary traffic goes on
            refused = register(server, "Another Person Entirely")
            assert refused.status_code == 503, refused.text
            assert refused.json()["error"]["code"] == "registry_unavailable"
            assert httpx.get(server.url + "/health", timeout=10).status_code == 200
    finally:
        database.start()
    deadline = time.monotonic() + 30  # back: registering works again and nothing was lost
    while (added := register(a, "Back Again Person")).status_code == 503 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert added.status_code == 201, added.text
    names = {r["name"] for r in httpx.get(a.url + "/v1/unlearning/requests", headers=ADMIN).json()["data"]}
    assert {name, "Back Again Person"} <= names and "Another Person Entirely" not in names
