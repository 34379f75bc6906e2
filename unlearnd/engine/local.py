"""In-process vLLM `AsyncLLM` engine (the default)."""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator

import torch

from unlearnd.engine.base import (
    LORA_TARGET_MODULES,
    ChoiceDelta,
    EmbeddingTable,
    Engine,
    EngineError,
    EngineInput,
    LoRASpec,
    SamplingSpec,
    TokenLogprob,
    adapter_of,
    read_model_config,
)
from unlearnd.engine.dtype import resolve_dtype

log = logging.getLogger(__name__)


def to_vllm_sampling(spec: SamplingSpec):
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    return SamplingParams(
        n=spec.n,
        max_tokens=spec.max_tokens,
        temperature=spec.temperature,
        top_p=spec.top_p,
        stop=spec.stop or None,
        seed=spec.seed,
        logprobs=spec.logprobs,
        min_tokens=spec.min_tokens,
        ignore_eos=spec.ignore_eos,
        output_kind=RequestOutputKind.DELTA,
    )


class LocalVLLMEngine(Engine):
    """vLLM in this process: plain prompts enter as token ids, intervened ones as embeddings."""

    def __init__(
        self,
        model_path: str,
        served_name: str,
        max_model_len: int = 2048,
        max_loras: int = 4,
        max_lora_rank: int = 16,
        kv_cache_gib: int = 1,
        dtype: str = "auto",
        seed: int = 0,
        enforce_eager: bool = True,
    ):
        self.model_path = model_path
        self.model_name = served_name
        self.max_model_len = max_model_len
        self.max_loras = max_loras
        self.max_lora_rank = max_lora_rank
        self.kv_cache_gib = kv_cache_gib
        self.dtype = resolve_dtype(dtype)
        self.seed = seed
        self.enforce_eager = enforce_eager
        self._llm = None
        self._lora_ids: dict[str, int] = {}
        self._next_lora_id = 0

    async def start(self) -> None:
        # vLLM's CPU backend reads its KV cache size (whole GiB) from the environment.
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(int(self.kv_cache_gib)))
        # A forked engine core inherits this process's torch state: after any torch work here (a model
        # loaded, an adapter written) the forked CPU engine computed wrong tokens. Spawn starts it clean.
        os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        args = AsyncEngineArgs(
            model=self.model_path,
            served_model_name=[self.model_name],
            max_model_len=self.max_model_len,
            dtype=self.dtype,
            seed=self.seed,
            enable_prompt_embeds=True,
            enable_lora=True,
            max_loras=self.max_loras,
            max_lora_rank=self.max_lora_rank,
            enforce_eager=self.enforce_eager,
            # Bug #51122 workaround: keep LoRA off the embedding layer (see engine.base).
            lora_target_modules=list(LORA_TARGET_MODULES),
        )
        self._llm = AsyncLLM.from_engine_args(args)
        self.tokenizer = self._llm.get_tokenizer()
        torch_dtype = getattr(torch, self.dtype)
        self.embeddings = EmbeddingTable.from_model_dir(self.model_path, dtype=torch_dtype)
        self.model_config = read_model_config(self.model_path)
        log.info("local vLLM engine ready: %s (max_model_len=%d)", self.model_name, self.max_model_len)

    async def load_adapter(self, lora: LoRASpec) -> None:
        # a utility call: vLLM's engine core answers a failed load with an error and keeps serving,
        # where a broken adapter met first by a generation kills the engine for every request
        if self._llm is None:
            raise EngineError("engine is not started")
        if not await self._llm.add_lora(self._lora_request(lora)):
            raise EngineError(f"vLLM did not load adapter {lora.name}")

    async def unload_adapters(self, request_id: str) -> None:
        for name in [n for n in self._lora_ids if adapter_of(n, request_id)]:
            lora_id = self._lora_ids.pop(name)
            if self._llm is not None:
                await self._llm.remove_lora(lora_id)
            log.info("adapter %s unloaded from the engine", name)

    def dead_reason(self) -> str | None:
        if self._llm is not None and self._llm.errored:
            return "the vLLM engine core died (EngineDeadError)"
        return None

    async def shutdown(self) -> None:
        if self._llm is not None:
            self._llm.shutdown()
            self._llm = None

    def _lora_request(self, lora: LoRASpec | None):
        if lora is None:
            return None
        from vllm.lora.request import LoRARequest

        if lora.name not in self._lora_ids:  # ids are never reused: vLLM caches adapters by id
            self._next_lora_id += 1
            self._lora_ids[lora.name] = self._next_lora_id
        lora_id = self._lora_ids[lora.name]
        return LoRARequest(lora_name=lora.name, lora_int_id=lora_id, lora_path=lora.path)

    async def generate(self, request: EngineInput) -> AsyncIterator[ChoiceDelta]:
        if self._llm is None:
            raise EngineError("engine is not started")
        if request.prompt_embeds is not None:
            prompt = {"prompt_embeds": request.prompt_embeds}
        else:
            prompt = {"prompt_token_ids": request.prompt_token_ids}
        stream = self._llm.generate(
            prompt,
            to_vllm_sampling(request.sampling),
            request.request_id,
            lora_request=self._lora_request(request.lora),
        )
        async for output in stream:
            for completion in output.outputs:
                logprobs = None
                if request.sampling.logprobs is not None and completion.logprobs is not None:
                    logprobs = [
                        self._convert_logprobs(tid, entry)
                        for tid, entry in zip(completion.token_ids, completion.logprobs)
                    ]
                if completion.token_ids or completion.finish_reason:
                    yield ChoiceDelta(
                        index=completion.index,
                        text=completion.text,
                        token_ids=list(completion.token_ids),
                        logprobs=logprobs,
                        finish_reason=completion.finish_reason,
                    )

    async def prompt_logprobs(self, request: EngineInput) -> list[float | None]:
        from vllm import SamplingParams

        if self._llm is None:
            raise EngineError("engine is not started")
        ids = request.prompt_token_ids
        if request.prompt_embeds is not None:
            # Mixed-mode input with every position taken from the embeddings: vLLM still knows the
            # ids, which it needs to look up each token's log-probability.
            prompt = {
                "prompt_embeds": request.prompt_embeds,
                "prompt_token_ids": ids,
                "prompt_is_token_ids": [False] * len(ids),
            }
        else:
            prompt = {"prompt_token_ids": ids}
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
        final = None
        async for output in self._llm.generate(
            prompt, params, request.request_id, lora_request=self._lora_request(request.lora)
        ):
            final = output
        if final is None or final.prompt_logprobs is None:
            raise EngineError("vLLM returned no prompt logprobs")
        return [None if entry is None else float(entry[tid].logprob) for tid, entry in zip(ids, final.prompt_logprobs)]

    def _convert_logprobs(self, token_id: int, entry: dict) -> TokenLogprob:
        def text(tid: int, lp) -> str:
            return lp.decoded_token if lp.decoded_token is not None else self.tokenizer.decode([tid])

        chosen = entry[token_id]
        top = {text(tid, lp): float(lp.logprob) for tid, lp in entry.items()}
        return TokenLogprob(token=text(token_id, chosen), logprob=float(chosen.logprob), top_logprobs=top)

    async def abort(self, request_id: str) -> None:
        if self._llm is not None:
            await self._llm.abort(request_id)
