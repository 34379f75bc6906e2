"""Lookups that keep a check's cost flat in the number of active requests.

The anchor search (every prompt) and the output guard (every delta) once looped over every request:
each of its titles, dates, answers' 4-grams, spread-out name forms, answer embeddings. The output
guard's loop cost about 0.9 ms per delta with 200 requests. These indexes go from what a text holds to
the few requests that could match it, and hand them back in the order they were loaded, so the first
hit found is the one the loop would have found."""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from dataclasses import dataclass

import numpy as np


class OwnerIndex:
    """Keys (an answer's 4-grams, a title's rarest word, the first letters of a hidden name form) -> the
    requests filed under them."""

    def __init__(self) -> None:
        self._owners: dict[Hashable, set[str]] = {}
        self._keys: dict[str, set[Hashable]] = {}
        self._rank: dict[str, int] = {}
        self._added = 0

    def set(self, request_id: str, keys: Iterable[Hashable]) -> None:
        self.remove(request_id)
        self._keys[request_id] = set(keys)
        self._rank[request_id] = self._added
        self._added += 1
        for key in self._keys[request_id]:
            self._owners.setdefault(key, set()).add(request_id)

    def remove(self, request_id: str) -> None:
        for key in self._keys.pop(request_id, ()):
            owners = self._owners.get(key)
            if owners is not None:
                owners.discard(request_id)
                if not owners:
                    del self._owners[key]
        self._rank.pop(request_id, None)

    def owners(self, keys: Iterable[Hashable]) -> list[str]:
        """The requests holding any of `keys`, in the order they were loaded."""
        held = self._owners.keys() & keys  # in C: a text's thousand windows mostly own nothing
        if not held:
            return []
        # .get: the detector's thread may read while a load in another thread re-files a request
        found: set[str] = set().union(*(self._owners.get(key, ()) for key in held))
        return sorted(found, key=lambda request_id: self._rank.get(request_id, -1))


PRUNE_MIN_ROWS = 2048  # below this a plain product is cheap enough
PRUNE_DIMS = 64  # principal directions of the answer embeddings the pre-check uses
_SLACK = 1e-4  # float32 rounding in the bound


class MeaningMatrix:
    """Every loaded request's forget-answer embeddings in one matrix: one product per batch of sentences.

    With a thousand requests the matrix holds 20,000 answers; a full product per sentence was a tenth
    of the front-end's time. Above `PRUNE_MIN_ROWS` the product runs first in the answers' top
    `PRUNE_DIMS` principal directions: for unit vectors, q.a = (Bq).(Ba) + (Rq).(Ra) <= (Bq).(Ba) +
    |Rq||Ra| (R: what B leaves out), so only answers whose bound reaches their threshold get the full
    product. The bound is exact whatever B is; B fits the answers loaded when it was built (refit when
    their number doubles), which keeps the bound tight (on TOFU, fit on half the authors: 0.03% of the
    other half's answers pass it for ordinary chat)."""

    def __init__(self) -> None:
        self._parts: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # insertion order = load order
        self._stack: _Stack | None = None
        self._basis: tuple[np.ndarray, int] | None = None  # (d, k) orthonormal columns, rows it was fit on

    def __bool__(self) -> bool:
        return bool(self._parts)

    def set(self, request_id: str, answers: np.ndarray, thresholds: np.ndarray) -> None:
        self._parts.pop(request_id, None)
        self._parts[request_id] = (np.asarray(answers, np.float32), np.asarray(thresholds, np.float32))
        self._stack = None

    def remove(self, request_id: str) -> None:
        if self._parts.pop(request_id, None) is not None:
            self._stack = None

    def _stacked(self) -> _Stack:
        if self._stack is None:
            order = list(self._parts)
            rows = [self._parts[r][0] for r in order]
            dim = rows[0].shape[1] if rows else 1
            matrix = np.concatenate(rows) if rows else np.zeros((0, dim), np.float32)
            thresholds = np.concatenate([self._parts[r][1] for r in order]) if rows else np.zeros(0, np.float32)
            owner = np.repeat(np.arange(len(order)), [len(r) for r in rows])
            self._stack = _Stack(matrix, thresholds, owner, order, self._pruning(matrix))
        return self._stack

    def _pruning(self, matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """(basis, answers in it, norms of what it leaves out), or None for a small matrix."""
        if len(matrix) < PRUNE_MIN_ROWS or matrix.shape[1] <= PRUNE_DIMS:
            return None
        if self._basis is None or len(matrix) >= 2 * self._basis[1] or self._basis[0].shape[0] != matrix.shape[1]:
            _, vectors = np.linalg.eigh(matrix.T.astype(np.float64) @ matrix)
            self._basis = (np.ascontiguousarray(vectors[:, ::-1][:, :PRUNE_DIMS], np.float32), len(matrix))
        basis = self._basis[0]
        low = matrix @ basis
        left_out = np.sqrt(np.maximum(0.0, (matrix * matrix).sum(1) - (low * low).sum(1)))
        return basis, low, left_out

    def prepare(self) -> None:
        """Stack (and project) the answers now, so the next check does not."""
        self._stacked()

    def first_restated(self, emb: np.ndarray) -> str | None:
        """The first loaded request one of whose answers `emb` (a unit sentence embedding) restates."""
        return self.first_restated_many(emb[None, :])[0]

    def first_restated_many(self, embs: np.ndarray, skip: str | None = None) -> list[str | None]:
        """`first_restated` of each row of `embs` (unit sentence embeddings), in one product; `skip`: a
        request left out (the others it restates still count)."""
        stack = self._stacked()
        embs = np.asarray(embs, np.float32).reshape(len(embs), -1)
        if not len(stack.matrix) or not len(embs):
            return [None] * len(embs)
        rows = np.arange(len(stack.matrix))
        if stack.pruning is not None:
            basis, low, left_out = stack.pruning
            q_low = embs @ basis
            q_left = np.sqrt(np.maximum(0.0, (embs * embs).sum(1) - (q_low * q_low).sum(1)))
            bound = low @ q_low.T + left_out[:, None] * q_left[None, :] + _SLACK
            rows = np.flatnonzero((bound >= stack.thresholds[:, None]).any(axis=1))
        hits = stack.matrix[rows] @ embs.T >= stack.thresholds[rows, None]  # (candidate rows, sentences)
        out: list[str | None] = []
        skipped = stack.order.index(skip) if skip in stack.order else -1
        for column in hits.T:
            owners = stack.owner[rows[column]]
            owners = owners[owners != skipped]
            out.append(stack.order[int(owners.min())] if len(owners) else None)
        return out


@dataclass
class _Stack:
    matrix: np.ndarray  # (rows, d) every answer embedding, requests in load order
    thresholds: np.ndarray  # (rows,)
    owner: np.ndarray  # (rows,) index into `order`
    order: list[str]
    pruning: tuple[np.ndarray, np.ndarray, np.ndarray] | None
