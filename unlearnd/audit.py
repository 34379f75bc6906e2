"""The audit trail: who did what to which forget request, in a log that shows any later change.

Every admin action (register, retrain, deactivate, purge), every admin key's first use (generated or
given) and every status change is appended, in the same transaction as the change itself, as one entry:
its number, time, the actor (the admin key's id, never the key; `worker`; `server`), the action, the
request id and details (statuses, artifact digests, a hash of the registered spec: never forget
content, so an entry survives a purge). Each entry's hash
covers the entry and the hash before it, and the head row holds the last number and hash: `verify`
finds an edited entry, a removed one and a cut tail. Someone able to rewrite the whole table can also
recompute the chain: record the head hash elsewhere (`unlearnd audit verify` prints it) to pin it.
"""

from __future__ import annotations

import hashlib
import json
import time
from functools import lru_cache
from typing import Any

from pydantic import BaseModel
from sqlalchemy import Connection, insert, select, update

from unlearnd.database import AUDIT_HEAD, AUDIT_LOG

GENESIS = "0" * 64


class AuditEntry(BaseModel):
    seq: int
    at: float
    actor: str
    action: str
    request_id: str | None = None
    details: dict[str, Any]
    prev_hash: str
    hash: str


@lru_cache(maxsize=8)
def key_id(key: str) -> str:
    """How an admin key is named in the log: a prefix of its hash, never the key (computed once per key:
    every admin request is named by it)."""
    return "key:" + hashlib.sha256(key.encode()).hexdigest()[:12]


def spec_digest(spec_json: str) -> str:
    return "sha256:" + hashlib.sha256(spec_json.encode()).hexdigest()


def entry_hash(
    prev_hash: str, seq: int, at: float, actor: str, action: str, request_id: str | None, details: str
) -> str:
    body = json.dumps([prev_hash, seq, repr(at), actor, action, request_id, details], separators=(",", ":"))
    return hashlib.sha256(body.encode()).hexdigest()


def lock_head(db: Connection) -> None:
    """Take the head row's lock as a transaction's first write (a no-op update): writers queue here."""
    db.execute(update(AUDIT_HEAD).where(AUDIT_HEAD.c.id == 1).values(seq=AUDIT_HEAD.c.seq))


def append(db: Connection, actor: str, action: str, request_id: str | None, details: dict[str, Any]) -> None:
    """Add one entry inside the caller's transaction. The head row is updated first: concurrent writers
    (other replicas, workers) queue on its lock, so the chain never forks."""
    db.execute(update(AUDIT_HEAD).where(AUDIT_HEAD.c.id == 1).values(seq=AUDIT_HEAD.c.seq + 1))
    seq, prev = db.execute(select(AUDIT_HEAD.c.seq, AUDIT_HEAD.c.hash).where(AUDIT_HEAD.c.id == 1)).one()
    at, text = time.time(), json.dumps(details, sort_keys=True)
    digest = entry_hash(prev, seq, at, actor, action, request_id, text)
    row = dict(seq=seq, at=at, actor=actor, action=action, request_id=request_id, details=text)
    db.execute(insert(AUDIT_LOG).values(**row, prev_hash=prev, hash=digest))
    db.execute(update(AUDIT_HEAD).where(AUDIT_HEAD.c.id == 1).values(hash=digest))


def entries(
    db: Connection, after: int = 0, limit: int | None = None, request_id: str | None = None
) -> list[AuditEntry]:
    query = select(AUDIT_LOG).where(AUDIT_LOG.c.seq > after).order_by(AUDIT_LOG.c.seq)
    if request_id is not None:
        query = query.where(AUDIT_LOG.c.request_id == request_id)
    if limit is not None:
        query = query.limit(limit)
    return [AuditEntry(**{**dict(r._mapping), "details": json.loads(r._mapping["details"])}) for r in db.execute(query)]


def key_seen(db: Connection, key: str) -> bool:
    """Whether the log already holds the first use of admin key `key` (its id)."""
    query = select(AUDIT_LOG.c.seq).where(AUDIT_LOG.c.action == "admin_key", AUDIT_LOG.c.actor == key).limit(1)
    return db.execute(query).first() is not None


def head(db: Connection) -> tuple[int, str]:
    seq, digest = db.execute(select(AUDIT_HEAD.c.seq, AUDIT_HEAD.c.hash).where(AUDIT_HEAD.c.id == 1)).one()
    return int(seq), str(digest)


def verify(log: list[AuditEntry], head_seq: int, head_hash: str) -> list[str]:
    """What is wrong with the chain (empty: intact): entries numbered 1..n, each hash recomputed, each
    linked to the one before, the last one the head's."""
    problems, prev = [], GENESIS
    for expected, entry in enumerate(log, start=1):
        if entry.seq != expected:
            problems.append(f"entry {expected} is missing (found {entry.seq} in its place)")
            break
        text = json.dumps(entry.details, sort_keys=True)
        recomputed = entry_hash(entry.prev_hash, entry.seq, entry.at, entry.actor, entry.action, entry.request_id, text)
        if entry.prev_hash != prev:
            problems.append(f"entry {entry.seq} does not follow entry {entry.seq - 1}")
        if recomputed != entry.hash:
            problems.append(f"entry {entry.seq} was changed after it was written")
        prev = entry.hash
    if not problems and (len(log) != head_seq or prev != head_hash):
        problems.append(f"the log ends at entry {len(log)} but its head says {head_seq}: entries were removed")
    return problems
