"""Persistent forget-request registry: one database table plus one artifact folder per request.

The server, its training worker and (with PostgreSQL) other replicas and workers open the same
database (`unlearnd.database`: SQLite in the data dir by default, or `--registry postgresql://...`).
Status moves pending -> training -> ready -> active, or to failed with the error text; DELETE
deactivates (artifacts are kept until purged). Training jobs are claimed in one statement that skips
rows another worker holds (`FOR UPDATE SKIP LOCKED` on PostgreSQL; SQLite serialises writers), so
any number of workers share one queue. Artifact folders live under the data dir, or under
`--artifacts PATH`, a folder every replica mounts.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import Connection, Double, Row, String, and_, delete, func, insert, literal, or_, select, update
from sqlalchemy.exc import DBAPIError

from unlearnd import audit
from unlearnd.artifact_store import ArtifactStore, is_store_url
from unlearnd.artifacts import ArtifactMismatch, read_json, tree_digest, write_json_atomic, write_text_atomic
from unlearnd.database import EVIDENCE as E
from unlearnd.database import FORGET_REQUESTS as T
from unlearnd.database import RegistryUnavailable, migrate, open_engine, registry_url, safe_url
from unlearnd.domain import LOAD_FAILED, ForgetRequest, ForgetSpec, Status

MAX_ATTEMPTS = 3
CHANNEL = "unlearnd_registry"  # PostgreSQL NOTIFY channel: a request was added, changed or removed
log = logging.getLogger(__name__)


def open_registry(data_dir: str | Path | None = None) -> Registry:
    """The registry the CLI means: `UNLEARND_REGISTRY` / `UNLEARND_ARTIFACTS` where set (as `serve`
    reads them), in `data_dir` (default: the XDG data dir)."""
    import os

    from unlearnd.config import data_dir as default_data_dir

    return Registry(
        data_dir or default_data_dir(), os.environ.get("UNLEARND_REGISTRY"), os.environ.get("UNLEARND_ARTIFACTS")
    )


class Registry:
    def __init__(self, data_dir: str | Path, url: str | None = None, artifacts: str | Path | None = None):
        """`url`: the database (default: SQLite in `data_dir`); `artifacts`: the folder of the requests'
        artifact folders (default: `data_dir`/requests), shared by every replica when they share `url`, or
        an object-store URL (see artifact_store.py)."""
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.store = ArtifactStore(str(artifacts)) if is_store_url(artifacts) else None
        if self.store is not None:  # the replica's own copies of what the store holds
            self.artifacts_root = self.data_dir / "artifact-cache"
        else:
            self.artifacts_root = Path(artifacts) if artifacts else self.data_dir / "requests"
        self.artifacts_root.mkdir(parents=True, exist_ok=True)
        self.shared_artifacts = artifacts is not None
        self.url = registry_url(self.data_dir, url)
        self.engine = open_engine(self.url)
        with self._unavailable_as_error():
            migrate(self.engine, lock_dir=self.data_dir)

    @property
    def shared(self) -> bool:
        """Whether other servers may use this registry: a database server, or shared artifact folders."""
        return self.engine.dialect.name != "sqlite" or self.shared_artifacts

    def describe(self) -> str:
        return safe_url(self.url)

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def _unavailable_as_error(self) -> Iterator[None]:
        try:
            yield
        except DBAPIError as exc:  # unreachable, refused, timed out, locked: the caller answers 503
            raise RegistryUnavailable(f"registry {self.describe()} unavailable: {type(exc.orig).__name__}") from exc

    @contextmanager
    def _connect(self) -> Iterator[Connection]:
        """One transaction, committed when the block ends."""
        with self._unavailable_as_error(), self.engine.begin() as conn:
            yield conn

    def _record(self, db: Connection, actor: str, action: str, request_id: str | None, details: dict) -> None:
        """A change's audit entry and, on PostgreSQL, a notification to every listening replica (sent when the
        transaction commits, so nobody reads the registry before the change is in it)."""
        audit.append(db, actor, action, request_id, details)
        if db.dialect.name == "postgresql":
            db.exec_driver_sql(f"NOTIFY {CHANNEL}")

    def listen(self, on_change: Callable[[], None], stop: threading.Event) -> None:
        """Call `on_change` whenever another process changed the registry (PostgreSQL LISTEN; blocks until
        `stop`, reconnecting after a failure). The replicas' polling stays as the fallback."""
        import psycopg

        conninfo = self.engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
        while not stop.is_set():
            try:
                with psycopg.connect(conninfo, autocommit=True, connect_timeout=3) as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    on_change()  # whatever changed while no one listened
                    while not stop.is_set():
                        for _ in conn.notifies(timeout=1.0, stop_after=1):
                            try:
                                on_change()
                            except Exception:  # e.g. the event loop closed at shutdown: not a reason to stop
                                log.debug("registry change not delivered", exc_info=True)
            except psycopg.Error as exc:
                log.warning("registry notifications lost (%s); polling meanwhile", type(exc).__name__)
                stop.wait(2.0)

    def artifact_dir(self, request_id: str) -> Path:
        return self.artifacts_root / request_id

    def _row_to_model(self, row: Row) -> ForgetRequest:
        r = row._mapping
        return ForgetRequest(
            id=r["id"],
            name=r["name"],
            method=r["method"],
            status=r["status"],
            error=r["error"],
            created_at=r["created_at"],
            updated_at=r["updated_at"],
            spec=ForgetSpec.model_validate_json(r["spec"]),
            artifact_dir=str(self.artifact_dir(r["id"])),
            attempts=r["attempts"],
            artifact_digest=r["artifact_digest"],
        )

    def add(self, spec: ForgetSpec, actor: str = "system") -> ForgetRequest:
        request_id = "fr-" + uuid.uuid4().hex[:12]
        now = time.time()
        write_text_atomic(self.artifact_dir(request_id) / "spec.json", spec.model_dump_json(indent=1))
        row = dict(name=spec.name, method=spec.method.value, status=Status.pending.value, spec=spec.model_dump_json())
        details = {"method": spec.method.value, "spec": audit.spec_digest(row["spec"]), "status": Status.pending.value}
        try:
            with self._connect() as db:
                db.execute(insert(T).values(id=request_id, created_at=now, updated_at=now, **row))
                self._record(db, actor, "register", request_id, details)
        except BaseException:  # not registered: no folder of it is left (a shared one is never swept)
            shutil.rmtree(self.artifact_dir(request_id), ignore_errors=True)
            raise
        return self.get(request_id)

    def get(self, request_id: str) -> ForgetRequest:
        with self._connect() as db:
            row = db.execute(select(T).where(T.c.id == request_id)).first()
        if row is None:
            raise KeyError(request_id)
        return self._row_to_model(row)

    def _rows(self, columns: list[str] | None, statuses: list[Status] | None) -> list[Row]:
        """`columns` (all when None) of the requests in `statuses` (all when None), oldest first."""
        query = select(*(T.c[c] for c in columns)) if columns else select(T)
        if statuses:
            query = query.where(T.c.status.in_([s.value for s in statuses]))
        with self._connect() as db:
            return list(db.execute(query.order_by(T.c.created_at)))

    def list(self, statuses: list[Status] | None = None) -> list[ForgetRequest]:
        return [self._row_to_model(r) for r in self._rows(None, statuses)]

    def versions(self, statuses: list[Status] | None = None) -> list[tuple[str, str, float]]:
        """(id, status, updated_at) of every request in `statuses`, oldest first: what a server's sync
        compares with what it serves, without reading (and validating) every request's QA."""
        return [(r[0], r[1], float(r[2])) for r in self._rows(["id", "status", "updated_at"], statuses)]

    def fingerprint(self) -> tuple[int, float, float]:
        """(rows, latest updated_at, sum of updated_at): changes whenever a request is added, removed or
        changes status, so a sync that finds it unchanged has nothing to read."""
        query = select(func.count(), func.max(T.c.updated_at), func.coalesce(func.sum(T.c.updated_at), 0.0))
        with self._connect() as db:
            count, latest, total = db.execute(query).one()
        return int(count), float(latest or 0.0), float(total or 0.0)

    def set_status(
        self,
        request_id: str,
        status: Status,
        error: str | None = None,
        expect: Status | None = None,
        artifact_digest: str | None = None,
        actor: str = "system",
    ) -> bool:
        """Move a request to `status` (with the digest of the artifacts it is ready with); with `expect`, only
        if it is still in that status. The change and its audit entry are one transaction."""
        values = dict(status=status.value, error=error, updated_at=time.time())
        if artifact_digest is not None:
            values["artifact_digest"] = artifact_digest
        query = update(T).where(T.c.id == request_id).values(**values)
        if expect is not None:
            query = query.where(T.c.status == expect.value)
        details = {"status": status.value, **({"artifact_digest": artifact_digest} if artifact_digest else {})}
        with self._connect() as db:
            changed = db.execute(query).rowcount == 1
            if changed:
                self._record(db, actor, "status", request_id, details)
            return changed

    def claim_next(self) -> ForgetRequest | None:
        """Atomically take the oldest pending request for training (worker side). One statement: the
        oldest pending row that no other worker holds right now (PostgreSQL skips locked rows; SQLite
        lets one writer in at a time), moved to training; two workers never get the same request."""
        oldest = (
            select(T.c.id)
            .where(T.c.status == Status.pending.value)
            .order_by(T.c.created_at)
            .limit(1)
            .with_for_update(skip_locked=True)
            .scalar_subquery()
        )
        now = time.time()
        claim = (
            update(T)
            .where(T.c.id == oldest, T.c.status == Status.pending.value)
            .values(status=Status.training.value, heartbeat=now, updated_at=now, attempts=T.c.attempts + 1)
            .returning(T.c.id)
        )
        with self._connect() as db:
            claimed = db.execute(claim).scalar()
            if claimed is not None:
                self._record(db, "worker", "status", claimed, {"status": Status.training.value})
        return self.get(claimed) if claimed is not None else None

    def exists(self, request_id: str) -> bool:
        with self._connect() as db:
            return db.execute(select(T.c.id).where(T.c.id == request_id)).first() is not None

    def heartbeat(self, request_id: str) -> None:
        with self._connect() as db:
            db.execute(update(T).where(T.c.id == request_id).values(heartbeat=time.time()))

    def recover_stale(self, stale_after_s: float = 60.0) -> list[str]:
        """Requests whose training worker died go back to pending (or fail after MAX_ATTEMPTS)."""
        cutoff = time.time() - stale_after_s
        stale = (T.c.status == Status.training.value) & (T.c.heartbeat.is_(None) | (T.c.heartbeat < cutoff))
        with self._connect() as db:
            rows = list(db.execute(select(T.c.id, T.c.attempts, T.c.error).where(stale)))
        recovered = []
        for request_id, attempts, error in rows:
            if attempts >= MAX_ATTEMPTS and (error or "").startswith(LOAD_FAILED):
                died = f"{error}; re-training worker died {attempts} times"
                self.set_status(request_id, Status.degraded, died, expect=Status.training)  # stays refused
            elif attempts >= MAX_ATTEMPTS:
                died = f"training worker died {attempts} times"
                self.set_status(request_id, Status.failed, died, expect=Status.training)
            else:  # the error stays: a degraded request being re-trained stays refused meanwhile
                back = update(T).where(T.c.id == request_id, T.c.status == Status.training.value)
                with self._connect() as db:
                    if db.execute(back.values(status=Status.pending.value, updated_at=time.time())).rowcount:
                        self._record(db, "worker", "status", request_id, {"status": Status.pending.value})
            recovered.append(request_id)
        return recovered

    def retrain(self, request_id: str, actor: str = "system") -> ForgetRequest:
        """Send a degraded or failed request back to training. A degraded one keeps its error text (its
        load failure), which keeps it refused by name while it trains."""
        record = self.get(request_id)
        if record.status not in (Status.degraded, Status.failed):
            raise ValueError(f"only a degraded or failed request can be re-trained (this one is {record.status})")
        error = record.error if record.status == Status.degraded else None
        again = update(T).where(T.c.id == request_id, T.c.status == record.status.value)  # a deactivate meanwhile wins
        with self._connect() as db:
            changed = db.execute(
                again.values(status=Status.pending.value, error=error, attempts=0, updated_at=time.time())
            ).rowcount
            if changed:
                self._record(db, actor, "retrain", request_id, {"status": Status.pending.value})
        if not changed:
            raise ValueError(f"request {request_id} changed while it was being re-trained; try again")
        return self.get(request_id)

    def deactivate(self, request_id: str, purge: bool = False, actor: str = "system") -> ForgetRequest:
        """Deactivate (artifacts kept); with `purge`, also delete the artifacts and the record (its audit
        entries stay: they hold ids and hashes, no forget content)."""
        self.get(request_id)  # KeyError if unknown
        self.set_status(request_id, Status.inactive, actor=actor)
        record = self.get(request_id)
        if purge:  # the row goes first (one transaction); folders without a row are removed at the next start
            with self._connect() as db:
                db.execute(delete(T).where(T.c.id == request_id))
                db.execute(delete(E).where(E.c.request_id == request_id))  # probes and replies hold forget content
                self._record(db, actor, "purge", request_id, {})
            self.remove_artifacts(request_id)
        return record

    def remove_artifacts(self, request_id: str) -> None:
        """Delete a request's artifact folder (and every version of it in the store)."""
        shutil.rmtree(self.artifact_dir(request_id), ignore_errors=True)
        if self.store is not None:
            self.store.remove(request_id)

    def drop_cache(self, request_id: str) -> None:
        """Forget this replica's copy of a request no longer served (a no-op on a mounted folder)."""
        if self.store is not None:
            shutil.rmtree(self.artifact_dir(request_id), ignore_errors=True)

    def sweep_orphan_dirs(self) -> list[str]:
        """Remove artifact folders whose request is gone (a purge interrupted between its two steps) and,
        inside the others, what a killed writer left half-done (staging folders and temporary files: every
        name starting with a dot). Only for a start, when nothing else writes to these folders: never on a
        shared registry, where another replica may be registering or training right now."""
        if self.shared and self.store is None:  # a store's cache is this replica's own: swept all the same
            return []
        with self._connect() as db:
            known = set(db.execute(select(T.c.id)).scalars())
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

    def record_artifacts(self, request_id: str, actor: str = "system") -> str:
        """Store the digest of a request's folder after artifacts were written outside the worker (`unlearnd
        train ... --request`), so replicas load the new folder instead of refusing it as changed."""
        digest = self.publish_artifacts(request_id)
        query = update(T).where(T.c.id == request_id).values(artifact_digest=digest, updated_at=time.time())
        with self._connect() as db:
            if db.execute(query).rowcount:
                self._record(db, actor, "artifacts", request_id, {"artifact_digest": digest})
        self.prune_artifacts(request_id, digest)
        return digest

    def publish_artifacts(self, request_id: str) -> str:
        """The digest of a request's finished folder, uploaded first where the artifacts live in a store."""
        folder = self.artifact_dir(request_id)
        return self.store.publish(request_id, folder) if self.store is not None else tree_digest(folder)

    def prune_artifacts(self, request_id: str, keep: str) -> None:
        """Once the registry names version `keep`, the store's older versions go (a no-op on a folder)."""
        if self.store is not None:
            try:
                self.store.prune(request_id, keep)
            except Exception:  # old versions left behind cost space, not safety: the registry names the new one
                log.warning("older artifact versions of %s not deleted from the store", request_id, exc_info=True)

    def fetch_artifacts(self, request: ForgetRequest) -> bool:
        """Bring the version the registry names into this replica's cache, checked against its digest (True);
        False on a mounted folder, which the caller checks itself."""
        if self.store is None:
            return False
        if request.artifact_digest is None:  # every request in a store was published with its digest
            raise ArtifactMismatch(f"{request.id} has no artifact digest to fetch from {self.store.public_url}")
        if not self.store.fetch(request.id, request.artifact_digest, self.artifact_dir(request.id)):
            version = request.artifact_digest[:19]
            raise ArtifactMismatch(f"artifact store {self.store.public_url} holds no version {version}...")
        return True

    # -- evidence (unlearnd/evidence.py runs the probes; these keep the queue and the results) -----------
    def request_evidence(self, request_id: str, actor: str = "system") -> None:
        """Queue the request's probe battery (again): run once it is active; the last result stays readable
        until the new one replaces it. Nothing is queued for a request that is gone (KeyError)."""
        now = time.time()
        queued = {"status": "pending", "requested_at": now, "started_at": None, "claim": None, "error": None}
        exists = select(T.c.id).where(T.c.id == request_id)
        with self._connect() as db:
            if db.execute(update(E).where(E.c.request_id == request_id).values(**queued)).rowcount == 0:
                status, at = literal("pending", String(16)), literal(now, Double())
                row = select(T.c.id, status, at).where(T.c.id == request_id)  # no row if purged meanwhile
                db.execute(insert(E).from_select(["request_id", "status", "requested_at"], row))
            if db.execute(exists).first() is None:
                raise KeyError(request_id)
            self._record(db, actor, "evidence_requested", request_id, {})

    def claim_evidence(self, stale_after_s: float = 120.0) -> tuple[ForgetRequest, str] | None:
        """Take the oldest queued evidence job whose request is active (or one whose runner stopped beating):
        the request and the claim token that `save_evidence` needs."""
        now = time.time()
        stale = and_(E.c.status == "running", E.c.heartbeat < now - stale_after_s)
        waiting = or_(E.c.status == "pending", stale)
        oldest = (
            select(E.c.request_id)
            .join(T, T.c.id == E.c.request_id)
            .where(waiting, T.c.status == Status.active.value)
            .order_by(E.c.requested_at)
            .limit(1)
            .with_for_update(skip_locked=True, of=E)
            .scalar_subquery()
        )
        token = uuid.uuid4().hex
        values = dict(status="running", started_at=now, heartbeat=now, claim=token)
        with self._connect() as db:
            claimed = db.execute(
                update(E).where(E.c.request_id == oldest, waiting).values(**values).returning(E.c.request_id)
            ).scalar()
        if claimed is None:
            return None
        try:
            return self.get(claimed), token
        except KeyError:
            return None

    def evidence_heartbeat(self, request_id: str, claim: str) -> None:
        with self._connect() as db:
            db.execute(update(E).where(E.c.request_id == request_id, E.c.claim == claim).values(heartbeat=time.time()))

    def save_evidence(
        self, request_id: str, claim: str, verdict: str, report: str, markdown: str, png: bytes | None
    ) -> bool:
        """Store a finished battery (False when the request was purged, or its evidence queued again or taken
        over by another runner meanwhile: the newer run stands); the audit entry holds the verdict and the
        report's hash, not its content."""
        import hashlib

        values = dict(status="done", verdict=verdict, finished_at=time.time(), report=report, markdown=markdown)
        details = {"verdict": verdict, "report_sha256": hashlib.sha256(report.encode()).hexdigest()}
        with self._connect() as db:
            query = update(E).where(E.c.request_id == request_id, E.c.status == "running", E.c.claim == claim)
            if not db.execute(query.values(**values, png=png)).rowcount:
                return False
            self._record(db, "worker", "evidence", request_id, details)
        return True

    def evidence(self, request_id: str) -> dict | None:
        """The request's evidence row (status, verdict, report, markdown, png), or None if never queued."""
        with self._connect() as db:
            row = db.execute(select(E).where(E.c.request_id == request_id)).first()
        return dict(row._mapping) if row is not None else None

    def evidence_verdicts(self, request_id: str | None = None) -> dict[str, str]:
        """Every request's evidence (or `request_id`'s only): its verdict, or pending / running."""
        query = select(E.c.request_id, E.c.status, E.c.verdict)
        if request_id is not None:
            query = query.where(E.c.request_id == request_id)
        with self._connect() as db:
            rows = db.execute(query).all()
        return {rid: verdict if status == "done" else status for rid, status, verdict in rows}

    def note_admin_key(self, key: str, source: str) -> None:
        """Log an admin key (by its id) the first time a server uses it: generated, or given by the operator."""
        with self._connect() as db:
            audit.lock_head(db)  # first: replicas starting together with one key queue here, one logs it
            if not audit.key_seen(db, key):
                self._record(db, key, "admin_key", None, {"source": source})

    def audit_log(
        self, after: int = 0, limit: int | None = None, request_id: str | None = None
    ) -> tuple[list[audit.AuditEntry], int, str]:
        """Audit entries after number `after` (only `request_id`'s, if given), and the head (last number, hash)."""
        while True:  # an entry appended between the two reads would look like a cut tail: read again
            with self._connect() as db:
                before = audit.head(db)
                found = audit.entries(db, after, limit, request_id)
                if audit.head(db) == before:
                    return found, *before

    def load_json(self, request_id: str, name: str) -> dict | None:
        """An artifact file written by `save_json`, or None when it is missing or unreadable."""
        try:
            return read_json(self.artifact_dir(request_id) / name)
        except (OSError, ValueError):
            return None

    def save_json(self, request_id: str, name: str, payload: dict) -> Path:
        """Write an artifact file atomically, so a crash leaves the old or the new."""
        return write_json_atomic(self.artifact_dir(request_id) / name, payload)
