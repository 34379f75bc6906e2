"""A remote vLLM OpenAI server as the engine: how one unlearnd front scales out to a vLLM fleet.

The remote server must run with `--enable-prompt-embeds --enable-lora` and, for the bug #51122
workaround, `--lora-target-modules qkv_proj o_proj gate_up_proj down_proj` (see engine.base).
Intervened prompts go as base64 `torch.save` tensors in `prompt_embeds`, as vLLM documents; plain
ones as token ids. A LoRA is chosen by adapter name; unlearnd loads it on first use through
`/v1/load_lora_adapter` (remote needs `VLLM_ALLOW_RUNTIME_LORA_UPDATING=True` and the same path), or,
with `lora_dir` (behind a router, which sends that call to one server only), places it where every
server's filesystem resolver finds it by name (`unlearnd.engine.adapter_dir`).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import logging
import sys
import time
from collections.abc import AsyncIterator, Callable

import httpx
import torch

from unlearnd.engine.adapter_dir import place_adapter, remove_adapters
from unlearnd.engine.base import (
    LORA_TARGET_MODULES,
    ChoiceDelta,
    EmbeddingTable,
    Engine,
    EngineError,
    EngineInput,
    LoRASpec,
    TokenLogprob,
    adapter_of,
    read_model_config,
)
from unlearnd.engine.dtype import resolve_dtype

log = logging.getLogger(__name__)


def encode_prompt_embeds(embeds: torch.Tensor) -> str:
    buffer = io.BytesIO()
    torch.save(embeds.contiguous(), buffer)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


class BackendFailure(EngineError):
    """The connection to the server failed (unreachable, cut off mid-answer), not the request: another
    server may serve it. An answer the server gave, a 5xx included, is about the request and is not one."""


LOAD_LORA_PATH = "/v1/load_lora_adapter"
MIRROR_WAIT_S = 3.0  # how long one activation waits for a server that fetches adapters itself (then: next sync)


def load_lora_body(name: str, path: str) -> dict:
    return {"lora_name": name, "lora_path": path}


def raise_unless_lora_loaded(response: httpx.Response, name: str) -> None:
    """A vLLM server's answer to `LOAD_LORA_PATH`: loaded now, or already loaded; anything else is an error."""
    if response.status_code >= 400 and "already" not in response.text.lower():
        raise EngineError(f"vLLM server refused LoRA {name}: {response.status_code} {response.text[:300]}")


class RemoteVLLMEngine(Engine):
    def __init__(
        self,
        base_url: str,
        model_path: str,
        served_name: str,
        api_key: str | None = None,
        timeout_s: float = 600.0,
        dtype: str = "auto",
        lora_dir: str | None = None,
        lora_by_name: bool = False,
    ):
        """`lora_dir`: the folder the servers resolve adapters from by name, where this engine places them;
        `lora_by_name`: the servers fetch adapters themselves (adapter_mirror.py); neither: load them through
        the API."""
        self.base_url = base_url.rstrip("/")
        self.lora_dir = lora_dir
        self.lora_by_name = lora_by_name
        self.remote_root: str | None = None  # the server's base model as it names it (`--model`)
        self.model_path = model_path
        self.model_name = served_name
        self.api_key = api_key
        # Prompt embeddings we send must be in the remote server's dtype (its --dtype).
        self.dtype = resolve_dtype(dtype)
        self.timeout_s = timeout_s
        self.remote_model: str | None = None
        self.max_model_len = 0
        self._client: httpx.AsyncClient | None = None
        self._loaded_loras: set[str] = set()
        self._deleted: set[str] = set()  # requests whose adapters left the resolver folder: never placed again
        self._lora_lock = asyncio.Lock()

    async def start(self) -> None:
        await self.connect()
        self.load_model_files()

    async def connect(self) -> None:
        """Open the client and read the served model's card (its name, its context length)."""
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        if self._client is None:
            self._client = httpx.AsyncClient(
                base_url=self.base_url, headers=headers, timeout=httpx.Timeout(self.timeout_s, connect=10.0)
            )
        try:
            response = await self._client.get("/v1/models")
            response.raise_for_status()
        except httpx.HTTPError as exc:
            raise BackendFailure(f"remote vLLM server at {self.base_url} is not reachable: {exc}") from exc
        card = response.json()["data"][0]
        self.remote_model = card["id"]
        self.remote_root = card.get("root")
        self.max_model_len = int(card.get("max_model_len") or 2048)
        log.info(
            "remote vLLM engine: %s serving %s (max_model_len=%d)", self.base_url, self.remote_model, self.max_model_len
        )

    def load_model_files(self) -> None:
        """The tokenizer, the embedding table and the config, read from the local model folder."""
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        self.embeddings = EmbeddingTable.from_model_dir(self.model_path, dtype=getattr(torch, self.dtype))
        self.model_config = read_model_config(self.model_path)

    async def healthy(self, timeout_s: float = 2.0) -> bool:
        """Whether the server answers `/health` now."""
        if self._client is None:
            return False
        try:
            return (await self._client.get("/health", timeout=timeout_s)).status_code == 200
        except httpx.HTTPError:
            return False

    def holds_adapter(self, name: str) -> bool:
        return name in self._loaded_loras

    async def forget_adapters_unloading(self) -> None:
        """Unload every adapter this engine may have loaded (a server back after an outage may still hold
        them, one purged meanwhile among them), then load again on next use."""
        await self._unload(lambda name: True, tolerate=(httpx.HTTPError,))

    async def shutdown(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def _ensure_lora(self, name: str, path: str) -> None:
        async with self._lora_lock:
            if name in self._loaded_loras:
                return
            if self.lora_by_name:
                self._check_not_deleted(name)  # the server holds it (its mirror placed it): nothing to send
            elif self.lora_dir is not None:
                await self._place(name, path)
            else:
                try:
                    response = await self._client.post(LOAD_LORA_PATH, json=load_lora_body(name, path))
                except httpx.HTTPError as exc:
                    raise BackendFailure(f"remote vLLM server at {self.base_url} failed loading {name}: {exc}") from exc
                raise_unless_lora_loaded(response, name)
            self._loaded_loras.add(name)

    def _check_not_deleted(self, name: str) -> None:
        if any(adapter_of(name, rid) for rid in self._deleted):
            raise EngineError(f"LoRA {name} belongs to a forget request that was removed")

    async def _place(self, name: str, path: str) -> None:
        self._check_not_deleted(name)
        try:
            await asyncio.to_thread(place_adapter, path, self.lora_dir, name, self.remote_root)
        except OSError as exc:
            raise EngineError(f"could not place LoRA {name} in {self.lora_dir}: {exc}") from exc

    async def load_adapter(self, lora: LoRASpec) -> None:
        await self._ensure_lora(lora.name, lora.path)
        if self.lora_dir is not None or self.lora_by_name:
            await self._resolve_check(lora.name, MIRROR_WAIT_S if self.lora_by_name else 0.0)

    async def _resolve_check(self, name: str, wait_s: float = 0.0) -> None:
        """One token under the adapter's name: a server that cannot resolve it (no resolver, another folder,
        another base model) shows at activation, which fails closed, not at a user's request. `wait_s`: how
        long an unknown name is asked again (a server's mirror places it within a sync or two)."""
        payload = {"model": name, "prompt": [0], "max_tokens": 1, "temperature": 0}
        deadline = time.monotonic() + wait_s
        while True:
            try:
                response = await self._client.post("/v1/completions", json=payload)
            except httpx.HTTPError as exc:
                raise BackendFailure(f"remote vLLM server at {self.base_url} failed resolving {name}: {exc}") from exc
            if response.status_code != 404 or time.monotonic() >= deadline:
                break
            await asyncio.sleep(0.5)
        if response.status_code >= 400:
            with contextlib.suppress(KeyError):
                self._loaded_loras.remove(name)
            if self.lora_by_name and response.status_code == 404:  # its mirror may not have fetched it yet
                raise BackendFailure(
                    f"the vLLM server at {self.base_url} does not hold LoRA {name} yet (is it started as "
                    "`unlearnd backend --registry DB --artifacts URL`?); tried again at the next sync"
                )
            raise EngineError(
                f"the vLLM server did not resolve LoRA {name} from {self.lora_dir} ({response.status_code} "
                f"{response.text[:300]}): start it with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True and "
                "VLLM_LORA_RESOLVER_CACHE_DIR set to that folder"
            )

    async def unload_adapters(self, request_id: str) -> None:
        await self._unload(lambda name: adapter_of(name, request_id))

    async def delete_adapters(self, request_id: str) -> None:
        """The request left the registry: its adapters leave the resolver folder, under the lock, so a
        generation still in flight cannot place one again (nor can any later one). Where the servers fetch
        them, their mirrors remove them; this engine only never sends the names again."""
        if self.lora_by_name:
            async with self._lora_lock:
                self._deleted.add(request_id)
                self._loaded_loras -= {n for n in self._loaded_loras if adapter_of(n, request_id)}
            return
        if self.lora_dir is None:
            return
        async with self._lora_lock:
            self._deleted.add(request_id)
            self._loaded_loras -= {n for n in self._loaded_loras if adapter_of(n, request_id)}
            await asyncio.to_thread(remove_adapters, self.lora_dir, request_id)

    async def _unload(self, which: Callable[[str], bool], tolerate: tuple[type[Exception], ...] = ()) -> None:
        """Unload the loaded adapters `which` picks; errors of the kinds in `tolerate` skip one adapter."""
        async with self._lora_lock:
            for name in [n for n in self._loaded_loras if which(n)]:
                if self._client is not None:
                    with contextlib.suppress(*tolerate):
                        await self._client.post("/v1/unload_lora_adapter", json={"lora_name": name})
                self._loaded_loras.discard(name)

    def _payload(self, request: EngineInput) -> dict:
        s = request.sampling
        payload = {
            "model": request.lora.name if request.lora else self.remote_model,
            "max_tokens": s.max_tokens,
            "temperature": s.temperature,
            "top_p": s.top_p,
            "n": s.n,
            "stop": s.stop or None,
            "seed": s.seed,
            "stream": True,
            "return_token_ids": True,
            "min_tokens": s.min_tokens,
            "ignore_eos": s.ignore_eos,
        }
        if s.logprobs is not None:
            payload["logprobs"] = s.logprobs
        if request.prompt_embeds is not None:
            payload["prompt_embeds"] = encode_prompt_embeds(request.prompt_embeds)
            payload["prompt"] = []  # no prompt for vLLM (0.32: an empty list adds none); vllm-router needs the field
        else:
            payload["prompt"] = request.prompt_token_ids
        return payload

    async def prompt_logprobs(self, request: EngineInput) -> list[float | None]:
        if self._client is None:
            raise EngineError("engine is not started")
        if request.prompt_embeds is not None:
            raise EngineError("prompt logprobs of embedding prompts are not available through a remote vLLM server")
        if request.lora is not None:
            await self._ensure_lora(request.lora.name, request.lora.path)
        payload = {
            "model": request.lora.name if request.lora else self.remote_model,
            "prompt": request.prompt_token_ids,
            "max_tokens": 1,
            "temperature": 0,
            "prompt_logprobs": 0,
        }
        try:
            response = await self._client.post("/v1/completions", json=payload)
        except httpx.HTTPError as exc:
            raise BackendFailure(f"remote vLLM request failed: {exc}") from exc
        if response.status_code >= 400:
            raise EngineError(f"remote vLLM answered {response.status_code}: {response.text[:500]}")
        entries = response.json()["choices"][0]["prompt_logprobs"]
        return [
            None if entry is None else float(entry[str(tid)]["logprob"])
            for tid, entry in zip(request.prompt_token_ids, entries)
        ]

    async def generate(self, request: EngineInput) -> AsyncIterator[ChoiceDelta]:
        if self._client is None:
            raise EngineError("engine is not started")
        if request.lora is not None:
            await self._ensure_lora(request.lora.name, request.lora.path)
        try:
            async with self._client.stream("POST", "/v1/completions", json=self._payload(request)) as response:
                if response.status_code >= 400:
                    body = (await response.aread()).decode(errors="replace")
                    raise EngineError(f"remote vLLM answered {response.status_code}: {body[:500]}")
                async for line in response.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[6:]
                    if data.strip() == "[DONE]":
                        break
                    chunk = json.loads(data)
                    if "error" in chunk:
                        raise EngineError(f"remote vLLM stream error: {chunk['error']}")
                    for choice in chunk.get("choices", []):
                        yield ChoiceDelta(
                            index=choice["index"],
                            text=choice.get("text") or "",
                            token_ids=list(choice.get("token_ids") or []),
                            logprobs=_logprobs(choice.get("logprobs")),
                            finish_reason=choice.get("finish_reason"),
                        )
        except httpx.HTTPError as exc:
            raise BackendFailure(f"remote vLLM request failed: {exc}") from exc


def _logprobs(block: dict | None) -> list[TokenLogprob] | None:
    if not block:
        return None
    tops = block.get("top_logprobs") or [{}] * len(block.get("tokens", []))
    return [
        TokenLogprob(token=t, logprob=float(lp if lp is not None else float("-inf")), top_logprobs=dict(top or {}))
        for t, lp, top in zip(block.get("tokens", []), block.get("token_logprobs", []), tops)
    ]


def plain_vllm_default_command(
    model_path: str, port: int, served_name: str, host: str = "127.0.0.1", dtype: str = "auto"
) -> list[str]:
    """Plain vLLM as a user starts it: its default flags (compiled graphs, no LoRA, no prompt embeddings,
    the model's own context length), only the dtype pinned as `--dtype auto` resolves it here (this CPU's
    bf16 decode gave wrong tokens)."""
    return [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        model_path,
        "--served-model-name",
        served_name,
        "--host",
        host,
        "--port",
        str(port),
        "--dtype",
        resolve_dtype(dtype),
    ]


def plain_vllm_command(
    model_path: str,
    port: int,
    served_name: str,
    max_model_len: int = 2048,
    host: str = "127.0.0.1",
    max_loras: int = 4,
    max_lora_rank: int = 16,
    dtype: str = "auto",
) -> list[str]:
    """The command line of a plain vLLM OpenAI server that the remote engine (and benchmarks) can use:
    the default one with unlearnd's engine flags."""
    return [
        *plain_vllm_default_command(model_path, port, served_name, host, dtype),
        "--max-model-len",
        str(max_model_len),
        "--enforce-eager",
        "--seed",
        "0",
        "--enable-prompt-embeds",
        "--enable-lora",
        "--max-loras",
        str(max_loras),
        "--max-lora-rank",
        str(max_lora_rank),
        "--lora-target-modules",
        *LORA_TARGET_MODULES,
    ]
