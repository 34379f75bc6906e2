"""The registry's database: one schema, SQLite (the embedded default) or PostgreSQL (several replicas).

The table is defined once here (SQLAlchemy Core); the schema is created and changed only by the
Alembic migrations in `unlearnd/migrations`, the same for both databases, which every process runs
(under a lock) when it opens the registry. A database that cannot be reached raises
`RegistryUnavailable`: the server answers 503 and keeps enforcing what it last read."""

from __future__ import annotations

import fcntl
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import (
    Column,
    Double,
    Engine,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    event,
)
from sqlalchemy.engine import make_url

log = logging.getLogger(__name__)

METADATA = MetaData()
FORGET_REQUESTS = Table(
    "forget_requests",
    METADATA,
    Column("id", String(64), primary_key=True),
    Column("name", Text, nullable=False),
    Column("method", String(32), nullable=False),
    Column("status", String(16), nullable=False),
    Column("error", Text),
    Column("created_at", Double, nullable=False),
    Column("updated_at", Double, nullable=False),
    Column("heartbeat", Double),
    Column("attempts", Integer, nullable=False, server_default="0"),
    Column("spec", Text, nullable=False),
    Column("artifact_digest", Text),  # `artifacts.tree_digest` of the folder the worker made ready
    Index("forget_requests_status", "status"),
)
AUDIT_LOG = Table(  # `unlearnd.audit`: append-only, each entry's hash covers the one before
    "audit_log",
    METADATA,
    Column("seq", Integer, primary_key=True, autoincrement=False),
    Column("at", Double, nullable=False),
    Column("actor", String(64), nullable=False),
    Column("action", String(32), nullable=False),
    Column("request_id", String(64)),
    Column("details", Text, nullable=False),
    Column("prev_hash", String(64), nullable=False),
    Column("hash", String(64), nullable=False),
)
AUDIT_HEAD = Table(  # one row: the last entry's number and hash (writers queue on it; a cut tail shows)
    "audit_head",
    METADATA,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("seq", Integer, nullable=False),
    Column("hash", String(64), nullable=False),
)
EVIDENCE = Table(  # `unlearnd.evidence`: the probe battery's last result per request (status: pending, running, done)
    "evidence",
    METADATA,
    Column("request_id", String(64), primary_key=True),
    Column("status", String(16), nullable=False),
    Column("verdict", String(16)),  # passing | failing | error
    Column("requested_at", Double, nullable=False),
    Column("started_at", Double),
    Column("claim", String(32)),  # the running battery's token: only its runner may save the result
    Column("heartbeat", Double),
    Column("finished_at", Double),
    Column("error", Text),
    Column("report", Text),  # JSON: summary and per-probe records
    Column("markdown", Text),
    Column("png", LargeBinary),
)
SQLITE_FILE = "registry.sqlite3"
_MIGRATION_LOCK = 0x756E6C6E  # PostgreSQL advisory lock key: one process migrates at a time


class RegistryUnavailable(RuntimeError):
    """The registry's database cannot be reached (or is locked past the timeout)."""


def registry_url(data_dir: str | Path, url: str | None = None) -> str:
    """`url` (postgresql://..., sqlite:///...) or the data dir's SQLite file."""
    return url or f"sqlite:///{Path(data_dir) / SQLITE_FILE}"


def safe_url(url: str) -> str:
    """The URL without its password, for logs and errors."""
    return make_url(url).render_as_string(hide_password=True)


def open_engine(url: str) -> Engine:
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        engine = create_engine(url, connect_args={"timeout": 30})

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn, _record) -> None:  # WAL: the server reads while the worker writes
            cursor = dbapi_conn.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=FULL")
            cursor.close()

        return engine
    if parsed.get_backend_name() == "postgresql":
        if parsed.drivername == "postgresql":
            parsed = parsed.set(drivername="postgresql+psycopg")  # psycopg 3, whatever the URL says
        # a dead server must fail a call in seconds, not hang the sync or a registration
        return create_engine(parsed, pool_pre_ping=True, connect_args={"connect_timeout": 3})
    raise ValueError(f"unsupported registry URL {safe_url(url)!r}: use sqlite:///PATH or postgresql://...")


def migrate(engine: Engine, lock_dir: Path | None = None) -> None:
    """Bring the schema to the newest migration; concurrent openers wait for each other."""
    from alembic import command
    from alembic.config import Config

    logging.getLogger("alembic").setLevel(logging.WARNING)  # "running upgrade" on every open says nothing
    config = Config()
    config.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
    with _exclusive(engine, lock_dir) as conn:
        config.attributes["connection"] = conn
        command.upgrade(config, "head")


@contextmanager
def _exclusive(engine: Engine, lock_dir: Path | None) -> Iterator:
    if engine.dialect.name == "postgresql":
        with engine.begin() as conn:
            conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_MIGRATION_LOCK})")
            yield conn
        return
    lock_path = Path(lock_dir or Path(engine.url.database or ".").parent) / ".registry-migrate.lock"
    with open(lock_path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            with engine.begin() as conn:
                yield conn
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
