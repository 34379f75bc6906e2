"""One worker per registry, jobs that can be stopped (purged, over time), nothing left by a dead server."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import threading
import time

import psutil
import pytest
from fastapi.testclient import TestClient

from tests.helpers import ADMIN, TinyEngine, app_settings
from unlearnd.domain import ForgetSpec, QAExample, Status
from unlearnd.jobs import worker
from unlearnd.methods import METHODS
from unlearnd.registry import Registry
from unlearnd.server.app import create_app
from unlearnd.server.orphans import PIDS_FILE, stop_orphans


def test_one_worker_per_data_dir(tmp_path):
    first = worker.acquire_worker_lock(tmp_path)
    assert first is not None
    assert worker.acquire_worker_lock(tmp_path, wait=False) is None  # a second trainer would wait
    first.close()
    second = worker.acquire_worker_lock(tmp_path, wait=False)
    assert second is not None
    second.close()


@pytest.fixture()
def slow_job(monkeypatch):
    """The `refuse` method with a job that takes a while, a fast heartbeat, and `_exit` recorded."""
    started, exits = threading.Event(), []

    def job(request, artifact_dir, ctx):
        started.set()
        (artifact_dir / "partial.bin").write_bytes(b"x" * 10)
        time.sleep(1.5)
        (artifact_dir / "late.bin").write_bytes(b"y")  # what a job still writes after its request went away
        return {}

    monkeypatch.setitem(METHODS, "refuse", dataclasses.replace(METHODS["refuse"], job=job))
    monkeypatch.setattr(worker, "BEAT_S", 0.05)
    monkeypatch.setattr(worker, "_exit", exits.append)
    return started, exits


def _claimed(registry: Registry, **options):
    spec = ForgetSpec(name="Jaime Vasquez", forget=[QAExample(question="Who is Jaime Vasquez?")], options=options)
    registry.add(spec)
    return registry.claim_next()


def test_a_request_purged_while_training_cancels_its_job_and_leaves_nothing(tmp_path, slow_job):
    started, exits = slow_job
    registry = Registry(tmp_path)
    request = _claimed(registry)
    job = threading.Thread(target=worker.run_job, args=(registry, request, "keyword", "unused"))
    job.start()
    assert started.wait(10)
    registry.deactivate(request.id, purge=True)
    job.join(20)
    assert exits and exits[0] == worker.JOB_CANCELLED_EXIT
    assert not registry.artifact_dir(request.id).exists() and not registry.exists(request.id)


def test_an_interrupted_purge_or_write_is_cleaned_up_at_the_next_start(tmp_path, default_model_dir):
    registry = Registry(tmp_path)
    kept = registry.add(ForgetSpec(name="Kept Person", forget=[QAExample(question="Who is Kept Person?")]))
    gone = registry.add(ForgetSpec(name="Gone Person", forget=[QAExample(question="Who is Gone Person?")]))
    with registry._connect() as db:  # the purge's first step (the row) happened, the folder removal did not
        db.exec_driver_sql("DELETE FROM forget_requests WHERE id = ?", (gone.id,))
    kept_dir = registry.artifact_dir(kept.id)
    (kept_dir / ".lora.k2x9q1").mkdir()  # a writer killed while staging an adapter folder / a JSON file
    (kept_dir / ".lora.k2x9q1" / "adapter_model.safetensors").write_bytes(b"half")
    (kept_dir / ".detector.json.a8b.tmp").write_text('{"entit')
    settings = app_settings(tmp_path, sync_interval_s=0.5)
    with TestClient(create_app(settings, engine=TinyEngine(default_model_dir, max_model_len=128))):
        pass
    assert not registry.artifact_dir(gone.id).exists() and kept_dir.exists()
    assert sorted(p.name for p in kept_dir.iterdir()) == ["spec.json"]


def test_a_job_over_its_time_is_stopped(tmp_path, slow_job):
    _, exits = slow_job
    registry = Registry(tmp_path)
    request = _claimed(registry, timeout_s=0.2)
    worker.run_job(registry, request, "keyword", "unused")
    assert worker.JOB_TIMEOUT_EXIT in exits


def test_processes_a_killed_server_left_are_stopped_at_the_next_start(tmp_path):
    orphan = subprocess.Popen(["sleep", "60"])
    try:
        started = psutil.Process(orphan.pid).create_time()
        dead_server = {"server": 999_999_999, "processes": [{"pid": orphan.pid, "started": started}]}
        (tmp_path / PIDS_FILE).write_text(json.dumps(dead_server))
        assert stop_orphans(tmp_path, timeout_s=5) == [orphan.pid]
        assert orphan.wait(5) is not None
        recycled = {"server": 999_999_999, "processes": [{"pid": orphan.pid, "started": started - 100}]}
        (tmp_path / PIDS_FILE).write_text(json.dumps(recycled))
        assert stop_orphans(tmp_path) == []  # a pid with another start time is somebody else's
    finally:
        orphan.kill()

    live = subprocess.Popen(["sleep", "60"])
    try:
        running = {
            "server": live.pid,
            "processes": [{"pid": live.pid, "started": psutil.Process(live.pid).create_time()}],
        }
        (tmp_path / PIDS_FILE).write_text(json.dumps(running))
        with pytest.raises(RuntimeError, match="another unlearnd server"):
            stop_orphans(tmp_path)
        assert live.poll() is None  # a live server is never killed
    finally:
        live.kill()


class RecordingEngine(TinyEngine):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.unloaded: list[str] = []

    async def unload_adapters(self, request_id: str) -> None:
        self.unloaded.append(request_id)


def test_a_removed_request_s_adapters_leave_the_engine(tmp_path, default_model_dir):
    settings = app_settings(tmp_path / "d")
    engine = RecordingEngine(default_model_dir, max_model_len=128)
    body = {"name": "Jaime Vasquez", "method": "refuse", "forget": [{"question": "Who is Jaime Vasquez?"}]}
    with TestClient(create_app(settings, engine=engine)) as client:
        request_id = client.post("/v1/unlearning/requests", headers=ADMIN, json=body).json()["id"]
        worker.run_worker(settings.data_dir, "keyword", "unused", once=True)
        deadline = time.time() + 5
        while Registry(settings.data_dir).get(request_id).status != Status.active:
            assert time.time() < deadline
            time.sleep(0.05)
        client.delete(f"/v1/unlearning/requests/{request_id}", headers=ADMIN, params={"purge": "true"})
        assert engine.unloaded == [request_id]
