"""A vLLM backend that fetches its LoRA adapters from the object store itself (`unlearnd backend --registry DB
--artifacts URL`, engine/adapter_mirror.py), and replicas that then send only the adapter's name
(`--remote-lora-by-name`). fsspec's `file://` store stands in for S3 here; tests/integration runs a real vLLM
server with a real S3 server."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

import httpx
import pytest

from tests.unit.test_adapter_dir import FakeServer
from unlearnd.domain import ForgetSpec, Method, Status
from unlearnd.engine.adapter_dir import CONFIG
from unlearnd.engine.adapter_mirror import AdapterMirror
from unlearnd.engine.base import EngineError, LoRASpec
from unlearnd.engine.remote import RemoteVLLMEngine
from unlearnd.interventions.lora import LoRAArtifact
from unlearnd.registry import Registry

BASE = "/models/SmolLM2"


def _lora_request(registry: Registry, name: str = "Jane Doe", weights: bytes = b"weights") -> str:
    """A LoRA request as the worker leaves it: two pre-scaled adapters, published to the store, ready."""
    spec = ForgetSpec(name=name, method=Method.lora, forget=[{"question": f"Who is {name}?", "answer": "A writer."}])
    record = registry.add(spec)
    folder = registry.artifact_dir(record.id)
    for sub in ("lora", "lora-s0.5"):
        (folder / sub).mkdir(parents=True)
        config = {"peft_type": "LORA", "base_model_name_or_path": "/train/model", "r": 8, "target_modules": ["q_proj"]}
        (folder / sub / CONFIG).write_text(json.dumps(config))
        (folder / sub / "adapter_model.safetensors").write_bytes(weights + sub.encode())
    LoRAArtifact(folders={"1.0": "lora", "0.5": "lora-s0.5"}).write(folder)
    registry.record_artifacts(record.id)
    registry.set_status(record.id, Status.ready)
    return record.id


@pytest.fixture
def setup(tmp_path):
    """The worker's registry, and a backend's mirror on the same database and store (its own cache)."""
    database, store = f"sqlite:///{tmp_path / 'registry.db'}", f"file://{tmp_path / 'store'}"
    worker = Registry(tmp_path / "worker", database, store)
    mirror = AdapterMirror(Registry(tmp_path / "backend", database, store), tmp_path / "loras", BASE)
    return worker, mirror, tmp_path / "loras"


def test_every_scaled_adapter_is_placed_under_the_name_replicas_send_for_the_servers_base_model(setup):
    worker, mirror, loras = setup
    request_id = _lora_request(worker)
    worker.add(ForgetSpec(name="Other", method=Method.refuse, forget=[{"question": "Who?", "answer": "No."}]))
    mirror.sync_once()
    assert sorted(p.name for p in loras.iterdir()) == [f"{request_id}-v1", f"{request_id}-v1-s0.5"]
    placed = loras / f"{request_id}-v1"
    assert json.loads((placed / CONFIG).read_text())["base_model_name_or_path"] == BASE
    assert (placed / "adapter_model.safetensors").read_bytes() == b"weightslora"
    assert (mirror.registry.artifact_dir(request_id) / "lora.json").exists()  # its verified cache


def test_a_request_that_leaves_loses_its_adapters_and_the_cache(setup):
    worker, mirror, loras = setup
    request_id = _lora_request(worker)
    mirror.sync_once()
    worker.set_status(request_id, Status.active)
    mirror.sync_once()
    assert (loras / f"{request_id}-v1").exists()
    worker.deactivate(request_id, purge=True)
    mirror.sync_once()
    assert list(loras.iterdir()) == []
    assert not mirror.registry.artifact_dir(request_id).exists()


def test_a_tampered_version_is_never_placed_and_a_retrain_is(setup, caplog, monkeypatch):
    from tests.unit.test_artifact_store import tamper

    worker, mirror, loras = setup
    unloaded = _unloads(mirror, monkeypatch)
    request_id = _lora_request(worker)
    tamper(worker.store.url, request_id, worker.get(request_id).artifact_digest)
    with caplog.at_level(logging.ERROR):
        mirror.sync_once()
    assert list(loras.iterdir()) == []
    assert "ArtifactMismatch" in caplog.text
    (worker.artifact_dir(request_id) / "lora" / "adapter_model.safetensors").write_bytes(b"retrained")
    worker.record_artifacts(request_id)  # a new version, published whole
    mirror.sync_once()
    assert (loras / f"{request_id}-v1" / "adapter_model.safetensors").read_bytes() == b"retrained"
    assert unloaded == []  # nothing of it was placed before: the server cannot hold it
    (worker.artifact_dir(request_id) / "lora" / "adapter_model.safetensors").write_bytes(b"again, same name")
    worker.record_artifacts(request_id)  # same version number (a worker that lost lora.json), new weights
    mirror.sync_once()
    assert sorted(unloaded) == [f"{request_id}-v1", f"{request_id}-v1-s0.5"]  # the server drops the old weights


def _unloads(mirror: AdapterMirror, monkeypatch) -> list[str]:
    """The adapter names the mirror tells its vLLM server to drop."""
    import unlearnd.engine.adapter_mirror as module

    mirror.server_url = "http://vllm"
    unloaded: list[str] = []

    def post(url, json, timeout):
        assert url == "http://vllm/v1/unload_lora_adapter"
        unloaded.append(json["lora_name"])
        return httpx.Response(200)

    monkeypatch.setattr(module.httpx, "post", post)
    return unloaded


def test_a_restarted_mirror_removes_what_an_earlier_run_placed_for_a_request_since_purged(setup, tmp_path):
    worker, mirror, loras = setup
    kept, purged = _lora_request(worker, "Jane Doe"), _lora_request(worker, "John Roe")
    mirror.sync_once()
    worker.deactivate(purged, purge=True)  # while the backend was down
    (loras / ".fr-leftover-v1.tmp").mkdir()  # a staging folder is not an adapter: left to place_adapter
    again = AdapterMirror(mirror.registry, loras, BASE)
    again.sync_once()
    assert sorted(p.name for p in loras.iterdir() if not p.name.startswith(".")) == [f"{kept}-v1", f"{kept}-v1-s0.5"]
    assert not mirror.registry.artifact_dir(purged).exists()


def test_a_request_deactivated_between_listing_and_reading_is_not_placed(setup, monkeypatch):
    worker, mirror, loras = setup
    _lora_request(worker)
    real_get = mirror.registry.get

    def get_after_deactivation(rid):
        worker.deactivate(rid)
        return real_get(rid)

    monkeypatch.setattr(mirror.registry, "get", get_after_deactivation)
    mirror.sync_once()
    assert list(loras.iterdir()) == []


def test_an_artifact_that_is_no_lora_vllm_may_load_is_refused_once_not_retried(setup, monkeypatch):
    worker, mirror, loras = setup
    request_id = _lora_request(worker)
    config = worker.artifact_dir(request_id) / "lora" / CONFIG
    config.write_text(json.dumps({"peft_type": "LORA", "target_modules": ["embed_tokens"]}))
    worker.record_artifacts(request_id)
    fetches = []
    real_fetch = mirror.registry.fetch_artifacts
    monkeypatch.setattr(mirror.registry, "fetch_artifacts", lambda r: fetches.append(r.id) or real_fetch(r))
    mirror.sync_once()
    mirror.sync_once()
    assert list(loras.iterdir()) == [] and fetches == [request_id]


def test_a_store_it_cannot_reach_keeps_the_folder_and_is_tried_again(setup, monkeypatch):
    from tests.unit.test_artifact_store import store_fails_once

    worker, mirror, loras = setup
    first = _lora_request(worker, "Jane Doe")
    mirror.sync_once()
    second = _lora_request(worker, "John Roe")
    store_fails_once(monkeypatch)
    mirror.sync_once()
    assert (loras / f"{first}-v1").exists() and not (loras / f"{second}-v1").exists()
    mirror.sync_once()
    assert (loras / f"{second}-v1").exists()


class SlowMirrorServer(FakeServer):
    """A vLLM server whose mirror places the adapter after a few requests for it."""

    def __init__(self, misses: int):
        super().__init__(resolves=False)
        self.misses = misses

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/completions":
            self.misses -= 1
            self.resolves = self.misses < 0
        return super().__call__(request)


def _by_name(server: FakeServer) -> RemoteVLLMEngine:
    engine = RemoteVLLMEngine("http://vllm", "/nonexistent", "m", lora_by_name=True)
    engine._client = httpx.AsyncClient(base_url="http://vllm", transport=httpx.MockTransport(server))
    return engine


def test_by_name_the_engine_sends_only_the_name_and_waits_for_the_servers_mirror(tmp_path, monkeypatch):
    import unlearnd.engine.remote as remote

    monkeypatch.setattr(remote, "MIRROR_WAIT_S", 5.0)
    server = SlowMirrorServer(misses=2)
    engine = _by_name(server)

    async def run() -> None:
        await engine.connect()
        await engine.load_adapter(LoRASpec("fr-1-v1", str(tmp_path / "only-on-this-replica")))
        assert engine.holds_adapter("fr-1-v1")
        await engine.delete_adapters("fr-1")  # the request left the registry: the name is never sent again
        with pytest.raises(EngineError, match="removed"):
            await engine.load_adapter(LoRASpec("fr-1-v1", "unused"))

    asyncio.run(run())
    assert server.calls.count("/v1/completions") == 3
    assert "/v1/load_lora_adapter" not in server.calls
    assert not (tmp_path / "only-on-this-replica").exists()


def test_by_name_a_server_that_does_not_hold_the_adapter_yet_fails_the_activation_for_now(monkeypatch):
    """Retried at the next sync (refused by name meanwhile), never marked degraded for a slow mirror."""
    import unlearnd.engine.remote as remote
    from unlearnd.engine.remote import BackendFailure

    monkeypatch.setattr(remote, "MIRROR_WAIT_S", 1.0)
    engine = _by_name(FakeServer(resolves=False))

    async def run() -> None:
        await engine.connect()
        with pytest.raises(BackendFailure, match="does not hold LoRA fr-1-v1 yet"):
            await engine.load_adapter(LoRASpec("fr-1-v1", "unused"))
        assert not engine.holds_adapter("fr-1-v1")

    asyncio.run(run())


def test_a_mirror_needs_an_object_store(tmp_path):
    with pytest.raises(ValueError, match="object store"):
        AdapterMirror(Registry(tmp_path / "d"), tmp_path / "loras", BASE)


def test_by_name_and_a_shared_folder_exclude_each_other(tmp_path):
    from unlearnd.server.app import build_engine
    from unlearnd.server.settings import ServerSettings

    settings = ServerSettings(
        data_dir=Path(tmp_path), engine="remote", remote_url=["http://vllm"], remote_lora_dir=str(tmp_path),
        remote_lora_by_name=True,
    )  # fmt: skip
    with pytest.raises(ValueError, match="exclude each other"):
        build_engine(settings)
