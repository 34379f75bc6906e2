"""Registry persistence and the worker's failure handling: nothing registered is lost."""

from __future__ import annotations

import sqlite3
from dataclasses import replace

import pytest

from unlearnd.domain import ForgetSpec, Method, Status
from unlearnd.jobs.worker import run_worker
from unlearnd.methods import METHODS
from unlearnd.registry import MAX_ATTEMPTS, Registry


def spec(name="Jane Doe", method=Method.refuse):
    return ForgetSpec(name=name, method=method, forget=[{"question": f"Who is {name}?", "answer": "A writer."}])


def test_requests_persist_across_registry_instances(tmp_path):
    first = Registry(tmp_path)
    record = first.add(spec())
    assert record.status == Status.pending and (tmp_path / "requests" / record.id / "spec.json").exists()
    second = Registry(tmp_path)
    again = second.get(record.id)
    assert again.spec == record.spec and again.status == Status.pending
    assert [r.id for r in second.list([Status.pending])] == [record.id]


def test_claim_is_exclusive_and_ordered(tmp_path):
    registry = Registry(tmp_path)
    a, b = registry.add(spec("A Person")), registry.add(spec("B Person"))
    assert registry.claim_next().id == a.id
    assert registry.claim_next().id == b.id
    assert registry.claim_next() is None
    assert {r.status for r in registry.list()} == {Status.training}


def test_dead_worker_requests_go_back_to_pending_then_fail(tmp_path):
    registry = Registry(tmp_path)
    record = registry.add(spec())
    for attempt in range(1, MAX_ATTEMPTS + 1):
        assert registry.claim_next().id == record.id
        assert registry.get(record.id).attempts == attempt
        registry.recover_stale(stale_after_s=0)
        expected = Status.pending if attempt < MAX_ATTEMPTS else Status.failed
        assert registry.get(record.id).status == expected
    assert "died" in registry.get(record.id).error


def test_worker_trains_and_marks_ready(tmp_path):
    registry = Registry(tmp_path)
    record = registry.add(spec())
    run_worker(tmp_path, "keyword", "unused", once=True)
    done = registry.get(record.id)
    assert done.status == Status.ready
    assert (registry.artifact_dir(record.id) / "detector.json").exists()
    assert (registry.artifact_dir(record.id) / "training.json").exists()


def test_failing_job_marks_only_its_request_failed(tmp_path, monkeypatch):
    registry = Registry(tmp_path)

    def explode(request, artifact_dir, ctx):
        if request.name == "Bad Person":
            raise RuntimeError("boom")
        return {}

    monkeypatch.setitem(METHODS, "prompt", replace(METHODS["prompt"], job=explode))
    bad = registry.add(spec("Bad Person", Method.prompt))
    good = registry.add(spec("Good Person", Method.prompt))
    run_worker(tmp_path, "keyword", "unused", once=True)
    assert registry.get(bad.id).status == Status.failed
    assert registry.get(bad.id).error == "RuntimeError: boom"
    assert registry.get(good.id).status == Status.ready


def test_deactivated_while_training_is_not_revived(tmp_path, monkeypatch):
    registry = Registry(tmp_path)
    record = registry.add(spec(method=Method.prompt))

    def deactivate_midway(request, artifact_dir, ctx):
        registry.deactivate(request.id)
        return {}

    monkeypatch.setitem(METHODS, "prompt", replace(METHODS["prompt"], job=deactivate_midway))
    run_worker(tmp_path, "keyword", "unused", once=True)
    assert registry.get(record.id).status == Status.inactive


def test_purge_removes_record_and_artifacts(tmp_path):
    registry = Registry(tmp_path)
    record = registry.add(spec())
    removed = registry.deactivate(record.id, purge=True)
    assert removed.id == record.id and removed.status == Status.inactive
    assert not registry.artifact_dir(record.id).exists()
    with pytest.raises(KeyError):
        registry.get(record.id)


def test_database_is_wal_and_durable(tmp_path):
    Registry(tmp_path).add(spec())
    conn = sqlite3.connect(tmp_path / "registry.sqlite3")
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("SELECT COUNT(*) FROM forget_requests").fetchone()[0] == 1
