"""Several vLLM OpenAI servers behind one unlearnd front (`--remote-url` given more than once).

Each request goes to the server with the fewest requests in flight from this front; a request routed
to a LoRA prefers a server that already holds the adapter (others load it on first use, and vLLM keeps
its own LRU within `--max-loras`). A server whose connection fails (unreachable, cut off mid-stream) is
taken out at once and health-checked every `health_interval_s` until it answers again. The request it
was serving moves once to another server: from the start if nothing had been sent, else (one choice, no
stop strings) from where it stopped, the tokens whose text was sent appended to the prompt, so the client
sees one unbroken answer; with greedy sampling it is the answer the first server would have given. An
answer a server gave (a 4xx or a 5xx) is the request's and is not retried."""

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
HEALTH_TIMEOUT_S = 5.0
HEALTH_MISSES_TO_TAKE_OUT = 3  # a server busy with a burst may miss one check; a dead one misses them all
MAX_MOVES = 1  # backends a request may move to: a request that kills servers must not take the whole fleet
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
        lora_dir: str | None = None,
        lora_by_name: bool = False,
    ):
        if not urls:
            raise ValueError("a fleet needs at least one vLLM server URL")
        self.backends = [
            RemoteVLLMEngine(
                u,
                model_path,
                served_name,
                dtype=dtype,
                timeout_s=timeout_s,
                lora_dir=lora_dir,
                lora_by_name=lora_by_name,
            )
            for u in urls
        ]
        self.model_name = served_name
        self.health_interval_s = health_interval_s
        self.outstanding = {b.base_url: 0 for b in self.backends}
        self.down: dict[str, str] = {}  # base URL -> why it was taken out
        self._sent = {b.base_url: 0 for b in self.backends}  # requests sent so far: spreads ties
        self._misses = {b.base_url: 0 for b in self.backends}  # health checks failed in a row
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
        up[0].load_model_files()  # one copy of the tokenizer and embedding table: the backends only send
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

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.health_interval_s)
            try:
                await self._check_health()
            except Exception:  # the loop must outlive any one server's odd answer
                log.exception("vLLM backend health check failed")

    async def _check_health(self) -> None:
        for backend in self.backends:
            healthy = await backend.healthy(timeout_s=HEALTH_TIMEOUT_S)
            self._misses[backend.base_url] = 0 if healthy else self._misses[backend.base_url] + 1
            if healthy and backend.base_url in self.down:
                try:
                    await backend.connect()
                except BackendFailure:
                    continue
                if backend.max_model_len < self.max_model_len:
                    self.down[backend.base_url] = (
                        f"serves a context of {backend.max_model_len} tokens, not {self.max_model_len}"
                    )
                    continue
                await backend.forget_adapters_unloading()  # what it held may include an adapter purged meanwhile
                self.down.pop(backend.base_url, None)
                log.info("vLLM backend %s is back", backend.base_url)
            elif self._misses[backend.base_url] >= HEALTH_MISSES_TO_TAKE_OUT and backend.base_url not in self.down:
                self.take_out(backend, f"{HEALTH_MISSES_TO_TAKE_OUT} health checks failed in a row")

    # -- requests -----------------------------------------------------------------------------------
    async def generate(self, request: EngineInput) -> AsyncIterator[ChoiceDelta]:
        progress = _Progress()  # what choice 0 has sent (a continuation starts after it)
        tried: set[str] = set()
        current = request
        while True:
            backend = self.choose(current.lora, tried)
            url = backend.base_url
            self.outstanding[url] += 1
            self._sent[url] += 1
            try:
                async with contextlib.aclosing(backend.generate(current)) as stream:  # a client gone: closed now
                    async for delta in stream:
                        progress.add(delta)
                        yield delta
                return
            except BackendFailure as exc:
                self.take_out(backend, str(exc))
                tried.add(url)
                if progress.finished and request.sampling.n == 1:
                    return  # the answer had its finish: only the stream's end was lost
                current = self._continued(request, progress) if len(tried) <= MAX_MOVES else None
                if current is None:
                    raise
                log.info("request %s goes on at another backend after %d tokens", request.request_id, progress.tokens)
            finally:
                self.outstanding[url] -= 1

    def _continued(self, request: EngineInput, progress: _Progress) -> EngineInput | None:
        """`request` again, after the tokens already sent (one choice, no stop strings), or None."""
        if not progress.anything:
            return request
        sampling = request.sampling
        sent = progress.sendable(self.tokenizer)
        if sampling.n != 1 or sampling.stop or sent is None or len(sent) >= sampling.max_tokens:
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

    async def delete_adapters(self, request_id: str) -> None:
        for backend in self.backends:  # down ones too: the folder is shared, the tombstone is per backend
            await backend.delete_adapters(request_id)


class _Progress:
    """Choice 0 of a stream as the client got it: its token ids, its text, whether it finished."""

    def __init__(self) -> None:
        self.token_ids: list[int] = []
        self.text = ""
        self.anything = False
        self.finished = False

    @property
    def tokens(self) -> int:
        return len(self.token_ids)

    def add(self, delta: ChoiceDelta) -> None:
        self.anything = True
        if delta.index == 0:
            self.token_ids += delta.token_ids
            self.text += delta.text
            self.finished = self.finished or delta.finish_reason is not None

    def sendable(self, tokenizer) -> list[int] | None:
        """The longest run of the sent tokens whose text is what was sent (vLLM may send a token before
        its text: a character still incomplete): the continuation regenerates the rest. None if none fits."""
        if not self.token_ids:
            return None if self.text else []
        for keep in range(len(self.token_ids), max(-1, len(self.token_ids) - 4), -1):
            decoded = tokenizer.decode(self.token_ids[:keep])
            if decoded == self.text or decoded.lstrip() == self.text.lstrip():
                return self.token_ids[:keep]
        return None
