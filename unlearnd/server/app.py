"""The app factory: lifespan (engine, registry, pipeline, worker), auth and body limits, errors, routers.

Entrypoints live in the routers (`openai_routes`, `unlearning_routes`, `admin_routes`); they only
translate HTTP <-> `GuardedCall`, and all decisions happen in the pipeline.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from threadpoolctl import threadpool_limits

from unlearnd import __version__
from unlearnd.audit import key_id
from unlearnd.database import RegistryUnavailable
from unlearnd.detectors import get_detector
from unlearnd.engine.base import Engine
from unlearnd.guardrail import prometheus
from unlearnd.guardrail.pipeline import GuardrailPipeline
from unlearnd.registry import Registry
from unlearnd.server import admin_routes, console_routes, openai_routes, ops_routes, unlearning_routes
from unlearnd.server.auth import ADMIN_HEADER, api_key_matches, ensure_admin_key, is_admin
from unlearnd.server.errors import error_response, validation_message
from unlearnd.server.orphans import record_children, stop_orphans
from unlearnd.server.protocol import APIError
from unlearnd.server.settings import ServerSettings
from unlearnd.server.state import ServerState

log = logging.getLogger(__name__)

ADMIN_PATHS = ("/v1/unlearning/requests", "/v1/unlearning/engine-input", "/v1/unlearning/audit")
# The console's page and files (`/admin`) load without a key: they hold no data; its script calls the paths above.
SCORE_PATH = "/v1/unlearning/score"  # raw log-probs: admin-only unless --public-score


def build_engine(settings: ServerSettings) -> Engine:
    from unlearnd.models import resolve_model

    if settings.remote_lora_dir and settings.remote_lora_by_name:
        raise ValueError("--remote-lora-dir and --remote-lora-by-name exclude each other: choose who places adapters")
    model_path = resolve_model(settings.model)
    served = settings.served_model_name or (settings.model if settings.model else "default")
    if settings.engine == "remote":
        from unlearnd.engine.fleet import FleetEngine
        from unlearnd.engine.remote import RemoteVLLMEngine

        if not settings.remote_url:
            raise ValueError("engine=remote needs --remote-url")
        loras = {"lora_dir": settings.remote_lora_dir, "lora_by_name": settings.remote_lora_by_name}
        if len(settings.remote_url) > 1:
            return FleetEngine(settings.remote_url, model_path, served, dtype=settings.dtype, **loras)
        return RemoteVLLMEngine(settings.remote_url[0], model_path, served, api_key=None, dtype=settings.dtype, **loras)
    from unlearnd.engine.local import LocalVLLMEngine

    return LocalVLLMEngine(
        model_path,
        served,
        max_model_len=settings.max_model_len,
        max_loras=settings.max_loras,
        max_lora_rank=settings.max_lora_rank,
        kv_cache_gib=settings.kv_cache_gib,
        dtype=settings.dtype,
    )


ENGINE_DEAD_EXIT = 3  # exit status when the engine died: a supervisor (systemd, Kubernetes) restarts the server


async def watch_engine(engine: Engine, exit_process: bool, interval_s: float = 1.0, grace_s: float = 2.0) -> None:
    """Exit the process (status 3) soon after the engine dies: every request would fail from then on,
    and a restart is what brings it back. `grace_s` lets `/health` report the 503 first."""
    while True:
        await asyncio.sleep(interval_s)
        reason = engine.dead_reason()
        if reason:
            prometheus.ENGINE_DEAD.set(1)
            log.critical("%s: /health says 503%s", reason, "; exiting" if exit_process else "")
            if exit_process:
                await asyncio.sleep(grace_s)
                logging.shutdown()
                os._exit(ENGINE_DEAD_EXIT)
            return


def make_lifespan(settings: ServerSettings, engine: Engine | None, admin_key: str = ""):
    """Start-up and shutdown: the engine, the registry, the pipeline, the worker and the watchers."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # numpy's small per-sentence products (the meaning check) on one BLAS thread: a second one only
        # spins against the engine for the same two cores
        threadpool_limits(1, user_api="blas")
        stopped = await asyncio.to_thread(stop_orphans, settings.data_dir)
        if stopped:
            log.warning("stopped %d processes a killed server left running: %s", len(stopped), stopped)
        running = engine or build_engine(settings)
        await running.start()
        registry = await asyncio.to_thread(Registry, settings.data_dir, settings.registry, settings.artifacts)
        log.info("registry %s, artifacts in %s", registry.describe(), registry.artifacts_root)
        if admin_key:  # a key first used (generated or given) enters the audit trail by its id
            source = "given" if settings.admin_key else "generated"
            await asyncio.to_thread(registry.note_admin_key, key_id(admin_key), source)
        swept = await asyncio.to_thread(registry.sweep_orphan_dirs)
        if swept:
            log.warning("removed what an interrupted purge or a killed writer left: %s", swept)
        pipeline = GuardrailPipeline(
            running,
            get_detector(settings.detector),
            registry,
            settings.output_guard,
            background_max_wait_s=settings.background_max_wait_s,
        )
        await pipeline.sync()
        app.state.unlearnd = ServerState(settings=settings, engine=running, registry=registry, pipeline=pipeline)
        worker = None
        if settings.start_worker:
            from unlearnd.jobs.worker import WorkerSupervisor

            worker = WorkerSupervisor(settings)
            worker.start()
        await asyncio.to_thread(record_children, settings.data_dir)  # engine core and worker, for the next start
        sync_task = asyncio.create_task(pipeline.sync_forever(settings.sync_interval_s))
        stop_listening = threading.Event()
        if registry.engine.dialect.name == "postgresql":  # other replicas' changes arrive as notifications
            threading.Thread(
                target=registry.listen, args=(pipeline.notify_changed, stop_listening), daemon=True
            ).start()
        watchdog = asyncio.create_task(watch_engine(running, settings.exit_on_engine_death))
        log.info("unlearnd ready: model %s on %s engine", running.model_name, settings.engine)
        try:
            yield
        finally:
            stop_listening.set()
            sync_task.cancel()
            watchdog.cancel()
            if worker is not None:
                worker.stop()
            await running.shutdown()

    return lifespan


def add_error_handlers(app: FastAPI) -> None:
    """Every error leaves as OpenAI error JSON (400, never FastAPI's 422; 500 without internals)."""

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.type, exc.code, exc.param)

    @app.exception_handler(RegistryUnavailable)
    async def _registry_unavailable(_: Request, exc: RegistryUnavailable) -> JSONResponse:
        # nothing was registered or changed; what is served goes on being enforced as last read
        log.error("%s", exc)
        message = "the forget-request registry is unreachable: nothing was changed; try again later"
        return error_response(503, message, "service_unavailable", "registry_unavailable")

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = validation_message(exc.errors())
        return error_response(400, message, "invalid_request_error", "invalid_request", param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        type_ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error_response(exc.status_code, str(exc.detail), type_)

    @app.exception_handler(Exception)
    async def _internal_error(_: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error")
        return error_response(500, f"internal error: {type(exc).__name__}", "internal_error")


async def read_body(request: Request, limit: int, timeout_s: float) -> bytes | None:
    """The whole body within `timeout_s` (a Content-Length longer than what is sent, or a slow trickle, must
    not hold a connection and its task forever); None when it grows past `limit`. Raises TimeoutError."""

    async def read() -> bytes | None:
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                return None
        return body

    return await asyncio.wait_for(read(), timeout_s)


def access_error(request: Request, settings: ServerSettings, admin_key: str) -> JSONResponse | None:
    """The 401 for a request without the key its path needs (admin paths, and /v1/ with --api-key)."""
    admin_paths = ADMIN_PATHS if settings.public_score else (*ADMIN_PATHS, SCORE_PATH)
    path = request.url.path
    request.state.admin = is_admin(request, admin_key)
    request.state.actor = key_id(admin_key) if request.state.admin else "anonymous"  # as the audit log names it
    if path.startswith(admin_paths):
        if not request.state.admin:
            message = f"admin API: missing or wrong admin key ({ADMIN_HEADER}: Bearer <key>)"
            return error_response(401, message, "authentication_error", "invalid_admin_key")
    elif (
        path.startswith("/v1/")
        and settings.api_key
        and not request.state.admin  # the admin key opens every endpoint
        and not api_key_matches(request, settings.api_key)
    ):
        return error_response(401, "Incorrect API key provided.", "authentication_error", "invalid_api_key")
    return None


class RequestGuard:
    """Header and body limits, then the keys, before any route runs.

    Plain ASGI, not Starlette's `BaseHTTPMiddleware`: that one relays every chunk of a streamed answer
    through a memory stream and an extra task, which was a third of the front-end's time at eight
    concurrent streams. The body is read here (bounded in size and time) and handed on as it came."""

    def __init__(self, app, settings: ServerSettings, admin_key: str):
        self.app, self.settings, self.admin_key = app, settings, admin_key
        self.too_large = f"request body larger than {settings.max_body_bytes} bytes"

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refused, receive = await self._check(scope, receive)
        if refused is not None:
            await refused(scope, receive, send)
            return
        await self.app(scope, receive, send)

    async def _check(self, scope, receive):
        """(an error response or None, the `receive` the app should read the body from)."""
        settings = self.settings
        request = Request(scope, receive)
        header_bytes = sum(len(k) + len(v) for k, v in request.headers.raw)
        if header_bytes > settings.max_header_bytes:
            message = f"request headers larger than {settings.max_header_bytes} bytes"
            return error_response(431, message, "invalid_request_error", "headers_too_large"), receive
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > settings.max_body_bytes):
            return error_response(413, self.too_large, "invalid_request_error", "body_too_large"), receive
        if request.method in ("POST", "PUT", "PATCH"):
            try:
                body = await read_body(request, settings.max_body_bytes, settings.body_timeout_s)
            except TimeoutError:
                message = f"request body not received within {settings.body_timeout_s:g} s"
                return error_response(408, message, "invalid_request_error", "body_timeout"), receive
            if body is None:
                return error_response(413, self.too_large, "invalid_request_error", "body_too_large"), receive
            receive = _replay(body, receive)
        return access_error(request, settings, self.admin_key), receive


def _replay(body: bytes, receive):
    """A `receive` that gives the body already read, then the client's own messages (a disconnect)."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replayed():
        return pending.pop() if pending else await receive()

    return replayed


def create_app(settings: ServerSettings, engine: Engine | None = None) -> FastAPI:
    """Build the app; the engine starts in the lifespan (or is given, already built, by tests)."""
    admin_key = settings.admin_key or ensure_admin_key(settings.data_dir)
    app = FastAPI(title="unlearnd", version=__version__, lifespan=make_lifespan(settings, engine, admin_key))
    app.state.unlearnd = None
    app.state.settings = settings
    add_error_handlers(app)
    app.add_middleware(RequestGuard, settings=settings, admin_key=admin_key)
    for module in (ops_routes, openai_routes, unlearning_routes, admin_routes, console_routes):
        app.include_router(module.router)
    app.openapi = lambda: openapi_schema(app)  # type: ignore[method-assign]
    return app


ERROR_STATUSES = {
    "400": "Invalid request (OpenAI error JSON; FastAPI's 422 is never sent)",
    "401": "Missing or wrong API / admin key",
    "404": "Unknown model or forget request",
    "408": "Request body not received in time",
    "409": "The request is not in a state for this",
    "413": "Request body too large",
    "431": "Request headers too large",
    "500": "Internal error (the guardrail failed closed)",
    "503": "Engine dead or not started",
}


def openapi_schema(app: FastAPI) -> dict[str, Any]:
    """The OpenAPI document with the errors the server really answers: OpenAI error JSON under the
    status codes above, and no 422 (validation errors are 400s)."""
    if app.openapi_schema:
        return app.openapi_schema
    from fastapi.openapi.utils import get_openapi

    from unlearnd.server.protocol import ErrorResponse

    schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    error = ErrorResponse.model_json_schema(ref_template="#/components/schemas/{model}")
    components.update(error.pop("$defs", {}))
    components["ErrorResponse"] = error
    body = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}
    for operations in schema.get("paths", {}).values():
        for operation in operations.values():
            responses = operation.setdefault("responses", {})
            responses.pop("422", None)
            for status, description in ERROR_STATUSES.items():
                responses.setdefault(status, {"description": description, "content": body})
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)
    app.openapi_schema = schema
    return schema


def serve(settings: ServerSettings) -> None:
    import uvicorn

    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=settings.log_level)
