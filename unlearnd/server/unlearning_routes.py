"""The unlearning endpoints: /v1/unlearning/classify (detector verdicts, no generation),
/v1/unlearning/score (log-probs of a continuation under the served pipeline) and
/v1/unlearning/engine-input (what a route hands the engine, admin only)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from unlearnd.engine.base import EngineError, SamplingSpec
from unlearnd.engine.remote import encode_prompt_embeds
from unlearnd.guardrail.call import GuardedCall
from unlearnd.guardrail.pipeline import ContextLengthError
from unlearnd.prompting import detector_text
from unlearnd.server.openai_routes import chat_call, check_model, prepare
from unlearnd.server.protocol import (
    APIError,
    ChatCompletionRequest,
    ClassifyMatch,
    ClassifyRequest,
    ClassifyResponse,
    ClassifyResult,
    EngineInputAdapter,
    EngineInputResponse,
    ScoreRequest,
    ScoreResponse,
    new_id,
    plain_messages,
)
from unlearnd.server.state import ServerState, server_state

router = APIRouter()


@router.post("/v1/unlearning/classify")
async def classify(request: Request, body: ClassifyRequest, state: ServerState = Depends(server_state)) -> dict:
    """Flagged, score and route per input; the matched requests too for the admin key. Without it the
    score is the decision only (1.0 flagged, 0.0 not): the detector's graded score would tell whether a
    word is part of a registered name (a lone part scores 0.6 unflagged, an ordinary word 0)."""
    texts = [item if isinstance(item, str) else detector_text(plain_messages(item)) for item in body.input]
    pipeline = state.pipeline
    detections = await pipeline.classify(texts)
    results = []
    for index, detection in enumerate(detections):
        matches = [
            ClassifyMatch(
                request_id=m.request_id,
                name=pipeline.active[m.request_id].name,
                method=pipeline.active[m.request_id].method.value,
                score=m.score,
                weight=m.weight,
                spans=m.spans,
            )
            for m in detection.matches
        ]
        results.append(
            ClassifyResult(
                index=index,
                flagged=bool(matches),
                score=detection.score if request.state.admin else float(bool(matches)),
                route=pipeline.route_of(detection),
                matches=matches if request.state.admin else None,
            )
        )
    return ClassifyResponse(data=results).model_dump(exclude_none=True)


@router.post("/v1/unlearning/score")
async def score(request: Request, body: ScoreRequest, state: ServerState = Depends(server_state)) -> dict:
    """Log-probs of the continuation under whatever the route does to the prompt; prompt and continuation
    are both scanned. Admin-only unless the operator opts in (`--public-score`); a caller without the
    admin key gets no numbers about a flagged text on any route (every token at -log|V|, as refuse
    gives): ranking candidate answers under an ECO or LoRA route would still tell which one the model
    holds true. The admin (an evaluation) gets the route's own numbers, and may have the route chosen
    from the prompt alone (`route_from: prompt`): scoring a gold answer that names the subject must not
    route on that answer, since a user's question does not carry it."""
    if body.model is not None:
        check_model(state, body.model)
    if body.route_from == "prompt" and not request.state.admin:
        raise APIError(403, "route_from 'prompt' needs the admin key", "permission_error", "forbidden", "route_from")
    guarded = GuardedCall(
        id=new_id("score"),
        kind="score",
        sampling=SamplingSpec(temperature=0.0),
        messages=body.plain_messages(),
        prompt=body.prompt,
        max_tokens=1,
        continuation=body.continuation if body.route_from == "prompt+continuation" else None,
    )
    guarded = await prepare(state, guarded)
    try:
        if not request.state.admin and (
            guarded.matched_ids or await state.pipeline.output_guard.blocks(body.continuation, guarded.matched_ids)
        ):  # a flagged text, or a continuation the output guard would not let the model say
            tokens, logprobs = state.pipeline.uniform_score(body.continuation)
        else:
            tokens, logprobs = await state.pipeline.score(guarded, body.continuation)
    except ContextLengthError as exc:
        raise APIError(400, str(exc), "invalid_request_error", "context_length_exceeded", "continuation") from exc
    except EngineError as exc:
        raise APIError(500, str(exc), "internal_error", "engine_error") from exc
    matched = guarded.matched_ids if request.state.admin else None
    return ScoreResponse(
        route=guarded.route, matched_request_ids=matched, tokens=tokens, token_logprobs=logprobs
    ).model_dump(exclude_none=True)


@router.post("/v1/unlearning/engine-input")
async def engine_input(body: ChatCompletionRequest, state: ServerState = Depends(server_state)) -> dict:
    """What the engine would be given for this chat request, without generating: the route, the prompt's
    token ids and, where the route changes them, its prompt embeddings or its LoRA adapter. Admin only
    (the middleware): it shows what an intervention does to a prompt. Operators read it to see a route at
    work; the benchmark gives plain vLLM exactly this input, so a route's cost is compared with the same
    work done without unlearnd."""
    call = chat_call(state, body, "input")
    call.splittable = False  # one input for the whole prompt: a composite's parts would be two
    call = await prepare(state, call, admin=True)
    embeds = call.prompt_embeds
    if embeds is not None:  # in the dtype the engine runs (a remote vLLM wants its own --dtype)
        embeds = encode_prompt_embeds(embeds.to(state.engine.embeddings.weight.dtype))
    return EngineInputResponse(
        route=call.route,
        request_id=call.match.request_id if call.match is not None else None,
        prompt_token_ids=call.prompt_token_ids,
        prompt_embeds=embeds,
        lora=EngineInputAdapter(name=call.lora.name, path=call.lora.path) if call.lora is not None else None,
        fixed_response=call.fixed_response,
    ).model_dump(exclude_none=True)
