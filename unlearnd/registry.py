"""Persistent forget-request registry: one SQLite file plus one artifact folder per request.

Both the server and the training worker open the same database; SQLite's WAL mode lets the
server keep reading while the worker writes. Status moves pending -> training -> ready -> active,
or to failed with the error text; DELETE deactivates (artifacts are kept until purged).
"""

from __future__ import annotations

import shutil
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from unlearnd.artifacts import read_json, write_json_atomic, write_text_atomic
from unlearnd.domain import LOAD_FAILED, ForgetRequest, ForgetSpec, Status

_SCHEMA = """
CREATE TABLE IF NOT EXISTS forget_requests (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    method TEXT NOT NULL,
    status TEXT NOT NULL,
    error TEXT,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    heartbeat REAL,
    attempts INTEGER NOT NULL DEFAULT 0,
    spec TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS forget_requests_status ON forget_requests(status);
"""

MAX_ATTEMPTS = 3


class Registry:
    def __init__(self, data_dir: str | Path):
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.artifacts_root = self.data_dir / "requests"
        self.artifacts_root.mkdir(exist_ok=True)
        self.db_path = self.data_dir / "registry.sqlite3"
        self._local = threading.local()
        with self._connect() as db:
            db.executescript(_SCHEMA)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.db_path, timeout=30, isolation_level=None)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            self._local.conn = conn
        yield conn

    def artifact_dir(self, request_id: str) -> Path:
        return self.artifacts_root / request_id

    def _row_to_model(self, row: sqlite3.Row) -> ForgetRequest:
        return ForgetRequest(
            id=row["id"],
            name=row["name"],
            method=row["method"],
            status=row["status"],
            error=row["error"],
            created_at=row["created_at"],
            updated_at=row["updated_at"],
            spec=ForgetSpec.model_validate_json(row["spec"]),
            artifact_dir=str(self.artifact_dir(row["id"])),
            attempts=row["attempts"],
        )

    def add(self, spec: ForgetSpec) -> ForgetRequest:
        request_id = "fr-" + uuid.uuid4().hex[:12]
        now = time.time()
        write_text_atomic(self.artifact_dir(request_id) / "spec.json", spec.model_dump_json(indent=1))
        with self._connect() as db:
            db.execute(
                "INSERT INTO forget_requests (id, name, method, status, created_at, updated_at, spec)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (request_id, spec.name, spec.method.value, Status.pending.value, now, now, spec.model_dump_json()),
            )
        return self.get(request_id)

    def get(self, request_id: str) -> ForgetRequest:
        with self._connect() as db:
            row = db.execute("SELECT * FROM forget_requests WHERE id = ?", (request_id,)).fetchone()
        if row is None:
            raise KeyError(request_id)
        return self._row_to_model(row)

    def _rows(self, columns: str, statuses: list[Status] | None) -> list[sqlite3.Row]:
        """`columns` of the requests in `statuses` (all when None), oldest first."""
        query, params = f"SELECT {columns} FROM forget_requests", ()
        if statuses:
            query += f" WHERE status IN ({','.join('?' * len(statuses))})"
            params = tuple(s.value for s in statuses)
        with self._connect() as db:
            return db.execute(query + " ORDER BY created_at", params).fetchall()

    def list(self, statuses: list[Status] | None = None) -> list[ForgetRequest]:
        return [self._row_to_model(r) for r in self._rows("*", statuses)]

    def versions(self, statuses: list[Status] | None = None) -> list[tuple[str, str, float]]:
        """(id, status, updated_at) of every request in `statuses`, oldest first: what a server's sync
        compares with what it serves, without reading (and validating) every request's QA."""
        return [(r["id"], r["status"], float(r["updated_at"])) for r in self._rows("id, status, updated_at", statuses)]

    def fingerprint(self) -> tuple[int, float, float]:
        """(rows, latest updated_at, sum of updated_at): changes whenever a request is added, removed or
        changes status, so a sync that finds it unchanged has nothing to read."""
        with self._connect() as db:
            row = db.execute("SELECT COUNT(*), MAX(updated_at), TOTAL(updated_at) FROM forget_requests").fetchone()
        return int(row[0]), float(row[1] or 0.0), float(row[2] or 0.0)

    def set_status(
        self, request_id: str, status: Status, error: str | None = None, expect: Status | None = None
    ) -> bool:
        """Move a request to `status`; with `expect`, only if it is still in that status."""
        query = "UPDATE forget_requests SET status = ?, error = ?, updated_at = ? WHERE id = ?"
        params: tuple = (status.value, error, time.time(), request_id)
        if expect is not None:
            query += " AND status = ?"
            params += (expect.value,)
        with self._connect() as db:
            return db.execute(query, params).rowcount == 1

    def claim_next(self) -> ForgetRequest | None:
        """Atomically take the oldest pending request for training (worker side)."""
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                row = db.execute(
                    "SELECT id FROM forget_requests WHERE status = ? ORDER BY created_at LIMIT 1",
                    (Status.pending.value,),
                ).fetchone()
                if row is None:
                    db.execute("COMMIT")
                    return None
                now = time.time()
                db.execute(
                    "UPDATE forget_requests SET status = ?, heartbeat = ?, updated_at = ?,"
                    " attempts = attempts + 1 WHERE id = ?",
                    (Status.training.value, now, now, row["id"]),
                )
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        return self.get(row["id"])

    def exists(self, request_id: str) -> bool:
        with self._connect() as db:
            return db.execute("SELECT 1 FROM forget_requests WHERE id = ?", (request_id,)).fetchone() is not None

    def heartbeat(self, request_id: str) -> None:
        with self._connect() as db:
            db.execute("UPDATE forget_requests SET heartbeat = ? WHERE id = ?", (time.time(), request_id))

    def recover_stale(self, stale_after_s: float = 60.0) -> list[str]:
        """Requests whose training worker died go back to pending (or fail after MAX_ATTEMPTS)."""
        cutoff = time.time() - stale_after_s
        recovered = []
        with self._connect() as db:
            rows = db.execute(
                "SELECT id, attempts, error FROM forget_requests"
                " WHERE status = ? AND (heartbeat IS NULL OR heartbeat < ?)",
                (Status.training.value, cutoff),
            ).fetchall()
        for row in rows:
            if row["attempts"] >= MAX_ATTEMPTS and (row["error"] or "").startswith(LOAD_FAILED):
                died = f"{row['error']}; re-training worker died {row['attempts']} times"
                self.set_status(row["id"], Status.degraded, died, expect=Status.training)  # stays refused
            elif row["attempts"] >= MAX_ATTEMPTS:
                self.set_status(
                    row["id"], Status.failed, f"training worker died {row['attempts']} times", expect=Status.training
                )
            else:  # the error stays: a degraded request being re-trained stays refused meanwhile
                with self._connect() as db:
                    db.execute(
                        "UPDATE forget_requests SET status = ?, updated_at = ? WHERE id = ? AND status = ?",
                        (Status.pending.value, time.time(), row["id"], Status.training.value),
                    )
            recovered.append(row["id"])
        return recovered

    def retrain(self, request_id: str) -> ForgetRequest:
        """Send a degraded or failed request back to training. A degraded one keeps its error text (its
        load failure), which keeps it refused by name while it trains."""
        record = self.get(request_id)
        if record.status not in (Status.degraded, Status.failed):
            raise ValueError(f"only a degraded or failed request can be re-trained (this one is {record.status})")
        error = record.error if record.status == Status.degraded else None
        with self._connect() as db:  # only from the status read above (a deactivate meanwhile wins)
            changed = db.execute(
                "UPDATE forget_requests SET status = ?, error = ?, attempts = 0, updated_at = ? WHERE id = ?"
                " AND status = ?",
                (Status.pending.value, error, time.time(), request_id, record.status.value),
            ).rowcount
        if not changed:
            raise ValueError(f"request {request_id} changed while it was being re-trained; try again")
        return self.get(request_id)

    def deactivate(self, request_id: str, purge: bool = False) -> ForgetRequest:
        """Deactivate (artifacts kept); with `purge`, also delete the artifacts and the record."""
        self.get(request_id)  # KeyError if unknown
        self.set_status(request_id, Status.inactive)
        record = self.get(request_id)
        if purge:  # the row goes first (one transaction); folders without a row are removed at the next start
            with self._connect() as db:
                db.execute("DELETE FROM forget_requests WHERE id = ?", (request_id,))
            shutil.rmtree(self.artifact_dir(request_id), ignore_errors=True)
        return record

    def sweep_orphan_dirs(self) -> list[str]:
        """Remove artifact folders whose request is gone (a purge interrupted between its two steps) and,
        inside the others, what a killed writer left half-done (staging folders and temporary files: every
        name starting with a dot). Only for a start, when nothing else writes to this data dir."""
        with self._connect() as db:
            known = {row["id"] for row in db.execute("SELECT id FROM forget_requests").fetchall()}
        removed = []
        for folder in self.artifacts_root.iterdir() if self.artifacts_root.is_dir() else []:
            if folder.is_dir() and folder.name not in known:
                shutil.rmtree(folder, ignore_errors=True)
                removed.append(folder.name)
            elif folder.is_dir():
                for leftover in folder.glob(".*"):
                    if leftover.is_dir() and not leftover.is_symlink():
                        shutil.rmtree(leftover, ignore_errors=True)
                    else:
                        leftover.unlink(missing_ok=True)
                    removed.append(f"{folder.name}/{leftover.name}")
        return removed

    def load_json(self, request_id: str, name: str) -> dict | None:
        """An artifact file written by `save_json`, or None when it is missing or unreadable."""
        try:
            return read_json(self.artifact_dir(request_id) / name)
        except (OSError, ValueError):
            return None

    def save_json(self, request_id: str, name: str, payload: dict) -> Path:
        """Write an artifact file atomically, so a crash leaves the old or the new."""
        return write_json_atomic(self.artifact_dir(request_id) / name, payload)
