"""The fleet engine's placement and failover logic (the servers themselves: tests/integration/test_fleet.py)."""

from __future__ import annotations

import asyncio

import pytest
import torch

from unlearnd.engine.base import ChoiceDelta, EmbeddingTable, EngineError, EngineInput, LoRASpec, SamplingSpec
from unlearnd.engine.fleet import FleetEngine
from unlearnd.engine.remote import BackendFailure


class Letters:
    """A tokenizer whose token k reads "t<k>" (as `Scripted` streams it)."""

    def decode(self, ids: list[int]) -> str:
        return "".join(f"t{i}" for i in ids)


def fleet(*urls: str) -> FleetEngine:
    engine = FleetEngine(list(urls), "/nonexistent", "m")
    engine.embeddings = EmbeddingTable(torch.arange(40, dtype=torch.float32).reshape(10, 4))
    engine.tokenizer = Letters()
    return engine


class Scripted:
    """Stands in for one backend's `generate`: yields its tokens, then fails after `fail_after` if set."""

    def __init__(self, tokens: list[int], fail_after: int | None = None, refuse: bool = False, finish: bool = False):
        self.tokens, self.fail_after, self.refuse, self.finish, self.inputs = tokens, fail_after, refuse, finish, []

    async def __call__(self, request: EngineInput):
        self.inputs.append(request)
        if self.refuse:
            raise EngineError("remote vLLM answered 400: bad request")
        for i, token in enumerate(self.tokens):
            if self.fail_after is not None and i == self.fail_after:
                raise BackendFailure("remote vLLM request failed: peer closed connection")
            last = self.finish and i == len(self.tokens) - 1
            yield ChoiceDelta(index=0, text=f"t{token}", token_ids=[token], finish_reason="stop" if last else None)
        if self.fail_after is not None and self.fail_after >= len(self.tokens):
            raise BackendFailure("remote vLLM request failed: peer closed connection")


def request(max_tokens: int = 5, embeds: bool = False, stop: list[str] | None = None) -> EngineInput:
    sampling = SamplingSpec(max_tokens=max_tokens, temperature=0, stop=stop or [])
    embeddings = torch.zeros(2, 4) if embeds else None
    return EngineInput(request_id="r", prompt_token_ids=[1, 2], sampling=sampling, prompt_embeds=embeddings)


async def collect(engine: FleetEngine, req: EngineInput) -> list[int]:
    return [t async for delta in engine.generate(req) for t in delta.token_ids]


def test_the_least_busy_backend_is_chosen_and_one_holding_the_adapter_first():
    engine = fleet("http://a", "http://b", "http://c")
    engine.outstanding.update({"http://a": 3, "http://b": 1, "http://c": 2})
    assert engine.choose(None).base_url == "http://b"
    engine.backends[2]._loaded_loras.add("fr-1-v1")
    assert engine.choose(LoRASpec("fr-1-v1", "/x")).base_url == "http://c"
    assert engine.choose(LoRASpec("fr-2-v1", "/x")).base_url == "http://b"  # nobody holds it: the least busy
    engine.take_out(engine.backends[1], "health check failed")
    assert engine.choose(None).base_url == "http://c"
    engine.take_out(engine.backends[0], "x")
    engine.take_out(engine.backends[2], "x")
    with pytest.raises(BackendFailure):
        engine.choose(None)


def test_a_stream_cut_by_a_dying_backend_goes_on_at_another_from_where_it_stopped():
    engine = fleet("http://a", "http://b")
    dying, healthy = Scripted([5, 6, 7, 8, 9], fail_after=2), Scripted([7, 8, 9])
    engine.backends[0].generate, engine.backends[1].generate = dying, healthy
    assert asyncio.run(collect(engine, request())) == [5, 6, 7, 8, 9]
    resumed = healthy.inputs[0]
    assert resumed.prompt_token_ids == [1, 2, 5, 6] and resumed.sampling.max_tokens == 3
    assert "http://a" in engine.down and engine.outstanding == {"http://a": 0, "http://b": 0}


def test_prompt_embeddings_are_continued_with_the_sent_tokens_embeddings():
    engine = fleet("http://a", "http://b")
    engine.backends[0].generate, engine.backends[1].generate = Scripted([3, 4], fail_after=1), Scripted([4])
    asyncio.run(collect(engine, request(max_tokens=2, embeds=True)))
    resumed = engine.backends[1].generate.inputs[0]
    assert resumed.prompt_embeds.shape == (3, 4) and torch.equal(resumed.prompt_embeds[2], engine.embeddings.weight[3])


def test_nothing_sent_yet_means_the_same_request_elsewhere_and_a_refusal_is_not_retried():
    engine = fleet("http://a", "http://b")
    engine.backends[0].generate, engine.backends[1].generate = Scripted([1], fail_after=0), Scripted([1, 2])
    assert asyncio.run(collect(engine, request())) == [1, 2]
    assert engine.backends[1].generate.inputs[0].prompt_token_ids == [1, 2]
    engine = fleet("http://a", "http://b")
    engine.backends[0].generate = engine.backends[1].generate = Scripted([], refuse=True)
    with pytest.raises(EngineError, match="400"):
        asyncio.run(collect(engine, request()))
    assert engine.down == {}  # the request's fault, not the server's


def test_when_every_backend_fails_the_request_fails():
    engine = fleet("http://a", "http://b")
    engine.backends[0].generate = engine.backends[1].generate = Scripted([1, 2, 3], fail_after=1)
    with pytest.raises(BackendFailure):
        asyncio.run(collect(engine, request()))
    assert set(engine.down) == {"http://a", "http://b"}


def test_score_and_adapter_loads_move_on_from_a_failed_backend():
    engine = fleet("http://a", "http://b")

    async def fails(request):
        raise BackendFailure("remote vLLM request failed: connection refused")

    async def answers(request):
        return [None, -1.5]

    engine.backends[0].prompt_logprobs, engine.backends[1].prompt_logprobs = fails, answers
    assert asyncio.run(engine.prompt_logprobs(request())) == [None, -1.5]
    assert set(engine.down) == {"http://a"}


def test_a_finished_answer_is_not_continued_and_stop_strings_or_a_second_failure_end_the_request():
    engine = fleet("http://a", "http://b")
    engine.backends[0].generate = Scripted([5, 6], fail_after=2, finish=True)  # cut after its finish
    engine.backends[1].generate = Scripted([7])
    assert asyncio.run(collect(engine, request())) == [5, 6] and engine.backends[1].generate.inputs == []
    engine = fleet("http://a", "http://b")
    engine.backends[0].generate, engine.backends[1].generate = Scripted([5, 6], fail_after=1), Scripted([6])
    with pytest.raises(BackendFailure):  # a stop string may span the cut: not continued
        asyncio.run(collect(engine, request(stop=["t6"])))
    engine = fleet("http://a", "http://b", "http://c")
    for backend in engine.backends:
        backend.generate = Scripted([5, 6, 7], fail_after=1)
    with pytest.raises(BackendFailure):  # moved once; a request that fails its second server too ends there
        asyncio.run(collect(engine, request()))
    assert len(engine.down) == 2


def test_tokens_sent_before_their_text_are_generated_again_not_skipped():
    engine = fleet("http://a", "http://b")

    async def text_behind(req):  # the last token's text not sent yet (an incomplete character)
        yield ChoiceDelta(index=0, text="t5", token_ids=[5])
        yield ChoiceDelta(index=0, text="", token_ids=[6])
        raise BackendFailure("remote vLLM request failed: peer closed connection")

    engine.backends[0].generate, engine.backends[1].generate = text_behind, Scripted([6, 7])
    asyncio.run(collect(engine, request(max_tokens=4)))
    resumed = engine.backends[1].generate.inputs[0]
    assert resumed.prompt_token_ids == [1, 2, 5] and resumed.sampling.max_tokens == 3


def test_a_backend_missing_one_health_check_under_load_stays_in_and_three_in_a_row_take_it_out():
    engine = fleet("http://a", "http://b")
    answers = iter([False, True, False, False, False])

    async def busy_then_dead(timeout_s: float = 2.0) -> bool:
        return next(answers)

    async def up(timeout_s: float = 2.0) -> bool:
        return True

    engine.backends[0].healthy, engine.backends[1].healthy = busy_then_dead, up
    for expected_down in ([], [], [], [], ["http://a"]):
        asyncio.run(engine._check_health())
        assert list(engine.down) == expected_down
