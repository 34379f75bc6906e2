"""Operations endpoints: `/health` for liveness (and counts for the admin key) and `/metrics` for Prometheus."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from unlearnd.database import RegistryUnavailable
from unlearnd.domain import EVIDENCE_VERDICTS
from unlearnd.guardrail import prometheus
from unlearnd.server.errors import error_response
from unlearnd.server.state import ServerState

router = APIRouter()


@router.get("/health")
async def health(request: Request) -> Response:
    """Liveness for anyone (503 once the engine is dead); active, degraded and untrained forget
    requests for the admin key only."""
    state: ServerState | None = request.app.state.unlearnd
    dead = state.engine.dead_reason() if state else None
    body: dict[str, Any] = {"status": "engine_dead" if dead else "ok" if state else "starting"}
    if request.state.admin and state:
        counts = state.pipeline.counts()
        body["active_forget_requests"] = counts["active"]
        body["degraded_forget_requests"] = counts["degraded"]
        body["untrained_forget_requests"] = counts["untrained"]
        body["engine_dtype"] = getattr(state.engine, "dtype", None)  # what a report's numbers ran in
        if dead:
            body["error"] = dead
    return JSONResponse(body, status_code=503 if dead else 200)


@router.get("/metrics", response_class=PlainTextResponse)
async def prometheus_metrics(request: Request) -> Response:
    """Prometheus metrics: admin key (a scrape config's bearer token) unless `--public-metrics`;
    they count forget requests and what other users' traffic was routed or blocked."""
    if not (request.app.state.settings.public_metrics or request.state.admin):
        message = "The admin key is required for /metrics."
        return error_response(401, message, "authentication_error", "invalid_api_key")
    state: ServerState | None = request.app.state.unlearnd
    if state is not None:
        await _count_evidence(state)
    return Response(generate_latest(prometheus.REGISTRY), media_type=CONTENT_TYPE_LATEST)


async def _count_evidence(state: ServerState) -> None:
    """Read at scrape time from the registry (the worker writes evidence); kept as last read when it is down."""
    try:
        verdicts = await asyncio.to_thread(state.registry.evidence_verdicts)
    except RegistryUnavailable:
        return
    counts = Counter(verdicts.values())
    for verdict in (*EVIDENCE_VERDICTS, "pending", "running"):
        prometheus.EVIDENCE.labels(verdict).set(counts.get(verdict, 0))
