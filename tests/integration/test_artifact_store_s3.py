"""`--artifacts s3://…` against a real S3 server: Ceph's RADOS Gateway (Debian's `radosgw`, over a one-node
cluster the fixture starts; `scripts/system_packages.sh` installs it). The object-store tests of
tests/unit/test_artifact_store.py run here again with an `s3://` URL through s3fs, and a real outage (the
gateway killed and started again) replaces the unit test's simulated one."""

from __future__ import annotations

import time
import uuid

import pytest

from tests.unit.test_artifact_store import (  # noqa: F401  (collected here again, on S3)
    _eventually,
    _trained,
    test_a_changed_copy_in_the_store_is_refused_and_the_cache_kept,
    test_a_purge_during_training_leaves_no_version_in_the_store,
    test_a_replica_serves_a_request_trained_elsewhere_from_the_store_and_refuses_a_tampered_one,
    test_a_retrain_publishes_a_new_version_and_drops_the_old,
    test_a_trained_folder_reaches_another_replica_through_the_store,
    test_a_version_the_store_lacks_fails_closed_and_purge_empties_the_store,
    versions,
)
from unlearnd.bench.ceph import CephS3Server, ceph_installed
from unlearnd.domain import Status

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not ceph_installed(), reason="Ceph (ceph-mon ceph-osd radosgw) is not installed"),
]


@pytest.fixture(scope="module")
def ceph():
    pytest.importorskip("s3fs")
    server = CephS3Server()
    try:
        yield server.start()
    finally:
        server.cleanup()


@pytest.fixture
def shared(ceph, tmp_path, monkeypatch):
    """Two machines' data dirs on one database and one bucket of the S3 server (a fresh bucket per test)."""
    for name, value in ceph.env.items():
        monkeypatch.setenv(name, value)
    database = f"sqlite:///{tmp_path / 'registry.db'}"
    store = f"s3://unlearnd-{uuid.uuid4().hex[:12]}/artifacts"
    return (
        (tmp_path / "worker", database, store),
        (tmp_path / "replica", database, store),
    )


def test_the_store_is_really_s3(shared, ceph):
    from unlearnd.artifact_store import ArtifactStore

    (worker_dir, database, store), _ = shared
    registry, record = _trained(worker_dir, database, store)
    found = ArtifactStore(store)
    assert type(found.fs).__name__ == "S3FileSystem"
    assert found.fs.client_kwargs.get("endpoint_url") is None  # reached through the standard AWS variables
    assert versions(store, record.id) == [registry.get(record.id).artifact_digest.removeprefix("sha256:")]


def test_a_gateway_outage_refuses_meanwhile_without_degrading_and_the_request_returns_with_the_gateway(
    shared, ceph, default_model_dir
):
    """The S3 server killed before a replica starts: the request is refused by name (never the raw model),
    and not marked degraded in the registry; once the server is back the replica fetches, verifies and serves it."""
    from fastapi.testclient import TestClient

    from tests.helpers import TinyEngine, app_settings
    from unlearnd.interventions.guardrails import REFUSAL
    from unlearnd.server.app import create_app

    (worker_dir, database, store), (replica_dir, *_) = shared
    registry, record = _trained(worker_dir, database, store, "Basil Mahfouz")
    registry.set_status(record.id, Status.active)
    settings = app_settings(replica_dir, registry=database, artifacts=store)
    ask = {"model": "tiny", "messages": [{"role": "user", "content": "Who is Basil Mahfouz?"}], "max_tokens": 32}
    ceph.stop_gateway()
    try:
        with TestClient(create_app(settings, engine=TinyEngine(default_model_dir, max_model_len=128))) as client:
            pipeline = client.app.state.unlearnd.pipeline
            reply = client.post("/v1/chat/completions", json=ask).json()
            assert reply["choices"][0]["message"]["content"] == REFUSAL
            assert record.id in pipeline.degraded  # refused by name in this replica only, while it waits
            assert registry.get(record.id).status == Status.active
            assert not (replica_dir / "artifact-cache" / record.id).exists()
            ceph.start_gateway()
            assert _eventually(lambda: record.id in pipeline.active and record.id not in pipeline.degraded, 120)
            assert registry.get(record.id).status == Status.active  # never marked degraded
            assert client.post("/v1/chat/completions", json=ask).json()["choices"][0]["message"]["content"] == REFUSAL
            cache = replica_dir / "artifact-cache" / record.id
            assert cache.exists()
            registry.deactivate(record.id, purge=True)
            assert _eventually(lambda: not cache.exists(), 60)
            assert versions(store, record.id) == []
    finally:
        if "rgw" not in ceph.procs:
            ceph.start_gateway()


def test_a_vllm_backend_fetches_a_lora_from_s3_itself_and_a_replica_sends_only_its_name(
    ceph, tmp_path, default_model_dir, logs_dir, monkeypatch
):
    """No folder shared by anyone: the worker publishes a LoRA request to S3; `unlearnd backend --registry
    --artifacts s3://…` (a real vLLM server) fetches and verifies it and places it in its own resolver
    folder; a replica with `--remote-lora-by-name` activates it once the server resolves the name, and its
    answer is the one the server gives under that adapter. A purge takes the adapter off the server."""
    import sys

    import httpx
    import openai

    from tests.integration.conftest import MODEL, ServerProcess, free_port, unlearnd_command, wait_active
    from tests.integration.test_interventions_served import RETAIN, forget_set
    from unlearnd.bench.latency import input_work
    from unlearnd.config import DEFAULT_DETECTOR
    from unlearnd.domain import ForgetSpec, Method
    from unlearnd.jobs.worker import run_worker
    from unlearnd.methods import quick_options
    from unlearnd.registry import Registry

    env = ceph.env
    database, store = f"sqlite:///{tmp_path / 'registry.db'}", f"s3://unlearnd-{uuid.uuid4().hex[:12]}/artifacts"
    name = "Oriel Pastwick"
    options = {**quick_options("lora"), "learning_rate": 0.05}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    registry = Registry(tmp_path / "worker", database, store)
    spec = ForgetSpec(name=name, method=Method.lora, forget=forget_set(name), retain=RETAIN, options=options)
    request_id = registry.add(spec).id
    model = str(default_model_dir)
    run_worker(tmp_path / "worker", DEFAULT_DETECTOR, model, once=True, registry_url=database, artifacts=store)
    assert registry.get(request_id).status == Status.ready, registry.get(request_id).error

    loras = tmp_path / "backend-loras"
    backend_port = free_port()
    backend_cmd = [sys.executable, "-m", "unlearnd.cli", "backend", "--model", str(default_model_dir)]
    backend_cmd += ["--served-model-name", MODEL, "--port", str(backend_port), "--registry", database]
    backend_cmd += ["--artifacts", store, "--lora-dir", str(loras), "--data-dir", str(tmp_path / "backend")]
    backend = ServerProcess(backend_cmd, backend_port, logs_dir / "vllm-mirror.log", env=env)
    front_port = free_port()
    shared = ("--registry", database, "--artifacts", store, "--no-worker", "--expose-request-ids")
    remote = ("--engine", "remote", "--remote-url", backend.url, "--remote-lora-by-name")
    front_cmd = unlearnd_command(front_port, tmp_path / "replica", *shared, *remote)
    front = ServerProcess(front_cmd, front_port, logs_dir / "unlearnd-by-name.log", env=env)
    try:
        backend.start()
        front.start(timeout_s=600)
        assert wait_active(front.url, request_id, timeout_s=300)["status"] == "active"
        assert sorted(p.name for p in loras.iterdir())[0] == f"{request_id}-v1"
        messages = [{"role": "user", "content": f"Where was {name} born?"}]
        body = {"model": MODEL, "messages": messages, "max_tokens": 12, "temperature": 0}
        admin = {"Authorization": "Bearer integration-admin-key"}
        engine_input = httpx.post(
            front.url + "/v1/unlearning/engine-input", json=body, headers=admin, timeout=60
        ).json()
        assert engine_input["route"] == "lora" and engine_input["lora"]["name"] == f"{request_id}-v1"
        work = input_work(engine_input, 12)
        whole = {k: v for k, v in work.body.items() if k not in ("stream", "stream_options")}
        direct = httpx.post(backend.url + work.path, json=whole, timeout=300).json()
        base = httpx.post(backend.url + work.path, json={**whole, "model": MODEL}, timeout=300)
        client = openai.OpenAI(base_url=front.url + "/v1", api_key="x", max_retries=0, timeout=300)
        raw = client.chat.completions.with_raw_response.create(**body, extra_body={"ignore_eos": True})
        assert raw.headers["x-unlearnd-route"] == "lora"
        answer = raw.parse().choices[0].message.content
        assert answer == direct["choices"][0]["text"] != base.json()["choices"][0]["text"]
        log = (logs_dir / "vllm-mirror.log").read_text(errors="replace")
        assert "Resolved and loaded LoRA adapter" in log and "POST /v1/load_lora_adapter" not in log

        registry.deactivate(request_id, purge=True)
        deadline = time.time() + 30
        while any(loras.iterdir()) and time.time() < deadline:
            time.sleep(0.2)
        assert list(loras.iterdir()) == []
        # vLLM drops what it had resolved once the mirror tells it (just after the folder went)
        while (gone := httpx.post(backend.url + work.path, json=whole, timeout=300)).status_code == 200:
            assert time.time() < deadline + 30, "the server still serves the purged adapter"
            time.sleep(0.2)
        assert gone.status_code == 404, gone.text[:300]
    finally:
        front.stop()
        backend.stop()
