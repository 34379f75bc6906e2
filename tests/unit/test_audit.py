"""The audit trail: every admin action and status change, hash-chained, checked by `unlearnd audit verify`."""

from __future__ import annotations

import json
import threading
import time

from fastapi.testclient import TestClient
from sqlalchemy import delete, update
from typer.testing import CliRunner

from tests.helpers import ADMIN, ADMIN_KEY, TinyEngine, app_settings
from unlearnd import audit
from unlearnd.cli import app as cli
from unlearnd.database import AUDIT_LOG
from unlearnd.jobs.worker import run_worker
from unlearnd.registry import Registry
from unlearnd.server.app import create_app

NAME = "Basil Mahfouz Al-Kuwaiti"


def _wait_active(client, request_id):
    deadline = time.time() + 5
    while client.get(f"/v1/unlearning/requests/{request_id}", headers=ADMIN).json()["status"] != "active":
        assert time.time() < deadline
        time.sleep(0.05)


def test_every_action_and_status_change_is_logged_by_whom_without_forget_content(tmp_path, default_model_dir):
    settings = app_settings(tmp_path / "data")
    spec = {"name": NAME, "method": "prompt", "forget": [{"question": f"Who is {NAME}?", "answer": "A novelist."}]}
    with TestClient(create_app(settings, engine=TinyEngine(default_model_dir, max_model_len=128))) as client:
        request_id = client.post("/v1/unlearning/requests", headers=ADMIN, json=spec).json()["id"]
        run_worker(settings.data_dir, "keyword", "unused", once=True)
        _wait_active(client, request_id)
        assert client.delete(f"/v1/unlearning/requests/{request_id}?purge=true", headers=ADMIN).status_code == 200
        log = client.get("/v1/unlearning/audit", headers=ADMIN).json()
        assert client.get("/v1/unlearning/audit").status_code == 401  # admin only
        exported = client.get("/v1/unlearning/audit?format=jsonl", headers=ADMIN).text.splitlines()
    steps = [(e["actor"], e["action"], e["details"].get("status")) for e in log["data"]]
    me = audit.key_id(ADMIN_KEY)
    assert steps == [
        (me, "admin_key", None),  # the key's first use (given by the operator here), by its id
        (me, "register", "pending"),
        ("worker", "status", "training"),
        ("worker", "status", "ready"),
        ("worker", "evidence_requested", None),  # the probe battery, queued for when it is active
        ("server", "status", "active"),
        (me, "status", "inactive"),
        (me, "purge", None),
    ]
    assert log["data"][3]["details"]["artifact_digest"].startswith("sha256:")
    assert log["verified"] is True and log["head"]["seq"] == 8 and len(exported) == 8
    assert log["data"][0]["details"] == {"source": "given"}
    assert all(e["request_id"] == request_id for e in log["data"][1:])  # kept after the purge
    with TestClient(create_app(settings, engine=TinyEngine(default_model_dir, max_model_len=128))):
        pass  # a restart with the same key: not logged again
    assert Registry(settings.data_dir).audit_log()[1] == 8
    text = json.dumps(log)
    assert "Basil" not in text and "novelist" not in text and ADMIN_KEY not in text  # ids and hashes only


def _chain_of(registry: Registry, n: int) -> None:
    for i in range(n):
        with registry._connect() as db:
            audit.append(db, "test", "status", f"fr-{i}", {"status": "pending"})


def test_verify_finds_an_edited_a_removed_and_a_cut_entry(tmp_path):
    registry = Registry(tmp_path)
    _chain_of(registry, 5)
    runner = CliRunner()
    intact = runner.invoke(cli, ["audit", "verify", "--data-dir", str(tmp_path)])
    assert intact.exit_code == 0 and "5 entries" in intact.output
    with registry._connect() as db:
        db.execute(update(AUDIT_LOG).where(AUDIT_LOG.c.seq == 2).values(details='{"status": "active"}'))
    edited = runner.invoke(cli, ["audit", "verify", "--data-dir", str(tmp_path)])
    assert edited.exit_code == 1 and "entry 2 was changed" in edited.output

    registry = Registry(tmp_path / "b")
    _chain_of(registry, 5)
    with registry._connect() as db:
        db.execute(delete(AUDIT_LOG).where(AUDIT_LOG.c.seq == 3))
    assert audit.verify(*registry.audit_log()) == ["entry 3 is missing (found 4 in its place)"]
    registry = Registry(tmp_path / "c")
    _chain_of(registry, 5)
    with registry._connect() as db:
        db.execute(delete(AUDIT_LOG).where(AUDIT_LOG.c.seq == 5))
    assert "entries were removed" in audit.verify(*registry.audit_log())[0]


def test_concurrent_writers_never_fork_the_chain(tmp_path):
    registry = Registry(tmp_path)
    others = [Registry(tmp_path) for _ in range(3)]  # separate engines: like other processes on one file
    threads = [threading.Thread(target=_chain_of, args=(r, 20)) for r in [registry, *others]]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    entries, head_seq, head_hash = registry.audit_log()
    assert [e.seq for e in entries] == list(range(1, 81)) and audit.verify(entries, head_seq, head_hash) == []


def test_the_audit_api_reports_a_cut_tail_as_not_verified(tmp_path, default_model_dir):
    settings = app_settings(tmp_path / "data")
    with TestClient(create_app(settings, engine=TinyEngine(default_model_dir, max_model_len=128))) as client:
        _chain_of(Registry(settings.data_dir), 3)
        assert client.get("/v1/unlearning/audit", headers=ADMIN).json()["verified"] is True
        with Registry(settings.data_dir)._connect() as db:
            db.execute(delete(AUDIT_LOG).where(AUDIT_LOG.c.seq == 4))  # the last entry
        assert client.get("/v1/unlearning/audit", headers=ADMIN).json()["verified"] is False
