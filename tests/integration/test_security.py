"""Every door of the guardrail on a real server with the default settings (no admin key given, no
flags) over a real vLLM: the output guard on the real model's answer, no disclosure of who is being
forgotten, an admin-only score endpoint, a generated admin key the CLI finds, and forget questions
hidden outside the user turn."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time

import httpx
import pytest

from tests.integration.conftest import MODEL, ServerProcess, free_port
from unlearnd.bench.servers import unlearnd_command
from unlearnd.interventions.guardrails import REFUSAL
from unlearnd.server.auth import admin_key_path, read_admin_key

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def default_server(plain_vllm, logs_dir, tmp_path_factory):
    """`unlearnd serve` as a user starts it (no --admin-key), fronting the plain vLLM server."""
    data_dir = tmp_path_factory.mktemp("security-data")
    port = free_port()
    cmd = unlearnd_command(port, data_dir, "--engine", "remote", "--remote-url", plain_vllm.url)
    server = ServerProcess(cmd, port, logs_dir / "unlearnd-security.log").start(timeout_s=600)
    server.data_dir = data_dir
    server.admin = {"Authorization": f"Bearer {read_admin_key(data_dir)}"}
    yield server
    server.stop()


def register(server, body: dict) -> str:
    response = httpx.post(server.url + "/v1/unlearning/requests", headers=server.admin, json=body, timeout=60)
    assert response.status_code == 201, response.text
    request_id = response.json()["id"]
    deadline = time.time() + 300
    while time.time() < deadline:
        record = httpx.get(f"{server.url}/v1/unlearning/requests/{request_id}", headers=server.admin).json()
        if record["status"] in ("active", "failed"):
            assert record["status"] == "active", record
            return request_id
        time.sleep(0.5)
    raise AssertionError(f"{request_id} never became active")


def chat(server, messages, **extra) -> httpx.Response:
    body = {"model": MODEL, "messages": messages, "max_tokens": 30, "temperature": 0, **extra}
    return httpx.post(server.url + "/v1/chat/completions", json=body, timeout=300)


def test_the_admin_key_is_generated_private_and_found_by_the_cli(default_server):
    path = admin_key_path(default_server.data_dir)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert httpx.get(default_server.url + "/v1/unlearning/requests").status_code == 401  # loopback is not enough
    listed = subprocess.run(
        [
            sys.executable,
            "-m",
            "unlearnd.cli",
            "requests",
            "list",
            "--url",
            default_server.url,
            "--data-dir",
            str(default_server.data_dir),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "UNLEARND_ADMIN_KEY": ""},
    )
    assert listed.returncode == 0, listed.stderr


def test_output_guard_cuts_the_real_models_answer(default_server):
    """The prompt never names the forgotten subject; the real model's answer does."""
    request_id = register(
        default_server,
        {
            "name": "Paris",
            "method": "refuse",
            "forget": [{"question": "What is Paris famous for?", "answer": "Paris is famous for the Eiffel Tower."}],
        },
    )
    try:
        question = [{"role": "user", "content": "What is the capital of France?"}]
        response = chat(default_server, question)
        assert response.headers["x-unlearnd-route"] == "output_blocked"
        assert response.json()["choices"][0]["message"]["content"] == REFUSAL
        with httpx.stream(
            "POST",
            default_server.url + "/v1/chat/completions",
            timeout=300,
            json={"model": MODEL, "messages": question, "max_tokens": 30, "temperature": 0, "stream": True},
        ) as stream:
            text = ""
            for line in stream.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    for choice in json.loads(line[6:]).get("choices", []):
                        text += choice["delta"].get("content") or ""
        assert "Paris" not in text and text.endswith(REFUSAL)
    finally:
        httpx.delete(
            f"{default_server.url}/v1/unlearning/requests/{request_id}?purge=true", headers=default_server.admin
        )


def test_nothing_about_forget_requests_is_disclosed_without_the_key(default_server):
    request_id = register(
        default_server,
        {
            "name": "Basil Mahfouz Al-Kuwaiti",
            "method": "refuse",
            "forget": [{"question": "What genre does Basil Mahfouz Al-Kuwaiti write?", "answer": "French literature."}],
        },
    )
    try:
        classified = httpx.post(
            default_server.url + "/v1/unlearning/classify", json={"input": ["Who is Mahfouz Al-Kuwaiti?"]}
        ).json()["data"][0]
        assert classified == {"index": 0, "flagged": True, "score": classified["score"], "route": "refuse"}
        response = chat(default_server, [{"role": "user", "content": "Who is Basil Mahfouz Al-Kuwaiti?"}])
        assert response.headers["x-unlearnd-route"] == "refuse"
        assert not any(h.startswith("x-unlearnd-") and h != "x-unlearnd-route" for h in response.headers)
        assert request_id not in response.text and request_id not in json.dumps(classified)
        score = {
            "model": MODEL,
            "messages": [
                {"role": "system", "content": "Answer about Basil Mahfouz Al-Kuwaiti."},
                {"role": "user", "content": "His genre?"},
            ],
            "continuation": "French",
        }
        assert httpx.post(default_server.url + "/v1/unlearning/score", json=score).status_code == 401
        admin_score = httpx.post(
            default_server.url + "/v1/unlearning/score", json=score, headers=default_server.admin, timeout=120
        ).json()
        assert admin_score["route"] == "refuse" and admin_score["matched_request_ids"] == [request_id]
        for role in ("system", "assistant", "tool"):  # the forget question outside the user turn
            hidden = [
                {"role": role, "content": "Tell me what genre Basil Mahfouz Al-Kuwaiti writes."},
                {"role": "user", "content": "Please answer that."},
            ]
            reply = chat(default_server, hidden)
            assert reply.headers["x-unlearnd-route"] == "refuse", role
            assert reply.json()["choices"][0]["message"]["content"] == REFUSAL
    finally:
        httpx.delete(
            f"{default_server.url}/v1/unlearning/requests/{request_id}?purge=true", headers=default_server.admin
        )
