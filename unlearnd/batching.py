"""Micro-batching: concurrent callers of one batched function share its calls.

The sentence encoder (the detector's, the output guard's meaning check) costs much the same for one
text as for a handful: a call is mostly fixed overhead on a CPU. With eight streams each ending a
sentence now and then, one call per sentence spent that overhead eight times. A `MicroBatcher` runs
one call at a time in a worker thread; whatever arrives while it runs waits for the next call and
goes in together. Nothing waits for a batch to fill: a lone caller is served at once."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


class MicroBatcher(Generic[T, R]):
    """`await batcher(items)` returns `fn(items)`, computed in one call with other callers' items."""

    def __init__(self, fn: Callable[[list[T]], Sequence[R]], max_items: int = 64):
        self.fn = fn
        self.max_items = max_items
        self._pending: list[tuple[list[T], asyncio.Future]] = []
        self._drainer: asyncio.Task | None = None  # held: the loop keeps only a weak reference to a task
        self.calls = 0  # how many times `fn` ran (batches), for tests and metrics

    async def __call__(self, items: list[T]) -> list[R]:
        if not items:
            return []
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        self._pending.append((list(items), future))
        if self._drainer is None or self._drainer.done():  # the drain ends in the same step its queue empties
            self._drainer = asyncio.get_running_loop().create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        while self._pending:
            batch, size = [], 0
            while self._pending and (not batch or size + len(self._pending[0][0]) <= self.max_items):
                items, future = self._pending.pop(0)
                batch.append((items, future))
                size += len(items)
            await self._run(batch)

    async def _run(self, batch: list[tuple[list[T], asyncio.Future]]) -> None:
        flat = [item for items, _ in batch for item in items]
        try:
            results = await asyncio.to_thread(self._call, flat)
        except Exception as exc:
            if len(batch) == 1:
                _settle(batch[0][1], error=exc)
                return
            log.warning("a batch of %d callers failed; running each caller alone", len(batch))
            for one in batch:  # only the caller whose items fail gets the error
                await self._run([one])
            return
        start = 0
        for items, future in batch:
            _settle(future, results[start : start + len(items)])
            start += len(items)

    def _call(self, items: list[T]) -> list[R]:
        self.calls += 1
        results = list(self.fn(items))
        if len(results) != len(items):
            raise RuntimeError(f"batched function returned {len(results)} results for {len(items)} items")
        return results


def _settle(future: asyncio.Future, result: object = None, error: BaseException | None = None) -> None:
    """Hand a caller its result or its error; a caller that gave up (cancelled) is skipped."""
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
