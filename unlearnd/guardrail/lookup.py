"""Lookups that keep the output guard's per-delta cost flat in the number of active requests.

The guard checks the whole output after every delta. A loop over every request (each of its answers'
4-grams, each of its spread-out name forms, each of its answer embeddings) made that check linear in
the number of requests: about 0.9 ms per delta with 200. These indexes go from what the output holds
to the few requests that could match it, and hand them back in the order they were loaded, so the
first block found is the one the loop would have found."""

from __future__ import annotations

from collections.abc import Hashable, Iterable

import numpy as np


class OwnerIndex:
    """Keys (an answer's 4-grams, the first letters of a hidden name form) -> the requests holding them."""

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
        found: set[str] = set()
        for key in keys:
            found |= self._owners.get(key, set())
        return sorted(found, key=self._rank.__getitem__)


class MeaningMatrix:
    """Every loaded request's forget-answer embeddings in one matrix: one product per sentence."""

    def __init__(self) -> None:
        self._parts: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # insertion order = load order
        self._stack: tuple[np.ndarray, np.ndarray, np.ndarray, list[str]] | None = None

    def __bool__(self) -> bool:
        return bool(self._parts)

    def set(self, request_id: str, answers: np.ndarray, thresholds: np.ndarray) -> None:
        self._parts.pop(request_id, None)
        self._parts[request_id] = (np.asarray(answers, np.float32), np.asarray(thresholds, np.float32))
        self._stack = None

    def remove(self, request_id: str) -> None:
        if self._parts.pop(request_id, None) is not None:
            self._stack = None

    def _stacked(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
        if self._stack is None:
            order = list(self._parts)
            rows = [self._parts[r][0] for r in order]
            dim = rows[0].shape[1] if rows else 1
            matrix = np.concatenate(rows) if rows else np.zeros((0, dim), np.float32)
            thresholds = np.concatenate([self._parts[r][1] for r in order]) if rows else np.zeros(0, np.float32)
            owner = np.repeat(np.arange(len(order)), [len(r) for r in rows])
            self._stack = (matrix, thresholds, owner, order)
        return self._stack

    def first_restated(self, emb: np.ndarray) -> str | None:
        """The first loaded request one of whose answers `emb` (a unit sentence embedding) restates."""
        matrix, thresholds, owner, order = self._stacked()
        if not len(matrix):
            return None
        hits = owner[matrix @ emb.astype(np.float32) >= thresholds]
        return order[int(hits.min())] if len(hits) else None
