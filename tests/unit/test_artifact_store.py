"""Artifacts in an object store (`--artifacts URL`): a worker publishes, another replica fetches the version
the registry names into its own cache, and a copy that differs fails closed. fsspec's local file system
stands in for S3 here: the same code path (put, find, get, rm) with a URL, no server needed. The tests that take
the `shared` fixture run again against a real S3 server (Ceph's gateway) in
tests/integration/test_artifact_store_s3.py, so they reach the store only through its URL."""

from __future__ import annotations

import pytest

from unlearnd.artifacts import ArtifactMismatch
from unlearnd.domain import ForgetSpec, Method, Status
from unlearnd.jobs.worker import run_worker
from unlearnd.registry import Registry


def spec(name="Jane Doe"):
    return ForgetSpec(name=name, method=Method.refuse, forget=[{"question": f"Who is {name}?", "answer": "A writer."}])


def _trained(worker_dir, database: str, store: str, name: str = "Jane Doe"):
    """A registry on the shared database and store, with one request the worker has trained."""
    registry = Registry(worker_dir, database, store)
    record = registry.add(spec(name))
    run_worker(worker_dir, "keyword", "unused", once=True, registry_url=database, artifacts=store)
    return registry, record


def versions(store: str, request_id: str) -> list[str]:
    """The digests (hex) of the versions the store holds for a request."""
    from unlearnd.artifact_store import ArtifactStore

    found = ArtifactStore(store)
    found.fs.invalidate_cache()
    return sorted(version.rstrip("/").rsplit("/", 1)[-1] for version in found._versions(request_id))


def tamper(store: str, request_id: str, digest: str) -> None:
    """Change one file of a published version in place, as an attacker with write access to the store would."""
    from unlearnd.artifact_store import ArtifactStore

    found = ArtifactStore(store)
    found.fs.pipe(f"{found._version(request_id, digest)}/detector.json", b'{"tampered": true}')
    found.fs.invalidate_cache()


def store_fails_once(monkeypatch) -> list:
    """The next fetch from any store fails as an unreachable one does; the later ones go through. Returns the
    list of fetches made."""
    from unlearnd.artifact_store import ArtifactStore

    real_fetch, calls = ArtifactStore.fetch, []

    def flaky(self, *args):
        calls.append(args)
        if len(calls) == 1:
            raise OSError("store unreachable")
        return real_fetch(self, *args)

    monkeypatch.setattr(ArtifactStore, "fetch", flaky)
    return calls


@pytest.fixture
def shared(tmp_path):
    """Two machines' data dirs on one database and one store URL."""
    database = f"sqlite:///{tmp_path / 'registry.db'}"
    store = f"file://{tmp_path / 'store'}"
    return (
        (tmp_path / "worker", database, store),
        (tmp_path / "replica", database, store),
    )


def test_a_trained_folder_reaches_another_replica_through_the_store(shared):
    (worker_dir, database, store), (replica_dir, *_) = shared
    registry, record = _trained(worker_dir, database, store)
    ready = registry.get(record.id)
    assert ready.status == Status.ready and ready.artifact_digest

    replica = Registry(replica_dir, database, store)
    assert replica.artifact_dir(record.id).parent == replica_dir / "artifact-cache"
    replica.fetch_artifacts(replica.get(record.id))
    cached = replica.artifact_dir(record.id)
    assert (cached / "detector.json").read_bytes() == (registry.artifact_dir(record.id) / "detector.json").read_bytes()
    assert versions(store, record.id) == [ready.artifact_digest.removeprefix("sha256:")]


def test_a_changed_copy_in_the_store_is_refused_and_the_cache_kept(shared):
    (worker_dir, database, store), (replica_dir, *_) = shared
    registry, record = _trained(worker_dir, database, store)
    ready = registry.get(record.id)
    replica = Registry(replica_dir, database, store)
    replica.fetch_artifacts(ready)
    good = (replica.artifact_dir(record.id) / "detector.json").read_bytes()

    tamper(store, record.id, ready.artifact_digest)
    (replica.artifact_dir(record.id) / "detector.json").write_text("stale")  # the cache no longer matches
    with pytest.raises(ArtifactMismatch):
        replica.fetch_artifacts(ready)
    assert (replica.artifact_dir(record.id) / "detector.json").read_text() == "stale"  # nothing half-installed
    assert good != b"stale"


def test_a_version_the_store_lacks_fails_closed_and_purge_empties_the_store(shared):
    (worker_dir, database, store), (replica_dir, *_) = shared
    registry, record = _trained(worker_dir, database, store)
    ready = registry.get(record.id)
    missing = ready.model_copy(update={"artifact_digest": "sha256:" + "0" * 64})
    with pytest.raises(ArtifactMismatch, match="holds no version"):
        Registry(replica_dir, database, store).fetch_artifacts(missing)

    assert versions(store, record.id) == [ready.artifact_digest.removeprefix("sha256:")]
    registry.deactivate(record.id, purge=True)
    assert versions(store, record.id) == []


def test_a_retrain_publishes_a_new_version_and_drops_the_old(shared):
    (worker_dir, database, store), _ = shared
    registry, record = _trained(worker_dir, database, store)
    first = registry.get(record.id).artifact_digest
    (registry.artifact_dir(record.id) / "extra.json").write_text("{}")
    second = registry.record_artifacts(record.id)
    assert second != first
    assert versions(store, record.id) == [second.removeprefix("sha256:")]


def test_a_replica_serves_a_request_trained_elsewhere_from_the_store_and_refuses_a_tampered_one(
    shared, default_model_dir
):
    from fastapi.testclient import TestClient

    from tests.helpers import ADMIN, TinyEngine, app_settings
    from unlearnd.interventions.guardrails import REFUSAL
    from unlearnd.server.app import create_app

    (worker_dir, database, store), (replica_dir, *_) = shared
    registry, record = _trained(worker_dir, database, store, "Basil Mahfouz")
    settings = app_settings(replica_dir, registry=database, artifacts=store)
    ask = {"model": "tiny", "messages": [{"role": "user", "content": "Who is Basil Mahfouz?"}], "max_tokens": 32}
    with TestClient(create_app(settings, engine=TinyEngine(default_model_dir, max_model_len=128))) as client:
        pipeline = client.app.state.unlearnd.pipeline
        assert _eventually(lambda: record.id in pipeline.active and record.id not in pipeline.degraded)
        assert (replica_dir / "artifact-cache" / record.id / "detector.json").exists()
        reply = client.post("/v1/chat/completions", json=ask).json()
        assert reply["choices"][0]["message"]["content"] == REFUSAL
        assert client.get(f"/v1/unlearning/requests/{record.id}", headers=ADMIN).json()["status"] == "active"

    # The store's copy changed and the replica's cache is gone: a fresh start refuses by name (degraded).
    tamper(store, record.id, registry.get(record.id).artifact_digest)
    import shutil

    shutil.rmtree(replica_dir / "artifact-cache" / record.id)
    with TestClient(create_app(settings, engine=TinyEngine(default_model_dir, max_model_len=128))) as client:
        pipeline = client.app.state.unlearnd.pipeline
        assert _eventually(lambda: record.id in pipeline.degraded)
        reply = client.post("/v1/chat/completions", json=ask).json()
        assert reply["choices"][0]["message"]["content"] == REFUSAL


def _eventually(condition, timeout_s: float = 30.0) -> bool:
    import time

    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def test_an_object_key_that_climbs_out_of_its_version_is_refused_and_writes_nothing(tmp_path):
    """The store is not trusted: a key with `..` must not write outside the cache (it did before the check)."""
    from unlearnd.artifact_store import ArtifactStore

    store = ArtifactStore("memory://unlearnd-test-traversal")
    folder = tmp_path / "made"
    folder.mkdir()
    (folder / "detector.json").write_text("{}")
    digest = store.publish("fr-1", folder)
    version = f"{store.root}/fr-1/{digest.removeprefix('sha256:')}"
    store.fs.pipe(f"{version}/../../../escaped.txt", b"pwned")
    cache = tmp_path / "deep" / "cache"
    with pytest.raises(ArtifactMismatch, match="plain relative path"):
        store.fetch("fr-1", digest, cache / "fr-1")
    assert not list(tmp_path.rglob("escaped.txt"))
    assert not (cache / "fr-1").exists()


def test_a_purge_during_training_leaves_no_version_in_the_store(shared, monkeypatch):
    from dataclasses import replace

    from unlearnd.methods import METHODS

    (worker_dir, database, store), _ = shared
    registry = Registry(worker_dir, database, store)
    record = registry.add(spec().model_copy(update={"method": Method.prompt}))

    def purge_midway(request, artifact_dir, ctx):
        (artifact_dir / "weights.bin").write_bytes(b"0" * 10)
        Registry(worker_dir, database, store).deactivate(request.id, purge=True)
        return {}

    monkeypatch.setitem(METHODS, "prompt", replace(METHODS["prompt"], job=purge_midway))
    run_worker(worker_dir, "keyword", "unused", once=True, registry_url=database, artifacts=store)
    assert versions(store, record.id) == []
    assert not registry.artifact_dir(record.id).exists()


def test_a_store_outage_refuses_meanwhile_without_marking_the_request_degraded_and_a_purge_empties_the_cache(
    shared, default_model_dir, monkeypatch
):
    from fastapi.testclient import TestClient

    from tests.helpers import TinyEngine, app_settings
    from unlearnd.interventions.guardrails import REFUSAL
    from unlearnd.server.app import create_app

    (worker_dir, database, store), (replica_dir, *_) = shared
    registry, record = _trained(worker_dir, database, store, "Basil Mahfouz")
    registry.set_status(record.id, Status.active)
    calls = store_fails_once(monkeypatch)
    settings = app_settings(replica_dir, registry=database, artifacts=store)
    ask = {"model": "tiny", "messages": [{"role": "user", "content": "Who is Basil Mahfouz?"}], "max_tokens": 32}
    with TestClient(create_app(settings, engine=TinyEngine(default_model_dir, max_model_len=128))) as client:
        pipeline = client.app.state.unlearnd.pipeline
        assert client.post("/v1/chat/completions", json=ask).json()["choices"][0]["message"]["content"] == REFUSAL
        assert _eventually(lambda: record.id in pipeline.active and record.id not in pipeline.degraded)
        assert len(calls) >= 2 and registry.get(record.id).status == Status.active  # never marked degraded
        cache = replica_dir / "artifact-cache" / record.id
        assert cache.exists()
        registry.deactivate(record.id, purge=True)  # on another machine: this replica drops its copy
        assert _eventually(lambda: not cache.exists())
