"""unlearnd in front of two real vLLM servers: one dies under 64 concurrent streams and none fails."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time

import httpx
import pytest

from tests.integration.conftest import MODEL, ServerProcess, free_port, unlearnd_command
from unlearnd.engine.remote import plain_vllm_command

pytestmark = pytest.mark.integration

STREAMS = 64
TOKENS = 48
BACKEND_ENV = {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True", "VLLM_CPU_KVCACHE_SPACE": "1"}


async def _stream(client: httpx.AsyncClient, url: str, i: int) -> dict:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": f"Write a short story about a lighthouse keeper, number {i}."}],
        "max_tokens": TOKENS,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    events = []
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
        status = response.status_code
        async for line in response.aiter_lines():
            if line.startswith("data: {"):
                events.append(json.loads(line[6:]))
    finishes = [c["finish_reason"] for e in events for c in e.get("choices", []) if c.get("finish_reason")]
    usage = next((e["usage"] for e in events if e.get("usage")), None)
    errors = [e for e in events if "error" in e]
    return {"status": status, "finishes": finishes, "usage": usage, "errors": errors}


def _metrics(url: str) -> dict[str, float]:
    """vLLM's Prometheus counters and gauges by name (summed over labels)."""
    values: dict[str, float] = {}
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line and not line.startswith("#"):
            name = line.split("{")[0].split()[0]
            values[name] = values.get(name, 0.0) + float(line.split()[-1])
    return values


async def _burst(url: str, kill) -> list[dict]:
    async with httpx.AsyncClient(timeout=600) as client:
        tasks = [asyncio.create_task(_stream(client, url, i)) for i in range(STREAMS)]
        await asyncio.sleep(0)
        await kill()
        return await asyncio.gather(*tasks)


def test_one_of_two_backends_dies_under_64_streams_and_every_stream_completes(
    plain_vllm, default_model_dir, logs_dir, tmp_path
):
    port = free_port()
    dying = ServerProcess(
        plain_vllm_command(str(default_model_dir), port, MODEL), port, logs_dir / "vllm-dying.log", env=BACKEND_ENV
    ).start()
    front_port = free_port()
    cmd = unlearnd_command(
        front_port, tmp_path / "data", "--engine", "remote", "--remote-url", plain_vllm.url, "--remote-url", dying.url
    )
    front = ServerProcess(cmd, front_port, logs_dir / "unlearnd-fleet.log").start(timeout_s=600)
    served_by_dying, last_seen = [], []

    async def kill_once_streaming() -> None:
        """Kill the second backend once it has streamed a few tokens to each of its streams."""
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            metrics = _metrics(dying.url)
            last_seen[:] = [{k: v for k, v in metrics.items() if k.startswith(("vllm:num_requests", "vllm:gen"))}]
            running = metrics.get("vllm:num_requests_running", 0)
            if running >= 4 and metrics.get("vllm:generation_tokens_total", 0) >= 160:
                served_by_dying.append(metrics)
                break
            await asyncio.sleep(0.2)
        os.killpg(dying.proc.pid, signal.SIGKILL)

    try:
        results = asyncio.run(_burst(front.url, kill_once_streaming))
        log = (logs_dir / "unlearnd-fleet.log").read_text(errors="replace")
        taken_out = [line for line in log.splitlines() if "taken out" in line]
        assert served_by_dying, f"the second backend never took part: {last_seen} {taken_out}"
        assert [r["status"] for r in results] == [200] * STREAMS
        assert all(r["errors"] == [] for r in results), [r["errors"] for r in results if r["errors"]][:3]
        assert all(r["finishes"] == ["length"] for r in results)
        assert all(r["usage"]["completion_tokens"] == TOKENS for r in results)
        log = (logs_dir / "unlearnd-fleet.log").read_text(errors="replace")  # again: now with the failover
        resumed_after = [int(line.split(" after ")[1].split()[0]) for line in log.splitlines() if "goes on at" in line]
        assert "taken out" in log and max(resumed_after) >= 2  # streams cut mid-way were continued elsewhere
        after = httpx.post(
            f"{front.url}/v1/chat/completions",
            json={"model": MODEL, "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8},
            timeout=120,
        )
        assert after.status_code == 200 and httpx.get(f"{front.url}/health").status_code == 200
    finally:
        front.stop()
        dying.stop()
