"""FastAPI entrypoints: the OpenAI-compatible API, the classify endpoint and the admin API.

Entrypoints only translate HTTP <-> `GuardedRequest`; all decisions happen in the pipeline.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from unlearnd.detectors import get_detector
from unlearnd.engine.base import ChoiceDelta, Engine, EngineError, SamplingSpec
from unlearnd.registry import ForgetSpec, Registry
from unlearnd.request import GuardedRequest
from unlearnd.server import prometheus as metrics
from unlearnd.server.pipeline import ContextLengthError, GuardrailPipeline
from unlearnd.server.protocol import (
    ChatCompletionRequest,
    ClassifyMatch,
    ClassifyRequest,
    ClassifyResult,
    CompletionRequest,
    ModelCard,
    ScoreRequest,
    new_id,
    openai_error,
)
from unlearnd.server.settings import ServerSettings

log = logging.getLogger(__name__)


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param


def _error_response(status: int, message: str, type_: str, code: str | None = None,
                    param: str | None = None) -> JSONResponse:
    metrics.ERRORS.labels(status=str(status)).inc()
    return JSONResponse(openai_error(message, type_, code, param), status_code=status)


def _validation_message(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    first = errors[0] if errors else {}
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body",)]
    if first.get("type") == "json_invalid":
        return "We could not parse the JSON body of your request: " + str(first.get("msg", "")), None
    param = ".".join(loc) or None
    message = first.get("msg", "invalid request")
    return (f"{param}: {message}" if param else message), param


def build_engine(settings: ServerSettings) -> Engine:
    from unlearnd.models import resolve_model

    model_path = resolve_model(settings.model)
    served = settings.served_model_name or (settings.model if settings.model else "default")
    if settings.engine == "remote":
        from unlearnd.engine.remote import RemoteVLLMEngine

        if not settings.remote_url:
            raise ValueError("engine=remote needs --remote-url")
        return RemoteVLLMEngine(settings.remote_url, model_path, served, api_key=None, dtype=settings.dtype)
    from unlearnd.engine.local import LocalVLLMEngine

    return LocalVLLMEngine(
        model_path, served, max_model_len=settings.max_model_len, max_loras=settings.max_loras,
        max_lora_rank=settings.max_lora_rank, kv_cache_gib=settings.kv_cache_gib,
        dtype=settings.dtype,
    )


def create_app(settings: ServerSettings, engine: Engine | None = None) -> FastAPI:
    """Build the app; the engine starts in the lifespan (or is given, already built, by tests)."""
    state: dict[str, Any] = {}

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        nonlocal engine
        if engine is None:
            engine = build_engine(settings)
        await engine.start()
        registry = Registry(settings.data_dir)
        pipeline = GuardrailPipeline(engine, get_detector(settings.detector), registry)
        await pipeline.sync()
        state.update(engine=engine, registry=registry, pipeline=pipeline)
        worker = None
        if settings.start_worker:
            from unlearnd.jobs.worker import WorkerSupervisor

            worker = WorkerSupervisor(settings)
            worker.start()
        sync_task = asyncio.create_task(pipeline.sync_forever(settings.sync_interval_s))
        if not settings.admin_key:
            log.warning("no admin key set: the admin API only answers clients on loopback")
        log.info("unlearnd ready: model %s on %s engine", engine.model_name, settings.engine)
        try:
            yield
        finally:
            sync_task.cancel()
            if worker is not None:
                worker.stop()
            await engine.shutdown()

    app = FastAPI(title="unlearnd", version="0.1.0", lifespan=lifespan)
    app.state.unlearnd = state

    # -- errors ------------------------------------------------------------------------------------
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return _error_response(exc.status, exc.message, exc.type, exc.code, exc.param)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc.errors())
        return _error_response(400, message, "invalid_request_error", "invalid_request", param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        type_ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return _error_response(exc.status_code, str(exc.detail), type_)

    @app.exception_handler(Exception)
    async def _internal_error(_: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error")
        return _error_response(500, f"internal error: {type(exc).__name__}", "internal_error")

    # -- middleware: body size and auth ------------------------------------------------------------
    @app.middleware("http")
    async def _guard(request: Request, call_next):
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > settings.max_body_bytes):
            return _error_response(413, f"request body larger than {settings.max_body_bytes} bytes",
                                   "invalid_request_error", "body_too_large")
        if length is None and request.method in ("POST", "PUT", "PATCH"):
            body = b""
            async for chunk in request.stream():
                body += chunk
                if len(body) > settings.max_body_bytes:
                    return _error_response(413, f"request body larger than {settings.max_body_bytes} bytes",
                                           "invalid_request_error", "body_too_large")
            request._body = body  # noqa: SLF001 - re-expose the consumed body to the handler
        path = request.url.path
        if path.startswith("/v1/unlearning/requests") or path.startswith("/admin"):
            if not _admin_allowed(request):
                return _error_response(401, "admin API: missing or wrong admin key", "authentication_error",
                                       "invalid_admin_key")
        elif path.startswith("/v1/") and settings.api_key:
            if not _bearer_matches(request, settings.api_key):
                return _error_response(401, "Incorrect API key provided.", "authentication_error", "invalid_api_key")
        return await call_next(request)

    def _bearer_matches(request: Request, key: str) -> bool:
        header = request.headers.get("authorization", "")
        token = header[7:] if header.lower().startswith("bearer ") else request.headers.get("x-api-key", "")
        return hmac.compare_digest(token.encode(), key.encode())

    def _admin_allowed(request: Request) -> bool:
        if settings.admin_key:
            return _bearer_matches(request, settings.admin_key) or hmac.compare_digest(
                request.headers.get("x-admin-key", "").encode(), settings.admin_key.encode())
        client = request.client.host if request.client else ""
        return client in ("127.0.0.1", "::1", "localhost", "testclient")

    # -- helpers -----------------------------------------------------------------------------------
    def pipeline() -> GuardrailPipeline:
        return state["pipeline"]

    def check_model(name: str) -> None:
        served = pipeline().engine.model_name
        if name != served:
            raise APIError(404, f"The model `{name}` does not exist. Available: `{served}`.",
                           "not_found_error", "model_not_found", "model")

    def route_headers(request: GuardedRequest) -> dict[str, str]:
        headers = {"x-unlearnd-route": request.route}
        if request.match is not None:
            headers["x-unlearnd-request-id"] = request.match.request_id
        if request.matched_ids:
            headers["x-unlearnd-matched-ids"] = ",".join(request.matched_ids)
        return headers

    async def prepare(request: GuardedRequest) -> GuardedRequest:
        try:
            return await pipeline().prepare(request)
        except ContextLengthError as exc:
            raise APIError(400, str(exc), "invalid_request_error", "context_length_exceeded", "messages") from exc

    def default_max_tokens(request: GuardedRequest, asked: int | None) -> None:
        if asked is None:
            used = len(request.prompt_token_ids)
            request.sampling.max_tokens = max(1, pipeline().engine.max_model_len - used)

    async def collect(request: GuardedRequest) -> dict[int, list[ChoiceDelta]]:
        choices: dict[int, list[ChoiceDelta]] = {i: [] for i in range(request.sampling.n)}
        try:
            async for delta in pipeline().generate(request):
                choices.setdefault(delta.index, []).append(delta)
        except EngineError as exc:
            raise APIError(500, str(exc), "internal_error", "engine_error") from exc
        return choices

    def usage(request: GuardedRequest, choices: dict[int, list[ChoiceDelta]]) -> dict[str, int]:
        prompt = len(request.prompt_token_ids)
        completion = sum(len(d.token_ids) for deltas in choices.values() for d in deltas)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    # -- OpenAI API ----------------------------------------------------------------------------------
    @app.get("/health")
    async def health() -> dict[str, Any]:
        p = state.get("pipeline")
        return {"status": "ok" if p else "starting", "active_forget_requests": len(p.active) if p else 0}

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(metrics.REGISTRY), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        engine_ = pipeline().engine
        card = ModelCard(id=engine_.model_name, max_model_len=engine_.max_model_len)
        return {"object": "list", "data": [card.model_dump()]}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest):
        check_model(body.model)
        messages = body.plain_messages()
        request = GuardedRequest(
            id=new_id("chatcmpl"),
            kind="chat",
            sampling=body.sampling(body.requested_max_tokens() or 1, body.requested_logprobs()),
            messages=messages,
            query_text="\n".join(m["content"] for m in messages if m["role"] == "user"),
        )
        request = await prepare(request)
        default_max_tokens(request, body.requested_max_tokens())
        headers = route_headers(request)
        created = int(time.time())
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(_chat_stream(request, created, include_usage), media_type="text/event-stream",
                                     headers=headers)
        choices = await collect(request)
        payload = {
            "id": request.id, "object": "chat.completion", "created": created, "model": body.model,
            "choices": [
                {
                    "index": i,
                    "message": {"role": "assistant", "content": "".join(d.text for d in deltas)},
                    "logprobs": _chat_logprobs(deltas) if request.sampling.logprobs is not None else None,
                    "finish_reason": deltas[-1].finish_reason if deltas else "stop",
                }
                for i, deltas in sorted(choices.items())
            ],
            "usage": usage(request, choices),
        }
        return JSONResponse(payload, headers=headers)

    async def _chat_stream(request: GuardedRequest, created: int, include_usage: bool) -> AsyncIterator[str]:
        model = pipeline().engine.model_name

        def chunk(choices: list[dict[str, Any]], usage_: dict | None = None) -> str:
            data: dict[str, Any] = {"id": request.id, "object": "chat.completion.chunk", "created": created,
                                    "model": model, "choices": choices}
            if include_usage:
                data["usage"] = usage_
            return f"data: {json.dumps(data)}\n\n"

        for i in range(request.sampling.n):
            yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None}])
        seen: dict[int, list[ChoiceDelta]] = {}
        try:
            async for delta in pipeline().generate(request):
                seen.setdefault(delta.index, []).append(delta)
                choice: dict[str, Any] = {
                    "index": delta.index,
                    "delta": {"content": delta.text} if delta.text else {},
                    "logprobs": _chat_logprobs([delta]) if request.sampling.logprobs is not None else None,
                    "finish_reason": delta.finish_reason,
                }
                yield chunk([choice])
        except Exception as exc:  # the status line is gone: report in-band, like vLLM does
            log.exception("stream failed")
            yield f"data: {json.dumps(openai_error(str(exc), 'internal_error', 'engine_error'))}\n\n"
        if include_usage:
            yield chunk([], usage(request, seen))
        yield "data: [DONE]\n\n"

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        check_model(body.model)
        requests = []
        for prompt in body.prompt:
            request = GuardedRequest(
                id=new_id("cmpl"), kind="completion",
                sampling=body.sampling(body.max_tokens or 1, body.logprobs),
                prompt=prompt, query_text=prompt,
            )
            request = await prepare(request)
            default_max_tokens(request, body.max_tokens)
            requests.append(request)
        headers = route_headers(_strongest(requests))
        created = int(time.time())
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(_completion_stream(requests, created, include_usage),
                                     media_type="text/event-stream", headers=headers)
        results = await asyncio.gather(*(collect(r) for r in requests))
        choices, totals = [], {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
        for p_index, (request, result) in enumerate(zip(requests, results)):
            for i, deltas in sorted(result.items()):
                choices.append({
                    "index": p_index * body.n + i,
                    "text": "".join(d.text for d in deltas),
                    "logprobs": _completion_logprobs(deltas) if body.logprobs is not None else None,
                    "finish_reason": deltas[-1].finish_reason if deltas else "stop",
                })
            for key, value in usage(request, result).items():
                totals[key] += value
        payload = {"id": requests[0].id, "object": "text_completion", "created": created, "model": body.model,
                   "choices": choices, "usage": totals}
        return JSONResponse(payload, headers=headers)

    async def _completion_stream(requests: list[GuardedRequest], created: int,
                                 include_usage: bool) -> AsyncIterator[str]:
        model = pipeline().engine.model_name
        n = requests[0].sampling.n
        queue: asyncio.Queue = asyncio.Queue()
        seen: dict[int, list[ChoiceDelta]] = {}

        async def pump(p_index: int, request: GuardedRequest) -> None:
            try:
                async for delta in pipeline().generate(request):
                    await queue.put((p_index, delta))
            except Exception as exc:
                await queue.put((p_index, exc))
            finally:
                await queue.put((p_index, None))

        tasks = [asyncio.create_task(pump(i, r)) for i, r in enumerate(requests)]
        try:
            remaining = len(tasks)
            while remaining:
                p_index, item = await queue.get()
                if item is None:
                    remaining -= 1
                    continue
                if isinstance(item, Exception):
                    yield f"data: {json.dumps(openai_error(str(item), 'internal_error', 'engine_error'))}\n\n"
                    continue
                index = p_index * n + item.index
                seen.setdefault(index, []).append(item)
                data = {"id": requests[0].id, "object": "text_completion", "created": created, "model": model,
                        "choices": [{"index": index, "text": item.text,
                                     "logprobs": _completion_logprobs([item]) if item.logprobs is not None else None,
                                     "finish_reason": item.finish_reason}]}
                if include_usage:
                    data["usage"] = None
                yield f"data: {json.dumps(data)}\n\n"
        finally:
            for task in tasks:
                task.cancel()
        if include_usage:
            prompt = sum(len(r.prompt_token_ids) for r in requests)
            completion = sum(len(d.token_ids) for deltas in seen.values() for d in deltas)
            data = {"id": requests[0].id, "object": "text_completion", "created": created, "model": model,
                    "choices": [], "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                                             "total_tokens": prompt + completion}}
            yield f"data: {json.dumps(data)}\n\n"
        yield "data: [DONE]\n\n"

    # -- unlearning API --------------------------------------------------------------------------
    @app.post("/v1/unlearning/classify")
    async def classify(body: ClassifyRequest) -> dict[str, Any]:
        texts = []
        for item in body.input:
            if isinstance(item, str):
                texts.append(item)
            else:
                texts.append("\n".join(m.text() for m in item if m.role == "user"))
        p = pipeline()
        detections = await p.classify(texts)
        results = []
        for index, detection in enumerate(detections):
            matches = [
                ClassifyMatch(request_id=m.request_id, name=p.active[m.request_id].name,
                              method=p.active[m.request_id].method.value, score=m.score, weight=m.weight,
                              spans=m.spans)
                for m in detection.matches
            ]
            results.append(ClassifyResult(index=index, flagged=bool(matches), score=detection.score,
                                          route=p.route_of(detection), matches=matches))
        return {"object": "list", "data": [r.model_dump() for r in results]}

    @app.post("/v1/unlearning/score")
    async def score(body: ScoreRequest) -> dict[str, Any]:
        if body.model is not None:
            check_model(body.model)
        messages = [{"role": m.role if m.role != "developer" else "system", "content": m.text()}
                    for m in body.messages] if body.messages is not None else None
        request = GuardedRequest(
            id=new_id("score"), kind="score", sampling=SamplingSpec(max_tokens=1, temperature=0.0),
            messages=messages, prompt=body.prompt,
            query_text="\n".join(m["content"] for m in messages if m["role"] == "user") if messages else body.prompt,
        )
        request = await prepare(request)
        try:
            tokens, logprobs = await pipeline().score(request, body.continuation)
        except ContextLengthError as exc:
            raise APIError(400, str(exc), "invalid_request_error", "context_length_exceeded", "continuation") from exc
        except EngineError as exc:
            raise APIError(500, str(exc), "internal_error", "engine_error") from exc
        return {"object": "unlearning.score", "route": request.route, "matched_request_ids": request.matched_ids,
                "tokens": tokens, "token_logprobs": logprobs}

    @app.post("/v1/unlearning/requests", status_code=201)
    async def add_request(body: ForgetSpec) -> dict[str, Any]:
        from unlearnd.jobs.worker import available_methods

        if body.method.value not in available_methods():
            raise APIError(400, f"method {body.method.value!r} is not available in this installation; "
                           f"available: {sorted(available_methods())}", param="method", code="method_unavailable")
        record = await asyncio.to_thread(state["registry"].add, body)
        return _public(record)

    @app.get("/v1/unlearning/requests")
    async def list_requests() -> dict[str, Any]:
        records = await asyncio.to_thread(state["registry"].list)
        return {"object": "list", "data": [_public(r, full=False) for r in records]}

    @app.get("/v1/unlearning/requests/{request_id}")
    async def get_request(request_id: str) -> dict[str, Any]:
        registry = state["registry"]
        try:
            record = await asyncio.to_thread(registry.get, request_id)
        except KeyError:
            raise APIError(404, f"forget request {request_id!r} not found", "not_found_error",
                           "request_not_found") from None
        # the training job's report (cost, achieved metrics), once the job has finished
        return {**_public(record), "training": await asyncio.to_thread(registry.load_json, request_id, "training.json")}

    @app.delete("/v1/unlearning/requests/{request_id}")
    async def delete_request(request_id: str, purge: bool = False) -> dict[str, Any]:
        try:
            record = await asyncio.to_thread(state["registry"].deactivate, request_id, purge)
        except KeyError:
            raise APIError(404, f"forget request {request_id!r} not found", "not_found_error",
                           "request_not_found") from None
        await pipeline().sync()
        return {**_public(record, full=False), "purged": purge}

    return app


def _strongest(requests: list[GuardedRequest]) -> GuardedRequest:
    flagged = [r for r in requests if r.route != "none"]
    return flagged[0] if flagged else requests[0]


def _public(record, full: bool = True) -> dict[str, Any]:
    data = record.model_dump(mode="json")
    if not full:
        data.pop("spec", None)
        data["forget_examples"] = len(record.spec.forget)
    return {"object": "unlearning.request", **data}


def _chat_logprobs(deltas: list[ChoiceDelta]) -> dict[str, Any]:
    content = []
    for delta in deltas:
        for lp in delta.logprobs or []:
            content.append({
                "token": lp.token, "logprob": lp.logprob, "bytes": list(lp.token.encode()),
                "top_logprobs": [{"token": t, "logprob": v, "bytes": list(t.encode())}
                                 for t, v in lp.top_logprobs.items()],
            })
    return {"content": content}


def _completion_logprobs(deltas: list[ChoiceDelta]) -> dict[str, Any]:
    tokens, token_logprobs, top, offsets, offset = [], [], [], [], 0
    for delta in deltas:
        for lp in delta.logprobs or []:
            tokens.append(lp.token)
            token_logprobs.append(lp.logprob)
            top.append(lp.top_logprobs)
            offsets.append(offset)
            offset += len(lp.token)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}


def serve(settings: ServerSettings) -> None:
    import uvicorn

    app = create_app(settings)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level)

