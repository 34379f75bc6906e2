"""Users first: a background call (an evidence probe) waits while users generate, gives way to one that
starts while it runs (aborted and started again), and after `max_wait_s` runs regardless."""

import asyncio
import threading
import time

from fastapi.testclient import TestClient

from tests.helpers import ADMIN, ScriptedEngine, app_settings
from unlearnd.guardrail.traffic import BACKGROUND_HEADER, Traffic
from unlearnd.server.app import create_app


def test_a_background_call_waits_for_users_and_gives_way_to_one_that_arrives():
    async def scenario():
        traffic = Traffic(max_wait_s=10)
        log: list[str] = []
        aborted: list[int] = []

        async def run(attempt: int) -> int:
            log.append(f"start {attempt}")
            await asyncio.sleep(0.2)
            log.append(f"end {attempt}")
            return attempt

        async def abort(attempt: int) -> None:
            aborted.append(attempt)

        async def user(delay: float) -> None:
            await asyncio.sleep(delay)
            async with traffic.user():
                log.append("user")
                await asyncio.sleep(0.1)

        first_user = asyncio.ensure_future(user(0))
        await asyncio.sleep(0.01)
        background = asyncio.ensure_future(traffic.background(run, abort))
        await asyncio.sleep(0.05)
        assert log == ["user"]  # waits while a user generates
        second_user = asyncio.ensure_future(user(0.15))  # arrives while the probe runs
        result = await background
        await asyncio.gather(first_user, second_user)
        return result, log, aborted

    result, log, aborted = asyncio.run(scenario())
    assert result == 1 and aborted == [0]
    assert log == ["user", "start 0", "user", "start 1", "end 1"]


def test_a_background_call_runs_regardless_once_it_has_waited_long_enough():
    async def scenario():
        traffic = Traffic(max_wait_s=0.2)

        async def busy() -> None:
            async with traffic.user():
                await asyncio.sleep(1.0)

        async def run(attempt: int) -> float:
            return time.monotonic()

        async def abort(attempt: int) -> None:
            raise AssertionError("nothing to abort")

        users = asyncio.ensure_future(busy())
        await asyncio.sleep(0.01)
        start = time.monotonic()
        ran_at = await traffic.background(run, abort)
        await users
        return ran_at - start

    waited = asyncio.run(scenario())
    assert 0.15 < waited < 0.8


class SlowEngine(ScriptedEngine):
    """Each word takes 20 ms, so a probe is still generating when a user's request arrives."""

    async def generate(self, request):
        async for delta in super().generate(request):
            await asyncio.sleep(0.02)
            yield delta


def test_a_probe_marked_background_gives_way_to_a_user_and_still_gets_the_whole_reply(default_model_dir, tmp_path):
    script = " ".join(f"word{i}" for i in range(40))
    engine = SlowEngine(default_model_dir, script, max_model_len=256)
    app = create_app(app_settings(tmp_path), engine=engine)
    body = {"model": engine.model_name, "messages": [{"role": "user", "content": "Tell me a story."}]}
    with TestClient(app) as client:
        preempted_before = preempted(client)
        replies: dict[str, dict] = {}

        gave_way: dict[str, str | None] = {}

        def send(kind: str, headers: dict) -> None:
            response = client.post("/v1/chat/completions", json=body, headers=headers)
            replies[kind], gave_way[kind] = response.json(), response.headers.get("x-unlearnd-gave-way")

        probe = threading.Thread(target=send, args=("probe", {BACKGROUND_HEADER: "background"}))
        probe.start()
        time.sleep(0.3)  # the probe is generating
        send("user", {})
        probe.join(30)
        text = lambda r: r["choices"][0]["message"]["content"]  # noqa: E731
        assert text(replies["user"]) == text(replies["probe"]) == script
        probe_ids = [r.request_id for r in engine.seen if r.request_id != engine.seen[1].request_id]
        assert len(engine.seen) == 3 and engine.aborted  # first attempt aborted, started again after the user
        assert engine.aborted[0] == engine.seen[0].request_id and probe_ids[-1].endswith("-1")
        assert preempted(client) == preempted_before + 1
        assert gave_way == {"probe": "1", "user": None}


def preempted(client) -> float:
    metrics = client.get("/metrics", headers=ADMIN).text
    return next(
        float(x.split()[1]) for x in metrics.splitlines() if x.startswith("unlearnd_background_preempted_total")
    )


class TimedEngine(SlowEngine):
    """Records when each generation started and when each abort came."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.started: dict[str, float] = {}
        self.aborted_at: dict[str, float] = {}

    async def abort(self, request_id: str) -> None:
        self.aborted_at[request_id] = time.monotonic()
        await super().abort(request_id)

    async def generate(self, request):
        self.started.setdefault(request.request_id, time.monotonic())
        async for delta in super().generate(request):
            yield delta


def test_a_probe_gives_way_when_a_user_arrives_not_only_once_the_users_generation_starts(
    default_model_dir, tmp_path, monkeypatch
):
    """The probe's engine step in progress should end while the user's prompt is classified, not delay its
    first token: the user counts from arrival (it counted only from its generation before)."""
    engine = TimedEngine(default_model_dir, " ".join(f"word{i}" for i in range(40)), max_model_len=256)
    app = create_app(app_settings(tmp_path), engine=engine)
    body = {"model": engine.model_name, "messages": [{"role": "user", "content": "Tell me a story."}]}
    with TestClient(app) as client:
        pipeline = client.app.state.unlearnd.pipeline
        real_prepare = pipeline.prepare

        async def slow_classification(call):
            if not call.background:
                await asyncio.sleep(0.4)
            return await real_prepare(call)

        monkeypatch.setattr(pipeline, "prepare", slow_classification)
        probe = threading.Thread(
            target=client.post,
            args=("/v1/chat/completions",),
            kwargs={"json": body, "headers": {BACKGROUND_HEADER: "background"}},
        )
        probe.start()
        time.sleep(0.3)  # the probe is generating
        client.post("/v1/chat/completions", json=body)
        probe.join(30)
    probe_first, user, probe_again = (r.request_id for r in engine.seen)  # the probe is started again after
    assert probe_again == f"{probe_first}-1"
    assert engine.aborted_at[probe_first] < engine.started[user] - 0.3


def test_a_background_call_waits_out_a_short_gap_between_users():
    async def scenario():
        traffic = Traffic(max_wait_s=10, linger_s=0.1)
        started: list[float] = []

        async def run(attempt: int) -> None:
            started.append(time.monotonic())

        async def abort(attempt: int) -> None:
            raise AssertionError("never started while a user was in flight")

        async with traffic.user():  # classification
            background = asyncio.ensure_future(traffic.background(run, abort))
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.03)  # a gap shorter than linger_s
        left = time.monotonic()
        async with traffic.user():  # generation
            await asyncio.sleep(0.05)
            left = time.monotonic()
        await background
        return started[0] - left

    assert asyncio.run(scenario()) >= 0.08
