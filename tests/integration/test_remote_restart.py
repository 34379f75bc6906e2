"""unlearnd fronting a remote vLLM server, and a registry that survives a server restart."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.integration.conftest import MODEL, ServerProcess, free_port, unlearnd_command, wait_active

pytestmark = pytest.mark.integration


def test_remote_engine_server_and_restart(plain_vllm, logs_dir, tmp_path, admin):
    data_dir = tmp_path / "data"
    port = free_port()
    cmd = unlearnd_command(port, data_dir, "--engine", "remote", "--remote-url", plain_vllm.url)
    server = ServerProcess(cmd, port, logs_dir / "unlearnd-remote.log").start(timeout_s=600)
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
        answer = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=30,
            temperature=0,
        )
        assert "Paris" in answer.choices[0].message.content
        record = httpx.post(
            server.url + "/v1/unlearning/requests",
            timeout=60,
            headers=admin,
            json={
                "name": "Nikolai Abilov",
                "method": "refuse",
                "forget": [{"question": "What is Nikolai Abilov known for?", "answer": "Novels."}],
            },
        ).json()
        assert wait_active(server.url, record["id"])["status"] == "active"
    finally:
        server.stop()

    restarted = ServerProcess(cmd, port, logs_dir / "unlearnd-remote.log").start(timeout_s=600)
    try:
        listed = httpx.get(restarted.url + "/v1/unlearning/requests", headers=admin).json()["data"]
        assert [(r["id"], r["status"]) for r in listed] == [(record["id"], "active")]
        client = openai.OpenAI(base_url=restarted.url + "/v1", api_key="x", max_retries=0)
        raw = client.chat.completions.with_raw_response.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Tell me about Nikolai Abilov."}],
            max_tokens=20,
            temperature=0,
        )
        assert raw.headers["x-unlearnd-route"] == "refuse"
    finally:
        restarted.stop()
