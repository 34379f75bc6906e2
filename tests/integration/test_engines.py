"""Both engine implementations under a mixed batch: token ids, prompt embeddings, LoRA, LoRA + embeddings.

This is the guard for vLLM bug #51122 (a step mixing embedding rows and token ids with LoRA enabled
crashes the V1 runner on Llama models): our engines restrict LoRA to the linear projections, so the
mix below must run to completion on the default (Llama-family) model, locally and remotely.
"""

from __future__ import annotations

import asyncio

import pytest

from tests.helpers import make_random_lora
from tests.integration.conftest import MODEL
from unlearnd.engine.base import EngineInput, LoRASpec, SamplingSpec
from unlearnd.engine.local import LocalVLLMEngine
from unlearnd.engine.remote import RemoteVLLMEngine

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def lora_dir(default_model_dir, tmp_path_factory):
    return make_random_lora(default_model_dir, tmp_path_factory.mktemp("lora") / "random-lora")


@pytest.fixture(scope="module")
def over_rank_lora_dir(default_model_dir, tmp_path_factory):
    """A well-formed adapter of rank 32: it fits the model, but the engines serve ranks up to 16."""
    return make_random_lora(default_model_dir, tmp_path_factory.mktemp("lora") / "rank-32", rank=32)


async def _load_adapters(engine, lora_dir, over_rank_lora_dir) -> None:
    """Loading ahead of use: a good adapter loads, one the engine cannot serve raises and leaves the
    engine serving (the mix that follows runs on the same engine)."""
    await engine.load_adapter(LoRASpec("random-lora", str(lora_dir)))
    with pytest.raises(Exception, match="rank"):
        await engine.load_adapter(LoRASpec("too-wide", str(over_rank_lora_dir)))
    assert engine.dead_reason() is None


async def _run_mix(engine, lora_dir) -> dict[str, str]:
    text = engine.tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], tokenize=False, add_generation_prompt=True
    )
    ids = engine.tokenizer.encode(text, add_special_tokens=False)
    lora = LoRASpec("random-lora", str(lora_dir))

    async def one(name: str, i: int) -> tuple[str, str]:
        request = EngineInput(f"{name}-{i}", ids, SamplingSpec(max_tokens=24, temperature=0))
        if "embeds" in name:
            request.prompt_embeds = engine.embeddings.lookup(ids)
        if "lora" in name:
            request.lora = lora
        out = []
        async for delta in engine.generate(request):
            out.append(delta.text)
        return name, "".join(out)

    kinds = ["ids", "embeds", "lora_ids", "lora_embeds"]
    results = await asyncio.gather(*(one(kinds[i % 4], i) for i in range(16)))
    by_kind: dict[str, set[str]] = {}
    for name, text in results:
        by_kind.setdefault(name, set()).add(text)
    return by_kind


def _check(by_kind: dict[str, set[str]]) -> None:
    assert set(by_kind) == {"ids", "embeds", "lora_ids", "lora_embeds"}
    for texts in by_kind.values():
        assert len(texts) == 1  # greedy: every copy of a kind agrees, whatever it was batched with
    assert "Paris" in next(iter(by_kind["ids"]))
    assert by_kind["embeds"] == by_kind["ids"]  # our lookup is exactly the model's embedding layer
    assert by_kind["lora_ids"] == by_kind["lora_embeds"]
    assert by_kind["lora_ids"] != by_kind["ids"]  # the adapter really is applied


async def _prompt_logprobs(engine, with_embeds: bool) -> list:
    ids = engine.tokenizer.encode("The capital of France is Paris.", add_special_tokens=False)
    request = EngineInput(f"score-{with_embeds}", ids, SamplingSpec(max_tokens=1, temperature=0))
    if with_embeds:
        request.prompt_embeds = engine.embeddings.lookup(ids)
    return await engine.prompt_logprobs(request)


def test_local_engine_survives_mixed_batches(default_model_dir, lora_dir, over_rank_lora_dir):
    async def main():
        engine = LocalVLLMEngine(str(default_model_dir), MODEL, max_model_len=1024)
        await engine.start()
        try:
            await _load_adapters(engine, lora_dir, over_rank_lora_dir)
            mix = await _run_mix(engine, lora_dir)
            scores = await asyncio.gather(_prompt_logprobs(engine, False), _prompt_logprobs(engine, True))
            return mix, scores
        finally:
            await engine.shutdown()

    mix, (from_ids, from_embeds) = asyncio.run(main())
    _check(mix)
    assert from_ids[0] is None and all(lp is not None and lp <= 0 for lp in from_ids[1:])
    assert from_embeds[1:] == pytest.approx(from_ids[1:], abs=0.05)
    assert from_ids[-2] > -1.0  # "Paris" after "The capital of France is" is likely under the real model


def test_remote_engine_survives_mixed_batches(default_model_dir, plain_vllm, lora_dir, over_rank_lora_dir):
    async def main():
        engine = RemoteVLLMEngine(plain_vllm.url, str(default_model_dir), MODEL)
        await engine.start()
        try:
            await _load_adapters(engine, lora_dir, over_rank_lora_dir)
            return await _run_mix(engine, lora_dir)
        finally:
            await engine.shutdown()

    _check(asyncio.run(main()))
    assert plain_vllm.alive()
