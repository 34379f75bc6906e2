"""Concurrent callers share the batched function's calls; one caller's failure stays its own."""

import asyncio
import threading

import pytest

from unlearnd.batching import MicroBatcher


def test_concurrent_callers_share_calls_and_each_gets_its_own_results():
    gate = threading.Event()
    seen: list[list[int]] = []

    def square(items: list[int]) -> list[int]:
        seen.append(list(items))
        gate.wait(5)  # the first call runs while the others queue up
        return [i * i for i in items]

    async def main() -> list[list[int]]:
        batcher = MicroBatcher(square)
        first = asyncio.ensure_future(batcher([1]))
        await asyncio.sleep(0.05)
        rest = [asyncio.ensure_future(batcher([i, i + 100])) for i in range(2, 8)]
        await asyncio.sleep(0.05)
        gate.set()
        return [await first] + [await r for r in rest]

    results = asyncio.run(main())
    assert results == [[1]] + [[i * i, (i + 100) ** 2] for i in range(2, 8)]
    assert len(seen) == 2 and seen[1] == [x for i in range(2, 8) for x in (i, i + 100)]


def test_a_failing_callers_error_does_not_reach_the_others():
    gate = threading.Event()

    def strict(items: list[int]) -> list[int]:
        gate.wait(5)
        if any(i < 0 for i in items):
            raise ValueError("negative")
        return [i + 1 for i in items]

    async def main():
        batcher = MicroBatcher(strict)
        first = asyncio.ensure_future(batcher([0]))
        await asyncio.sleep(0.05)
        good, bad, also_good = (asyncio.ensure_future(batcher(x)) for x in ([1], [-1], [2, 3]))
        await asyncio.sleep(0.05)
        gate.set()
        assert await first == [1] and await good == [2] and await also_good == [3, 4]
        with pytest.raises(ValueError):
            await bad
        assert await batcher([]) == []

    asyncio.run(main())


def test_a_lone_caller_is_served_without_waiting_and_a_new_loop_works():
    batcher = MicroBatcher(lambda items: [str(i) for i in items])
    assert asyncio.run(batcher([1, 2])) == ["1", "2"]
    assert asyncio.run(batcher([3])) == ["3"]  # nothing left over from the first loop
    assert batcher.calls == 2
