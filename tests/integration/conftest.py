"""Integration fixtures: real servers on loopback, real vLLM, the real default model.

One plain vLLM OpenAI server and one unlearnd server (local vLLM engine) per test session;
further unlearnd servers in remote-engine mode start in seconds against the plain vLLM server.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from unlearnd.engine.remote import plain_vllm_command

ADMIN_KEY = "integration-admin-key"
MODEL = "SmolLM2-135M-Instruct"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    def __init__(self, cmd: list[str], port: int, log_path: Path, env: dict | None = None):
        self.cmd, self.port, self.log_path = cmd, port, log_path
        self.url = f"http://127.0.0.1:{port}"
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 300) -> ServerProcess:
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT, env=self.env,
                                     start_new_session=True)
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; log:\n{self.tail()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200 and \
                        httpx.get(self.url + "/v1/models", timeout=5).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(1)
        self.stop()
        raise RuntimeError(f"server did not come up in {timeout_s}s; log:\n{self.tail()}")

    def tail(self, n: int = 60) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()


def unlearnd_command(port: int, data_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "unlearnd.cli", "serve", "--port", str(port), "--data-dir", str(data_dir),
            "--admin-key", ADMIN_KEY, *extra]


@pytest.fixture(scope="session")
def logs_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("server-logs")


@pytest.fixture(scope="session")
def plain_vllm(default_model_dir, logs_dir):
    """A plain vLLM OpenAI server: the remote engine's backend and the reference for byte-equality."""
    port = free_port()
    cmd = plain_vllm_command(str(default_model_dir), port, MODEL)
    server = ServerProcess(cmd, port, logs_dir / "vllm.log", env={"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"})
    yield server.start()
    server.stop()


@pytest.fixture(scope="session")
def unlearnd_server(default_model_dir, logs_dir, tmp_path_factory):
    """The real unlearnd server with its in-process vLLM engine on the default model."""
    port = free_port()
    data_dir = tmp_path_factory.mktemp("unlearnd-data")
    server = ServerProcess(unlearnd_command(port, data_dir), port, logs_dir / "unlearnd.log")
    server.data_dir = data_dir
    yield server.start()
    server.stop()


@pytest.fixture()
def admin():
    return {"Authorization": f"Bearer {ADMIN_KEY}"}


def wait_active(url: str, request_id: str, timeout_s: float = 120) -> dict:
    deadline = time.time() + timeout_s
    record = {}
    while time.time() < deadline:
        record = httpx.get(f"{url}/v1/unlearning/requests/{request_id}",
                           headers={"Authorization": f"Bearer {ADMIN_KEY}"}).json()
        if record["status"] in ("active", "failed"):
            return record
        time.sleep(0.5)
    raise AssertionError(f"request {request_id} stuck in {record.get('status')}")
