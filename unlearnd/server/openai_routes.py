"""The OpenAI-compatible endpoints: /v1/models, /v1/chat/completions, /v1/completions.

Each handler turns the HTTP body into one `GuardedCall`, lets the pipeline prepare and generate
it, and turns the deltas back into the protocol's response models (streamed or not).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse

from unlearnd.engine.base import ChoiceDelta, EngineError
from unlearnd.guardrail.call import ELICIT_HEADER, GuardedCall
from unlearnd.guardrail.pipeline import ContextLengthError
from unlearnd.guardrail.traffic import BACKGROUND_HEADER
from unlearnd.server.protocol import (
    APIError,
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatTokenLogprob,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    DeltaMessage,
    ModelCard,
    ModelList,
    TopLogprob,
    Usage,
    new_id,
    openai_error,
)
from unlearnd.server.state import ServerState, server_state

log = logging.getLogger(__name__)

router = APIRouter()


def check_model(state: ServerState, name: str) -> None:
    served = state.engine.model_name
    if name != served:
        raise APIError(
            404,
            f"The model `{name}` does not exist. Available: `{served}`.",
            "not_found_error",
            "model_not_found",
            "model",
        )


async def prepare(
    state: ServerState, request: GuardedCall, param: str = "messages", admin: bool = False
) -> GuardedCall:
    try:
        # a user's call counts from its arrival: a background call running gives way now
        async with state.pipeline.traffic.counted(request.background):
            request = await state.pipeline.prepare(request)
    except ContextLengthError as exc:
        raise APIError(400, str(exc), "invalid_request_error", "context_length_exceeded", param) from exc
    # the alternatives' numbers on a flagged prompt would rank candidate answers (as /score would):
    # without the admin key only the chosen tokens' log-probs are returned
    request.withhold_alternatives = bool(request.matched_ids) and not admin
    return request


def route_headers(state: ServerState, request: GuardedCall) -> dict[str, str]:
    """Every response says what happened to its prompt; which forget requests decided it only where the
    operator asked for it (`--expose-request-ids`): who is being forgotten is itself sensitive."""
    headers = {"x-unlearnd-route": request.served_route}
    if request.parts:  # a composite prompt: its ordinary parts were answered by the untouched model
        headers["x-unlearnd-split"] = "true"
    if request.background:  # how often it was aborted to give way to a user's generation
        headers["x-unlearnd-gave-way"] = str(request.attempt)
    if not state.settings.expose_request_ids:
        return headers
    if request.output_blocked:
        headers["x-unlearnd-request-id"] = next(iter(request.output_blocked.values()))
    elif request.match is not None:
        headers["x-unlearnd-request-id"] = request.match.request_id
    if request.matched_ids:
        headers["x-unlearnd-matched-ids"] = ",".join(request.matched_ids)
    return headers


def is_background(http: Request, stream: bool | None) -> bool:
    """A non-streamed call that asked to give way to users (`guardrail.traffic`): the evidence battery's
    probes. Anyone may ask; it only makes their own call wait."""
    return not stream and http.headers.get(BACKGROUND_HEADER, "").strip().lower() == "background"


def exempt_request(http: Request) -> str | None:
    """The request a call asks to be served as if absent (`x-unlearnd-elicit`): what the model says about
    that request's subject, asked by the worker before it fits the request. Only the admin key may ask
    (every other active request still applies to the call); anyone else gets a 403."""
    value = http.headers.get(ELICIT_HEADER, "").strip()
    if not value:
        return None
    if not http.state.admin:
        raise APIError(403, f"{ELICIT_HEADER} needs the admin key", "permission_error", "admin_key_required")
    return value


async def collect(state: ServerState, request: GuardedCall) -> dict[int, list[ChoiceDelta]]:
    async def generation(attempt: int) -> dict[int, list[ChoiceDelta]]:
        for call in [request, *request.parts]:
            call.attempt = attempt
            call.output_blocked.clear()  # an attempt that gave way left nothing behind
        choices: dict[int, list[ChoiceDelta]] = {i: [] for i in range(request.sampling.n)}
        async for delta in state.pipeline.generate(request):
            choices.setdefault(delta.index, []).append(delta)
        return choices

    async def abort(attempt: int) -> None:
        for call in [request, *request.parts]:
            await state.engine.abort(call.engine_id)

    try:
        if request.background:
            choices = await state.pipeline.traffic.background(generation, abort)
        else:
            choices = await generation(0)
    except EngineError as exc:
        raise APIError(500, str(exc), "internal_error", "engine_error") from exc
    for index in request.output_blocked:  # a cut choice is its refusal alone (a stream had to send what it
        choices[index] = choices.get(index, [])[-1:]  # released before the cut; a whole response need not)
    return choices


def usage(request: GuardedCall, choices: dict[int, list[ChoiceDelta]]) -> Usage:
    completion = sum(len(d.token_ids) for deltas in choices.values() for d in deltas)
    return Usage.of(len(request.prompt_token_ids), completion)


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def sse_error(exc: Exception) -> str:
    """A failure after the status line went out: reported in-band, like vLLM does."""
    return sse(openai_error(str(exc), "internal_error", "engine_error"))


def chat_logprobs(deltas: list[ChoiceDelta]) -> ChatLogprobs:
    content = [
        ChatTokenLogprob(
            token=lp.token,
            logprob=lp.logprob,
            bytes=list(lp.token.encode()),
            top_logprobs=[TopLogprob(token=t, logprob=v, bytes=list(t.encode())) for t, v in lp.top_logprobs.items()],
        )
        for delta in deltas
        for lp in delta.logprobs or []
    ]
    return ChatLogprobs(content=content)


def completion_logprobs(deltas: list[ChoiceDelta]) -> CompletionLogprobs:
    out = CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
    offset = 0
    for delta in deltas:
        for lp in delta.logprobs or []:
            out.tokens.append(lp.token)
            out.token_logprobs.append(lp.logprob)
            out.top_logprobs.append(lp.top_logprobs)
            out.text_offset.append(offset)
            offset += len(lp.token)
    return out


def finish_reason(deltas: list[ChoiceDelta]) -> str:
    """A whole choice's reason: a string (OpenAI's schema has no null here), "stop" if the engine gave none."""
    return (deltas[-1].finish_reason if deltas else None) or "stop"


# -- models --------------------------------------------------------------------------------------


@router.get("/v1/models")
async def list_models(state: ServerState = Depends(server_state)) -> dict:
    card = ModelCard(id=state.engine.model_name, max_model_len=state.engine.max_model_len)
    return ModelList(data=[card]).model_dump()


# -- chat ----------------------------------------------------------------------------------------


def chat_call(state: ServerState, body: ChatCompletionRequest, id_prefix: str = "chatcmpl") -> GuardedCall:
    """The one request object a chat body becomes (the model checked first)."""
    check_model(state, body.model)
    return GuardedCall(
        id=new_id(id_prefix),
        kind="chat",
        sampling=body.sampling(body.requested_logprobs()),
        messages=body.plain_messages(),
        max_tokens=body.requested_max_tokens(),
    )


@router.post("/v1/chat/completions")
async def chat_completions(http: Request, body: ChatCompletionRequest, state: ServerState = Depends(server_state)):
    call = chat_call(state, body)
    call.background = is_background(http, body.stream)
    call.exempt = exempt_request(http)
    request = await prepare(state, call, admin=http.state.admin)
    created = int(time.time())
    if body.stream:  # the header goes out before the output is checked: the route the prompt took
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(
            chat_stream(state, request, created, include_usage),
            media_type="text/event-stream",
            headers=route_headers(state, request),
        )
    choices = await collect(state, request)
    headers = route_headers(state, request)  # after generation: `output_blocked` when the output guard cut it
    with_logprobs = request.sampling.logprobs is not None
    response = ChatCompletionResponse(
        id=request.id,
        created=created,
        model=body.model,
        usage=usage(request, choices),
        choices=[
            ChatChoice(
                index=i,
                message=AssistantMessage(content="".join(d.text for d in deltas)),
                logprobs=chat_logprobs(deltas) if with_logprobs else None,
                finish_reason=finish_reason(deltas),
            )
            for i, deltas in sorted(choices.items())
        ],
    )
    return JSONResponse(response.model_dump(), headers=headers)


async def chat_stream(
    state: ServerState, request: GuardedCall, created: int, include_usage: bool
) -> AsyncIterator[str]:
    model = state.engine.model_name
    with_logprobs = request.sampling.logprobs is not None

    def chunk(choices: list[ChatChunkChoice], final_usage: Usage | None = None) -> str:
        data = ChatCompletionChunk(id=request.id, created=created, model=model, choices=choices, usage=final_usage)
        return sse(data.model_dump(exclude=None if include_usage else {"usage"}))

    for i in range(request.sampling.n):
        yield chunk([ChatChunkChoice(index=i, delta=DeltaMessage(role="assistant", content=""))])
    seen: dict[int, list[ChoiceDelta]] = {}
    try:
        async for delta in state.pipeline.generate(request):
            seen.setdefault(delta.index, []).append(delta)
            yield chunk(
                [
                    ChatChunkChoice(
                        index=delta.index,
                        delta=DeltaMessage(content=delta.text or None),
                        logprobs=chat_logprobs([delta]) if with_logprobs else None,
                        finish_reason=delta.finish_reason,
                    )
                ]
            )
    except Exception as exc:  # the status line is gone: the error goes in-band
        log.exception("stream failed")
        yield sse_error(exc)
    if include_usage:
        yield chunk([], usage(request, seen))
    yield "data: [DONE]\n\n"


# -- completions ---------------------------------------------------------------------------------


@router.post("/v1/completions")
async def completions(http: Request, body: CompletionRequest, state: ServerState = Depends(server_state)):
    check_model(state, body.model)
    requests = []
    for prompt in body.prompt:
        request = GuardedCall(
            id=new_id("cmpl"), kind="completion", sampling=body.sampling(body.logprobs), max_tokens=body.max_tokens
        )
        request.background = is_background(http, body.stream)
        if isinstance(prompt, str):
            request.prompt = prompt
        else:  # token ids: the engine gets them as given; the detector reads their text
            vocab = len(state.engine.tokenizer)
            if any(t >= vocab for t in prompt):
                raise APIError(400, f"token ids must be below the vocabulary size {vocab}", param="prompt")
            request.prompt = state.engine.tokenizer.decode(prompt)
            request.prompt_token_ids = list(prompt)
        requests.append(await prepare(state, request, param="prompt", admin=http.state.admin))
    flagged = [r for r in requests if r.route != "none"]
    created = int(time.time())
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(
            completion_stream(state, requests, created, include_usage),
            media_type="text/event-stream",
            headers=route_headers(state, flagged[0] if flagged else requests[0]),
        )
    results = await asyncio.gather(*(collect(state, r) for r in requests))
    decided = [r for r in requests if r.served_route != "none"]
    headers = route_headers(state, decided[0] if decided else requests[0])
    choices, total = [], Usage()
    for p_index, (request, result) in enumerate(zip(requests, results)):
        for i, deltas in sorted(result.items()):
            choices.append(
                CompletionChoice(
                    index=p_index * body.n + i,
                    text="".join(d.text for d in deltas),
                    logprobs=completion_logprobs(deltas) if body.logprobs is not None else None,
                    finish_reason=finish_reason(deltas),
                )
            )
        total += usage(request, result)
    response = CompletionResponse(id=requests[0].id, created=created, model=body.model, choices=choices, usage=total)
    return JSONResponse(response.model_dump(), headers=headers)


async def completion_stream(
    state: ServerState, requests: list[GuardedCall], created: int, include_usage: bool
) -> AsyncIterator[str]:
    """Every prompt's choices interleaved as they come; choice index = prompt index * n + choice."""
    model = state.engine.model_name
    n = requests[0].sampling.n
    queue: asyncio.Queue = asyncio.Queue()
    seen: dict[int, list[ChoiceDelta]] = {}

    def chunk(choices: list[CompletionChoice], final_usage: Usage | None = None) -> str:
        """`usage` on the last chunk only: OpenAI's completion object has no null `usage` (a chat chunk's has)."""
        data = CompletionResponse(id=requests[0].id, created=created, model=model, choices=choices, usage=final_usage)
        return sse(data.model_dump(exclude=None if final_usage is not None else {"usage"}))

    async def pump(p_index: int, request: GuardedCall) -> None:
        try:
            async for delta in state.pipeline.generate(request):
                await queue.put((p_index, delta))
        except Exception as exc:  # reported in-band below
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
                yield sse_error(item)
                continue
            index = p_index * n + item.index
            seen.setdefault(index, []).append(item)
            yield chunk(
                [
                    CompletionChoice(
                        index=index,
                        text=item.text,
                        finish_reason=item.finish_reason,
                        logprobs=completion_logprobs([item]) if item.logprobs is not None else None,
                    )
                ]
            )
    finally:
        for task in tasks:
            task.cancel()
    if include_usage:
        prompt = sum(len(r.prompt_token_ids) for r in requests)
        completion = sum(len(d.token_ids) for deltas in seen.values() for d in deltas)
        yield chunk([], Usage.of(prompt, completion))
    yield "data: [DONE]\n\n"
