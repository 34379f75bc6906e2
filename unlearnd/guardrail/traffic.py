"""Users first: background calls (the evidence battery's probes) generate only while no user's call does.

On one engine, a probe that generates beside a user's request shares every engine step with it: a user
served during a battery waited x1.13 as long (`reports/evidence-concurrency2.md`). A background call
therefore waits until no user call is in flight, and when a user's call arrives while it runs, it gives way
at once: its generation is aborted and started again from the beginning once the engine is free (greedy
probes give the same reply again). So that a battery still ends under a load that never pauses, a call that
has waited `max_wait_s` in all runs to its end whatever arrives.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

from unlearnd.guardrail import prometheus

log = logging.getLogger(__name__)
T = TypeVar("T")

BACKGROUND_HEADER = "x-unlearnd-priority"  # "background": a non-streamed call that gives way to users


class Traffic:
    """Counts users' calls in flight (from arrival to the end of generation); runs background calls in the gaps."""

    def __init__(self, max_wait_s: float = 10.0, linger_s: float = 0.05):
        """`linger_s`: how long the engine must have been free of users before a background call starts
        (the gap between a user's classification and its generation is not one)."""
        self.max_wait_s = max_wait_s
        self.linger_s = linger_s
        self.users = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._arrival = asyncio.Event()  # set (and replaced) whenever a user's call arrives
        self._linger: asyncio.TimerHandle | None = None  # sets idle once the last user left linger_s ago

    @contextlib.asynccontextmanager
    async def user(self) -> AsyncIterator[None]:
        """Around a user's call, from its arrival (classification) to the end of its generation: background
        calls wait while any is in flight, and one running gives way as soon as a user arrives, so that its
        engine step in progress ends while the user's prompt is still being classified."""
        self.users += 1
        self._idle.clear()
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
        arrival, self._arrival = self._arrival, asyncio.Event()
        arrival.set()
        try:
            yield
        finally:
            self.users -= 1
            if self.users == 0:
                if self.linger_s > 0:
                    self._linger = asyncio.get_running_loop().call_later(self.linger_s, self._idle_if_free)
                else:
                    self._idle.set()

    def counted(self, background: bool) -> contextlib.AbstractAsyncContextManager:
        """`user()` for a user's call; nothing for a background call (it waits for users, never counts)."""
        return contextlib.nullcontext() if background else self.user()

    def _idle_if_free(self) -> None:
        self._linger = None
        if self.users == 0:
            self._idle.set()

    async def background(self, run: Callable[[int], Awaitable[T]], abort: Callable[[int], Awaitable[None]]) -> T:
        """`run(attempt)` once no user generates; a user starting meanwhile cancels it (`abort(attempt)` stops
        its engine request) and it starts again when the engine is free, until it has waited `max_wait_s`."""
        deadline = time.monotonic() + self.max_wait_s
        attempt = 0
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return await run(attempt)  # waited long enough: no more giving way
            try:
                await asyncio.wait_for(self._idle.wait(), timeout=left)
            except TimeoutError:
                return await run(attempt)
            arrival = self._arrival
            task = asyncio.ensure_future(run(attempt))
            waiter = asyncio.ensure_future(arrival.wait())
            done, _ = await asyncio.wait(
                {task, waiter}, timeout=max(deadline - time.monotonic(), 0), return_when=asyncio.FIRST_COMPLETED
            )
            if task in done or not done:  # finished, or past the deadline: let it finish
                waiter.cancel()
                return await task
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await abort(attempt)
            prometheus.BACKGROUND_PREEMPTED.inc()
            attempt += 1
