"""The admin API: register, list, show and deactivate (or purge) forget requests; their evidence.

The app's middleware checks the admin key before any of these runs."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import PlainTextResponse, Response

from unlearnd.domain import ForgetRequest, ForgetSpec
from unlearnd.methods import METHODS
from unlearnd.server.protocol import APIError
from unlearnd.server.state import ServerState, server_state

router = APIRouter()
log = logging.getLogger(__name__)
SERVE_NEW_REQUEST_WAIT_S = 15.0  # how long registering waits for the new request to be served


def public(record: ForgetRequest, full: bool = True) -> dict[str, Any]:
    data = record.model_dump(mode="json")
    if not full:
        data.pop("spec", None)
        data["forget_examples"] = len(record.spec.forget)
    return {"object": "unlearning.request", **data}


def not_found(request_id: str) -> APIError:
    return APIError(404, f"forget request {request_id!r} not found", "not_found_error", "request_not_found")


@router.post("/v1/unlearning/requests", status_code=201)
async def add_request(http: Request, body: ForgetSpec, state: ServerState = Depends(server_state)) -> dict[str, Any]:
    if body.method.value not in METHODS:
        raise APIError(
            400,
            f"method {body.method.value!r} is not available in this installation; available: {sorted(METHODS)}",
            param="method",
            code="method_unavailable",
        )
    record = await asyncio.to_thread(state.registry.add, body, http.state.actor)
    # enforced (refused by name) by the time the caller hears it is registered, unless loading takes
    # longer than a client should wait (a first load of the sentence encoder): then it goes on behind
    sync = asyncio.ensure_future(state.pipeline.sync())
    _RUNNING.add(sync)  # held until done, whatever happens to this handler
    sync.add_done_callback(lambda task: _finished(task, record.id))
    await asyncio.wait({sync}, timeout=SERVE_NEW_REQUEST_WAIT_S)
    if not sync.done():
        log.warning("forget request %s is still being loaded; it is served in a moment", record.id)
    return public(record)


_RUNNING: set[asyncio.Future] = set()


def _finished(task: asyncio.Future, request_id: str) -> None:
    _RUNNING.discard(task)
    if not task.cancelled() and task.exception() is not None:  # saved all the same: the periodic sync serves it
        log.error("serving new forget request %s at once failed: %r", request_id, task.exception())


@router.get("/v1/unlearning/requests")
async def list_requests(state: ServerState = Depends(server_state)) -> dict[str, Any]:
    records = await asyncio.to_thread(state.registry.list)
    evidence = await asyncio.to_thread(state.registry.evidence_verdicts)
    data = [{**public(r, full=False), "evidence": evidence.get(r.id), "served": served(state, r.id)} for r in records]
    return {"object": "list", "data": data}


def served(state: ServerState, request_id: str) -> dict[str, int]:
    """What this replica did for the request since it last loaded it: prompts routed to it, outputs cut for it."""
    pipeline = state.pipeline
    return {"routed": pipeline.routed[request_id], "output_blocked": pipeline.output_blocks[request_id]}


@router.get("/v1/unlearning/requests/{request_id}")
async def get_request(request_id: str, state: ServerState = Depends(server_state)) -> dict[str, Any]:
    try:
        record = await asyncio.to_thread(state.registry.get, request_id)
    except KeyError:
        raise not_found(request_id) from None
    # the training job's report (cost, achieved metrics), once the job has finished
    training = await asyncio.to_thread(state.registry.load_json, request_id, "training.json")
    evidence = await asyncio.to_thread(state.registry.evidence_verdicts, request_id)
    extra = {"training": training, "evidence": evidence.get(record.id), "served": served(state, record.id)}
    return {**public(record), **extra}


@router.get(
    "/v1/unlearning/requests/{request_id}/evidence",
    responses={200: {"content": {"application/json": {}, "text/markdown": {}, "image/png": {}}}},
)
async def get_evidence(
    request_id: str,
    format: str = Query("json", pattern="^(json|markdown|png)$", description="json, markdown or png (the plot)."),
    state: ServerState = Depends(server_state),
):
    """The request's evidence (admin): the probe battery's last result, or where its run stands."""
    row = await asyncio.to_thread(state.registry.evidence, request_id)
    if row is None or (format != "json" and row["verdict"] is None):
        message = f"no evidence for {request_id!r} yet (it is collected once the request is active)"
        raise APIError(404, message, "not_found_error", "evidence_not_found")
    if format == "png":
        if row["png"] is None:
            raise APIError(404, f"the evidence of {request_id!r} has no plot", "not_found_error", "evidence_not_found")
        return Response(row["png"], media_type="image/png")
    if format == "markdown":
        return PlainTextResponse(row["markdown"] or "", media_type="text/markdown")
    report = json.loads(row["report"]) if row["report"] else {}
    keep = ("status", "verdict", "requested_at", "started_at", "finished_at")
    return {
        "object": "unlearning.evidence",
        "request_id": request_id,
        **{k: row[k] for k in keep},
        "summary": report.get("summary"),
        "error": report.get("error"),
        "records": report.get("records", []),
        "markdown": row["markdown"],
    }


@router.post("/v1/unlearning/requests/{request_id}/evidence", status_code=202)
async def rerun_evidence(http: Request, request_id: str, state: ServerState = Depends(server_state)) -> dict[str, Any]:
    """Queue the request's probe battery again (the worker runs it once the request is active)."""
    try:
        await asyncio.to_thread(state.registry.request_evidence, request_id, http.state.actor)
    except KeyError:
        raise not_found(request_id) from None
    return {"object": "unlearning.evidence", "request_id": request_id, "status": "pending"}


@router.post("/v1/unlearning/requests/{request_id}/retrain")
async def retrain_request(http: Request, request_id: str, state: ServerState = Depends(server_state)) -> dict[str, Any]:
    """Send a degraded (artifacts unloadable) or failed request back to training; a degraded one stays
    refused by name until its new artifacts load."""
    try:
        record = await asyncio.to_thread(state.registry.retrain, request_id, http.state.actor)
    except KeyError:
        raise not_found(request_id) from None
    except ValueError as exc:
        raise APIError(409, str(exc), "invalid_request_error", "request_not_retrainable") from exc
    return public(record)


@router.delete("/v1/unlearning/requests/{request_id}")
async def delete_request(
    http: Request, request_id: str, purge: bool = False, state: ServerState = Depends(server_state)
) -> dict[str, Any]:
    try:
        record = await asyncio.to_thread(state.registry.deactivate, request_id, purge, http.state.actor)
    except KeyError:
        raise not_found(request_id) from None
    await state.pipeline.sync()
    return {**public(record, full=False), "purged": purge}


@router.get(
    "/v1/unlearning/audit",
    responses={200: {"content": {"application/json": {}, "application/jsonl": {"schema": {"type": "string"}}}}},
)
async def audit_log(
    after: int = Query(0, ge=0, description="Entries after this number."),
    limit: int = Query(1000, ge=1, le=10_000),
    format: str = Query("json", pattern="^(json|jsonl)$", description="jsonl: one entry per line, for export."),
    request_id: str | None = Query(None, max_length=64, description="Only this forget request's entries."),
    state: ServerState = Depends(server_state),
):
    """The audit trail (admin): every admin action and status change, hash-chained, with the head (last
    number and hash) and whether the chain verifies."""
    from unlearnd.audit import verify

    entries, head_seq, head_hash = await asyncio.to_thread(state.registry.audit_log, after, limit, request_id)
    if format == "jsonl":
        return PlainTextResponse("".join(e.model_dump_json() + "\n" for e in entries), media_type="application/jsonl")
    intact = None
    if after == 0 and len(entries) < limit and request_id is None:  # the whole log is here (a cut tail too)
        intact = not await asyncio.to_thread(verify, entries, head_seq, head_hash)
    return {
        "object": "list",
        "data": [e.model_dump() for e in entries],
        "head": {"seq": head_seq, "hash": head_hash},
        "verified": intact,
    }
