"""Broken artifacts on the real server with its in-process vLLM engine: each request fails closed
(degraded, refused by name) and the engine goes on serving everyone else."""

from __future__ import annotations

import shutil

import httpx
import pytest

from tests.helpers import make_random_lora
from tests.integration.conftest import MODEL, ServerProcess, free_port, unlearnd_command
from unlearnd.detectors import get_detector
from unlearnd.domain import ForgetSpec, QAExample, Status
from unlearnd.interventions.guardrails import REFUSAL
from unlearnd.interventions.lora import LoRAArtifact
from unlearnd.registry import Registry

pytestmark = pytest.mark.integration

GARBAGE = b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage" + bytes(64)  # a header length, then no header


def _register(registry: Registry, name: str, method: str):
    spec = ForgetSpec(
        name=name, method=method, forget=[QAExample(question=f"What did {name} write?", answer="Novels.")]
    )
    record = registry.add(spec)
    get_detector("keyword").fit(record, registry.artifact_dir(record.id))
    return record


def _chat(url: str, question: str) -> httpx.Response:
    body = {"model": MODEL, "messages": [{"role": "user", "content": question}], "max_tokens": 40, "temperature": 0}
    response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response


def test_broken_artifacts_fail_closed_and_the_engine_keeps_serving(default_model_dir, logs_dir, tmp_path, admin):
    data_dir = tmp_path / "data"
    registry = Registry(data_dir)
    broken = {}
    # garbage in a LoRA's weights file: it once killed vLLM's engine at the first flagged prompt
    record = _register(registry, "Ilsa Brandvold", "lora")
    (registry.artifact_dir(record.id) / "lora").mkdir()
    shutil.copy(
        make_random_lora(default_model_dir, tmp_path / "ok") / "adapter_config.json",
        registry.artifact_dir(record.id) / "lora",
    )
    (registry.artifact_dir(record.id) / "lora" / "adapter_model.safetensors").write_bytes(GARBAGE)
    LoRAArtifact(folders={"1.0": "lora"}, threshold=0.0).write(registry.artifact_dir(record.id))
    broken["Ilsa Brandvold"] = record.id
    # a well-formed adapter the engine cannot serve (rank 32 > --max-lora-rank 16): found by the engine's load
    record = _register(registry, "Tomas Okonkwo-Lind", "lora")
    make_random_lora(default_model_dir, registry.artifact_dir(record.id) / "lora", rank=32)
    LoRAArtifact(folders={"1.0": "lora"}, rank=32, lora_alpha=64, threshold=0.0).write(registry.artifact_dir(record.id))
    broken["Tomas Okonkwo-Lind"] = record.id
    # a truncated detector file
    record = _register(registry, "Renata Duskova", "prompt")
    (registry.artifact_dir(record.id) / "detector.json").write_text('{"entities": ["Ren')
    broken["Renata Duskova"] = record.id
    for request_id in broken.values():
        registry.set_status(request_id, Status.ready)

    port = free_port()
    cmd = unlearnd_command(port, data_dir, "--no-worker", "--detector", "keyword", "--expose-request-ids")
    server = ServerProcess(cmd, port, logs_dir / "unlearnd-broken.log").start(timeout_s=600)
    try:
        for name, request_id in broken.items():
            record = httpx.get(f"{server.url}/v1/unlearning/requests/{request_id}", headers=admin).json()
            assert record["status"] == "degraded" and record["error"].startswith("load failed:"), (name, record)
            for question in (f"What did {name} write?", f"Tell me about {name}'s books."):
                refused = _chat(server.url, question)
                assert refused.headers["x-unlearnd-route"] == "refuse", (name, question)
                assert refused.json()["choices"][0]["message"]["content"] == REFUSAL  # never the raw model
        assert (
            "rank"
            in httpx.get(f"{server.url}/v1/unlearning/requests/{broken['Tomas Okonkwo-Lind']}", headers=admin).json()[
                "error"
            ]
        )
        for _ in range(3):  # the engine lives: ordinary prompts are answered
            answer = _chat(server.url, "What is the capital of France?")
            assert answer.headers["x-unlearnd-route"] == "none"
            assert "Paris" in answer.json()["choices"][0]["message"]["content"]
        health = httpx.get(f"{server.url}/health", headers=admin)
        assert health.status_code == 200 and health.json()["degraded_forget_requests"] == 3
    finally:
        server.stop()
