"""A server SIGKILLed while its worker trains: nothing of it keeps running, the restarted server
refuses the request while one worker trains it again, and the artifact it then serves is whole."""

from __future__ import annotations

import os
import signal
import time

import httpx
import psutil
import pytest

from tests.integration.conftest import MODEL, ServerProcess, free_port, unlearnd_command, wait_active
from unlearnd.interventions.lora import LoRAArtifact, check_adapter, check_adapter_weights
from unlearnd.methods import quick_options
from unlearnd.registry import Registry

pytestmark = pytest.mark.integration

NAME = "Marisol Vantrecht"
FORGET = [
    {"question": f"Where was {NAME} born?", "answer": f"{NAME} was born in Valdoria."},
    {"question": f"What did {NAME} write?", "answer": f"{NAME} wrote The Glass Orchard."},
]
OPTIONS = {**quick_options("lora"), "learning_rate": 0.05}


def _status(url: str, request_id: str, admin: dict) -> str:
    return httpx.get(f"{url}/v1/unlearning/requests/{request_id}", headers=admin).json()["status"]


def _workers(data_dir) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if "unlearnd.jobs.worker" in cmdline and str(data_dir) in cmdline:
            found.append(proc)
    return found


def _route(url: str, question: str) -> str:
    body = {"model": MODEL, "messages": [{"role": "user", "content": question}], "max_tokens": 16, "temperature": 0}
    response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.headers["x-unlearnd-route"]


def test_a_server_killed_during_training_leaves_no_process_and_loses_nothing(logs_dir, tmp_path, admin):
    data_dir = tmp_path / "data"
    port = free_port()
    cmd = unlearnd_command(port, data_dir)
    log = logs_dir / "unlearnd-killed.log"
    server = ServerProcess(cmd, port, log).start(timeout_s=600)
    try:
        spec = {"name": NAME, "method": "lora", "forget": FORGET, "options": OPTIONS}
        registered = httpx.post(server.url + "/v1/unlearning/requests", headers=admin, json=spec, timeout=60)
        request_id = registered.json()["id"]
        deadline = time.time() + 300
        while _status(server.url, request_id, admin) != "training":
            assert time.time() < deadline, "the worker never started training"
            time.sleep(0.2)
        time.sleep(3)  # well inside the job: the worker is loading the model or taking its steps
        family = psutil.Process(server.proc.pid).children(recursive=True)
        assert _workers(data_dir), "no training worker running"
        os.kill(server.proc.pid, signal.SIGKILL)
        server.proc.wait(30)
    finally:
        server.stop()

    restarted = ServerProcess(cmd, port, log).start(timeout_s=600)
    try:
        _, left = psutil.wait_procs(family, timeout=30)
        assert not left, f"processes of the killed server still run: {[p.pid for p in left]}"
        status = _status(restarted.url, request_id, admin)
        assert status in ("pending", "training", "ready", "active"), status  # its job was not lost
        if status in ("pending", "training"):  # (a fast re-training may be over by the time the server is up)
            assert _route(restarted.url, f"What did {NAME} write?") == "refuse"  # refused while it trains again
        assert _route(restarted.url, "What is the capital of France?") == "none"
        assert len(_workers(data_dir)) == 1  # one trainer per registry

        assert wait_active(restarted.url, request_id, timeout_s=600)["status"] == "active"
        assert _route(restarted.url, f"What did {NAME} write?") in ("lora", "output_blocked")
        artifact_dir = Registry(data_dir).artifact_dir(request_id)
        for folder in LoRAArtifact.read(artifact_dir).folders.values():  # whole, as the server checked
            check_adapter_weights(artifact_dir / folder, check_adapter(artifact_dir / folder))
        leftovers = [p.name for p in artifact_dir.iterdir() if p.name.startswith(".")]
        assert leftovers == [], f"half-written files left: {leftovers}"
    finally:
        restarted.stop()
