"""The registry on a real PostgreSQL server (and the same checks on SQLite): one behaviour on both,
a queue several workers share without ever claiming one request twice, migrations that adopt an older
registry and run safely side by side, and a clear error when the database is gone."""

from __future__ import annotations

import multiprocessing
import sqlite3
import time
import uuid
from pathlib import Path

import pytest
import sqlalchemy

from tests.postgres import PostgresServer
from unlearnd import audit
from unlearnd.database import RegistryUnavailable
from unlearnd.domain import ForgetSpec, Method, Status
from unlearnd.registry import MAX_ATTEMPTS, Registry

pytestmark = pytest.mark.integration


def spec(name: str = "Jane Doe") -> ForgetSpec:
    return ForgetSpec(name=name, method=Method.refuse, forget=[{"question": f"Who is {name}?", "answer": "A writer."}])


@pytest.fixture(scope="module")
def postgres():
    server = PostgresServer().start()
    yield server
    server.cleanup()


def fresh_database(server: PostgresServer) -> str:
    name = "t_" + uuid.uuid4().hex[:10]
    engine = sqlalchemy.create_engine(server.url.replace("postgresql://", "postgresql+psycopg://"))
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.exec_driver_sql(f"CREATE DATABASE {name}")
    engine.dispose()
    return server.url.rsplit("/", 1)[0] + "/" + name


@pytest.fixture(params=["sqlite", "postgresql"])
def registry(request, tmp_path):
    url = fresh_database(request.getfixturevalue("postgres")) if request.param == "postgresql" else None
    registry = Registry(tmp_path / "data", url)
    yield registry
    registry.close()


def test_one_behaviour_on_both_databases(registry):
    before = registry.fingerprint()
    a, b = registry.add(spec("A Person")), registry.add(spec("B Person"))
    assert registry.fingerprint() != before and registry.get(a.id).spec == a.spec
    assert [r.id for r in registry.list([Status.pending])] == [a.id, b.id]
    assert [v[:2] for v in registry.versions()] == [(a.id, "pending"), (b.id, "pending")]
    assert registry.claim_next().id == a.id and registry.get(a.id).attempts == 1
    assert not registry.set_status(b.id, Status.ready, expect=Status.training)  # still pending: unchanged
    assert registry.set_status(b.id, Status.failed, "boom") and registry.get(b.id).error == "boom"
    assert registry.retrain(b.id).status == Status.pending
    for attempt in range(2, MAX_ATTEMPTS + 1):  # a dead worker's job goes back, then fails
        registry.recover_stale(stale_after_s=0)
        assert registry.claim_next().id == a.id and registry.get(a.id).attempts == attempt
    registry.recover_stale(stale_after_s=0)
    assert registry.get(a.id).status == Status.failed
    registry.deactivate(b.id, purge=True)
    assert not registry.exists(b.id) and not registry.artifact_dir(b.id).exists()
    with pytest.raises(KeyError):
        registry.get(b.id)
    assert registry.fingerprint()[0] == 1


def test_the_evidence_queue_on_both_databases(registry):
    """Queued, claimed once (only when active), saved only with its claim, gone with a purge."""
    a, b = registry.add(spec("A Person")), registry.add(spec("B Person"))
    registry.request_evidence(a.id)
    registry.request_evidence(b.id)
    assert registry.claim_evidence() is None  # neither active yet
    registry.set_status(b.id, Status.active)
    claimed, claim = registry.claim_evidence()
    assert claimed.id == b.id and registry.claim_evidence() is None
    assert not registry.save_evidence(b.id, "someone-else", "passing", "{}", "x", None)
    assert registry.save_evidence(b.id, claim, "failing", '{"summary": {}}', "# b\n", b"\x89PNG")
    assert registry.evidence_verdicts() == {a.id: "pending", b.id: "failing"}
    assert bytes(registry.evidence(b.id)["png"]) == b"\x89PNG"
    registry.deactivate(b.id, purge=True)
    assert registry.evidence(b.id) is None
    with pytest.raises(KeyError):
        registry.request_evidence(b.id)


def _claim_all(url: str, data_dir: str, start: float, out) -> None:
    registry = Registry(data_dir, url)
    while time.time() < start:
        time.sleep(0.001)
    claimed = []
    while (record := registry.claim_next()) is not None:
        claimed.append(record.id)
    out.put(claimed)


def test_three_workers_on_one_queue_never_claim_one_request_twice(postgres, tmp_path):
    """Three worker processes take jobs off one PostgreSQL queue at the same moment."""
    url = fresh_database(postgres)
    registry = Registry(tmp_path / "main", url)
    ids = {registry.add(spec(f"Person {i:02d}")).id for i in range(60)}
    context = multiprocessing.get_context("spawn")
    out = context.Queue()
    start = time.time() + 8  # every process imported and connected before the first claim
    workers = [context.Process(target=_claim_all, args=(url, str(tmp_path / f"w{i}"), start, out)) for i in range(3)]
    for worker in workers:
        worker.start()
    claimed = [out.get(timeout=120) for _ in workers]
    for worker in workers:
        worker.join(30)
    every = [request_id for batch in claimed for request_id in batch]
    assert sorted(every) == sorted(ids)  # each claimed once, none left
    assert sum(1 for batch in claimed if batch) >= 2  # they really shared the queue
    assert {r.status for r in registry.list()} == {Status.training}
    entries, head_seq, head_hash = registry.audit_log()  # three processes appended to one chain: no fork
    assert audit.verify(entries, head_seq, head_hash) == [] and head_seq == 120
    assert sorted(e.request_id for e in entries if e.details.get("status") == "training") == sorted(ids)


def test_migrations_adopt_an_older_sqlite_registry(tmp_path):
    """A registry file created before migrations existed keeps its requests and gets a schema version."""
    conn = sqlite3.connect(tmp_path / "registry.sqlite3")
    conn.executescript(
        "CREATE TABLE forget_requests (id TEXT PRIMARY KEY, name TEXT NOT NULL, method TEXT NOT NULL, "
        "status TEXT NOT NULL, error TEXT, created_at REAL NOT NULL, updated_at REAL NOT NULL, heartbeat REAL, "
        "attempts INTEGER NOT NULL DEFAULT 0, spec TEXT NOT NULL);"
        "CREATE INDEX forget_requests_status ON forget_requests(status);"
    )
    conn.execute(
        "INSERT INTO forget_requests (id, name, method, status, created_at, updated_at, spec) VALUES (?,?,?,?,?,?,?)",
        ("fr-old", "Old Person", "refuse", "active", 1.0, 1.0, spec("Old Person").model_dump_json()),
    )
    conn.commit()
    conn.close()
    registry = Registry(tmp_path)
    assert registry.get("fr-old").status == Status.active and registry.get("fr-old").name == "Old Person"
    with sqlite3.connect(tmp_path / "registry.sqlite3") as check:
        newest = sorted(p.name[:4] for p in (Path(audit.__file__).parent / "migrations" / "versions").glob("0*.py"))
        assert check.execute("SELECT version_num FROM alembic_version").fetchall() == [(newest[-1],)]
        columns = [row[1] for row in check.execute("PRAGMA table_info(forget_requests)")]
        assert "artifact_digest" in columns  # later migrations ran on the adopted table


def _open(url: str, data_dir: str, out) -> None:
    try:
        Registry(data_dir, url).add(spec())
        out.put("ok")
    except Exception as exc:  # reported to the test, not lost in the child
        out.put(repr(exc))


def test_replicas_opening_a_new_database_at_once_migrate_it_once(postgres, tmp_path):
    url = fresh_database(postgres)
    context = multiprocessing.get_context("spawn")
    out = context.Queue()
    procs = [context.Process(target=_open, args=(url, str(tmp_path / f"r{i}"), out)) for i in range(3)]
    for proc in procs:
        proc.start()
    assert [out.get(timeout=120) for _ in procs] == ["ok"] * 3
    assert Registry(tmp_path / "check", url).fingerprint()[0] == 3


def test_a_database_that_went_away_is_a_clear_error_and_comes_back(tmp_path):
    server = PostgresServer().start()  # its own server: this one is stopped
    try:
        registry = Registry(tmp_path / "data", server.url)
        kept = registry.add(spec())
        server.stop("immediate")
        started = time.monotonic()
        with pytest.raises(RegistryUnavailable, match="unavailable"):
            registry.add(spec("Another Person"))
        with pytest.raises(RegistryUnavailable):
            registry.fingerprint()
        assert time.monotonic() - started < 20  # fails fast: no hung registration or sync
        server.start()
        assert registry.get(kept.id).name == "Jane Doe"  # reconnects by itself
    finally:
        server.cleanup()


def test_a_starting_worker_leaves_a_live_workers_job_alone_on_a_shared_registry(postgres, tmp_path):
    """Alone on its SQLite registry a starting worker takes back every `training` job (their worker is
    dead); on a shared one only jobs whose heartbeat stopped, never another worker's running job."""
    from unlearnd.jobs.worker import run_worker

    url = fresh_database(postgres)
    registry = Registry(tmp_path / "a", url)
    running = registry.add(spec("Running Person"))
    assert registry.claim_next().id == running.id  # another worker's job, beating now
    run_worker(tmp_path / "b", "keyword", "unused", once=True, registry_url=url)
    assert registry.get(running.id).status == Status.training
    alone = Registry(tmp_path / "c")
    dead = alone.add(spec("Dead Worker Person"))
    alone.claim_next()
    run_worker(tmp_path / "c", "keyword", "unused", once=True)  # recovered, then trained
    assert alone.get(dead.id).status == Status.ready


def test_another_replica_hears_of_a_change_at_once(postgres, tmp_path):
    """A replica listening on the registry is told of a registration, a status change and a removal made
    elsewhere when each commits (it no longer has to wait for its next poll)."""
    import threading

    url = fresh_database(postgres)
    writer, listener = Registry(tmp_path / "a", url), Registry(tmp_path / "b", url)
    heard, stop = [], threading.Event()
    thread = threading.Thread(target=listener.listen, args=(lambda: heard.append(time.monotonic()), stop))
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not heard:  # the first call: listening has begun
            assert time.monotonic() < deadline
            time.sleep(0.01)
        for change in (
            lambda: writer.add(spec("Heard Person")),
            lambda: writer.set_status(writer.list()[0].id, Status.failed, "boom"),
            lambda: writer.deactivate(writer.list()[0].id, purge=True),
        ):
            before = len(heard)
            change()
            deadline = time.monotonic() + 5
            while len(heard) == before:
                assert time.monotonic() < deadline, "the listener was never told"
                time.sleep(0.01)
    finally:
        stop.set()
        thread.join(10)
    assert not thread.is_alive()
