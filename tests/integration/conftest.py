"""Integration fixtures: real servers on loopback, real vLLM, the real default model.

One plain vLLM OpenAI server and one unlearnd server (local vLLM engine) per test session;
further unlearnd servers in remote-engine mode start in seconds against the plain vLLM server.
"""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from unlearnd.bench.servers import ServerProcess, free_port  # re-exported for the tests
from unlearnd.bench.servers import unlearnd_command as _unlearnd_command
from unlearnd.config import DEFAULT_MODEL
from unlearnd.engine.remote import plain_vllm_command

ADMIN_KEY = "integration-admin-key"
MODEL = DEFAULT_MODEL


def unlearnd_command(port: int, data_dir: Path, *extra: str) -> list[str]:
    return _unlearnd_command(port, data_dir, "--admin-key", ADMIN_KEY, *extra)


@pytest.fixture(scope="session")
def logs_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("server-logs")


def vllm_env(lora_resolver_dir: Path) -> dict[str, str]:
    """A plain vLLM server's environment: adapters load at run time, through the API or, by name, from the
    resolver folder (`--remote-lora-dir`); an unknown name still gets a 404."""
    return {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True", "VLLM_LORA_RESOLVER_CACHE_DIR": str(lora_resolver_dir)}


@pytest.fixture(scope="session")
def lora_resolver_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("lora-resolver")


@pytest.fixture(scope="session")
def plain_vllm(default_model_dir, logs_dir, lora_resolver_dir):
    """A plain vLLM OpenAI server: the remote engine's backend and the reference for byte-equality."""
    port = free_port()
    cmd = plain_vllm_command(str(default_model_dir), port, MODEL)
    server = ServerProcess(cmd, port, logs_dir / "vllm.log", env=vllm_env(lora_resolver_dir))
    yield server.start()
    server.stop()


@pytest.fixture(scope="session")
def unlearnd_server(default_model_dir, logs_dir, tmp_path_factory):
    """The real unlearnd server with its in-process vLLM engine on the default model."""
    port = free_port()
    data_dir = tmp_path_factory.mktemp("unlearnd-data")
    # request ids in headers: these tests check which request decided each route (off by default)
    # small, quick evidence batteries: every request the suite registers gets one, one after another
    quick_evidence = {"UNLEARND_EVIDENCE_PER_FORM": "2", "UNLEARND_EVIDENCE_REST": "0"}
    cmd = unlearnd_command(port, data_dir, "--expose-request-ids")
    server = ServerProcess(cmd, port, logs_dir / "unlearnd.log", env=quick_evidence)
    server.data_dir = data_dir
    yield server.start()
    server.stop()


@pytest.fixture(scope="session")
def admin():
    return {"Authorization": f"Bearer {ADMIN_KEY}"}


def wait_active(url: str, request_id: str, timeout_s: float = 120) -> dict:
    deadline = time.time() + timeout_s
    record = {}
    while time.time() < deadline:
        record = httpx.get(
            f"{url}/v1/unlearning/requests/{request_id}", headers={"Authorization": f"Bearer {ADMIN_KEY}"}
        ).json()
        if record["status"] in ("active", "failed"):
            return record
        time.sleep(0.5)
    raise AssertionError(f"request {request_id} stuck in {record.get('status')}")
