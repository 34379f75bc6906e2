"""Several vLLM OpenAI servers behind one unlearnd front (`--remote-url` given more than once).

Each request goes to the server with the fewest requests in flight from this front; a request routed
to a LoRA prefers a server that already holds the adapter (others load it on first use, and vLLM keeps
its own LRU within `--max-loras`). A server that fails (unreachable, cut off mid-stream, a 5xx) is taken
out at once and health-checked every `health_interval_s` until it answers again. The request it was
serving goes on elsewhere: from the start if nothing had been sent, else (one choice) from where it
stopped, the tokens already sent appended to the prompt, so the client sees one unbroken answer; with
greedy sampling it is the answer the first server would have given. A request the server refused (a 4xx)
is the request's fault and is not retried."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from typing import TypeVar

import httpx
import torch

from unlearnd.engine.base import ChoiceDelta, Engine, EngineError, EngineInput, LoRASpec
from unlearnd.engine.remote import BackendFailure, RemoteVLLMEngine

log = logging.getLogger(__name__)

HEALTH_INTERVAL_S = 2.0
T = TypeVar("T")


class FleetEngine(Engine):
    def __init__(
        self,
        urls: list[str],
        model_path: str,
        served_name: str,
        dtype: str = "auto",
        timeout_s: float = 600.0,
        health_interval_s: float = HEALTH_INTERVAL_S,
    ):
        if not urls:
            raise ValueError("a fleet needs at least one vLLM server URL")
        self.backends = [RemoteVLLMEngine(u, model_path, served_name, dtype=dtype, timeout_s=timeout_s) for u in urls]
        self.model_name = served_name
        self.health_interval_s = health_interval_s
        self.outstanding = {b.base_url: 0 for b in self.backends}
        self.down: dict[str, str] = {}  # base URL -> why it was taken out
        self._sent = {b.base_url: 0 for b in self.backends}  # requests sent so far: spreads ties
        self._watch: asyncio.Task | None = None

    async def start(self) -> None:
        for backend in self.backends:
            try:
                await backend.connect()
            except BackendFailure as exc:
                self.down[backend.base_url] = str(exc)
                log.warning("vLLM backend %s is down at start: %s", backend.base_url, exc)
        up = self._up()
        if not up:
            raise EngineError(f"no vLLM backend is reachable: {self.down}")
        up[0].load_model_files()
        for backend in self.backends:  # one copy of the tokenizer and embedding table for all
            backend.tokenizer, backend.embeddings, backend.model_config = (
                up[0].tokenizer,
                up[0].embeddings,
                up[0].model_config,
            )
        self.tokenizer, self.embeddings, self.model_config = up[0].tokenizer, up[0].embeddings, up[0].model_config
        self.max_model_len = min(b.max_model_len for b in up)
        self._watch = asyncio.get_running_loop().create_task(self._health_loop())

    async def shutdown(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
        for backend in self.backends:
            await backend.shutdown()

    # -- placement ----------------------------------------------------------------------------------
    def _up(self, tried: set[str] = frozenset()) -> list[RemoteVLLMEngine]:
        return [b for b in self.backends if b.base_url not in self.down and b.base_url not in tried]

    def choose(self, lora: LoRASpec | None, tried: set[str] = frozenset()) -> RemoteVLLMEngine:
        """The backend for a request: fewest in flight, among those holding its adapter where any does."""
        up = self._up(tried)
        if not up:
            raise BackendFailure(f"no vLLM backend is up: {self.down}")
        if lora is not None:
            up = [b for b in up if b.holds_adapter(lora.name)] or up
        return min(up, key=lambda b: (self.outstanding[b.base_url], self._sent[b.base_url]))

    def take_out(self, backend: RemoteVLLMEngine, why: str) -> None:
        if backend.base_url not in self.down:
            log.warning("vLLM backend %s taken out: %s", backend.base_url, why)
        self.down[backend.base_url] = why
        backend.forget_adapters()

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.health_interval_s)
            for backend in self.backends:
                healthy = await backend.healthy()
                if healthy and backend.base_url in self.down:
                    try:
                        await backend.connect()
                    except BackendFailure:
                        continue
                    self.down.pop(backend.base_url, None)
                    log.info("vLLM backend %s is back", backend.base_url)
                elif not healthy and backend.base_url not in self.down:
                    self.take_out(backend, "health check failed")

    # -- requests -----------------------------------------------------------------------------------
    async def generate(self, request: EngineInput) -> AsyncIterator[ChoiceDelta]:
        sent: list[int] = []  # token ids of choice 0 already yielded (what a resumed request continues)
        yielded, tried, current = False, set(), request
        while True:
            backend = self.choose(current.lora, tried)
            url = backend.base_url
            self.outstanding[url] += 1
            self._sent[url] += 1
            try:
                async with contextlib.aclosing(backend.generate(current)) as stream:  # a client gone: closed now
                    async for delta in stream:
                        yielded = True
                        if delta.index == 0:
                            sent += delta.token_ids
                        yield delta
                return
            except BackendFailure as exc:
                self.take_out(backend, str(exc))
                tried.add(url)
                resumed = self._resumed(request, sent) if yielded else request
                if resumed is None:
                    raise
                current = resumed
                log.info("request %s goes on at another backend after %d tokens", request.request_id, len(sent))
            finally:
                self.outstanding[url] -= 1

    def _resumed(self, request: EngineInput, sent: list[int]) -> EngineInput | None:
        """`request` continued after the tokens already `sent` (one choice only), or None."""
        sampling = request.sampling
        if sampling.n != 1 or len(sent) >= sampling.max_tokens:
            return None
        embeds = request.prompt_embeds
        if embeds is not None:
            embeds = torch.cat([embeds, self.embeddings.lookup(sent).to(embeds.dtype)])
        left = {"max_tokens": sampling.max_tokens - len(sent), "min_tokens": max(0, sampling.min_tokens - len(sent))}
        return replace(
            request,
            prompt_token_ids=request.prompt_token_ids + sent,
            prompt_embeds=embeds,
            sampling=sampling.model_copy(update=left),
        )

    async def _on_one(self, lora: LoRASpec | None, call: Callable[[RemoteVLLMEngine], Awaitable[T]]) -> T:
        """`call` on the backend `choose` gives, then on the next wherever a backend fails."""
        tried: set[str] = set()
        while True:
            backend = self.choose(lora, tried)
            try:
                return await call(backend)
            except BackendFailure as exc:
                self.take_out(backend, str(exc))
                tried.add(backend.base_url)

    async def prompt_logprobs(self, request: EngineInput) -> list[float | None]:
        return await self._on_one(request.lora, lambda backend: backend.prompt_logprobs(request))

    async def load_adapter(self, lora: LoRASpec) -> None:
        """Load on one backend now (a broken adapter shows at activation); the others load on first use."""
        await self._on_one(lora, lambda backend: backend.load_adapter(lora))

    async def unload_adapters(self, request_id: str) -> None:
        for backend in self._up():
            try:
                await backend.unload_adapters(request_id)
            except (EngineError, httpx.HTTPError) as exc:
                log.warning("unloading %s on %s failed: %s", request_id, backend.base_url, exc)
