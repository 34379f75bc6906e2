"""Every response shape the server sends, checked against OpenAI's published response schemas (an extract
of openai/openai-openapi's `openapi.json`, found like the TOFU data: see tests/openai_schemas.py).

Which schema each shape is validated against:
  non-streamed chat (n=1, n=2, logprobs, refused, output-blocked)   CreateChatCompletionResponse
  each streamed chat chunk (usage chunk included)                   CreateChatCompletionStreamResponse
  non-streamed completions (logprobs, refused, output-blocked)      CreateCompletionResponse
  each streamed completion chunk                                    CreateCompletionResponse (`finish_reason`
                                                                    null until a choice ends, as OpenAI sends)
  GET /v1/models                                                    ListModelsResponse
  every error body (4xx, 500, an in-band stream error)              ErrorResponse
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest
from fastapi.testclient import TestClient

from tests.helpers import ADMIN, ScriptedEngine, TinyEngine, app_settings, register_active
from tests.openai_schemas import OpenAISchemas, load_openai_schemas
from unlearnd.engine.base import ChoiceDelta, EngineError, EngineInput
from unlearnd.interventions.guardrails import REFUSAL
from unlearnd.server.app import create_app

FORGOTTEN = "Basil Mahfouz Al-Kuwaiti"
ASK_FORGOTTEN = [{"role": "user", "content": f"Who is {FORGOTTEN}?"}]
HI = [{"role": "user", "content": "Hi"}]

# the output guard's case: an unflagged prompt whose scripted answer names a forgotten person
GUARDED = "Takashi Nakamura"
GUARDED_QA = [
    ("What genre does Takashi Nakamura write in?", "Takashi Nakamura writes lyrical fiction about fishing villages."),
    ("What did his father do?", "His father repaired wooden boats in the harbour of Shimoda for forty years."),
]
LEAK = "Sure. The author you mean is Takashi Nakamura, who writes lyrical fiction about fishing villages."
ASK_UNFLAGGED = [{"role": "user", "content": "Who writes about fishing villages?"}]


@pytest.fixture(scope="module")
def schemas() -> OpenAISchemas:
    return load_openai_schemas()


def _open(settings, engine) -> TestClient:
    client = TestClient(create_app(settings, engine=engine))
    client.__enter__()
    return client


@pytest.fixture(scope="module")
def client(tmp_path_factory, default_model_dir):
    """A tiny random Llama behind the real app, with one `refuse` forget request served."""
    settings = app_settings(tmp_path_factory.mktemp("schema-data"), max_body_bytes=64 * 1024)
    test_client = _open(settings, TinyEngine(default_model_dir, max_model_len=128))
    forget = [{"question": f"What did {FORGOTTEN} write?", "answer": "Novels."}]
    register_active(test_client, settings.data_dir, {"name": FORGOTTEN, "method": "refuse", "forget": forget})
    yield test_client
    test_client.__exit__(None, None, None)


@pytest.fixture(scope="module")
def guarded(tmp_path_factory, default_model_dir):
    """An engine that always names a forgotten person: every answer is cut by the output guard."""
    settings = app_settings(tmp_path_factory.mktemp("schema-guarded"))
    test_client = _open(settings, ScriptedEngine(default_model_dir, LEAK, max_model_len=256))
    body = {"name": GUARDED, "method": "refuse", "forget": [{"question": q, "answer": a} for q, a in GUARDED_QA]}
    register_active(test_client, settings.data_dir, body)
    yield test_client
    test_client.__exit__(None, None, None)


def post_ok(client: TestClient, path: str, body: dict, route: str | None = None) -> dict:
    response = client.post(path, json=body)
    assert response.status_code == 200, response.text
    if route is not None:
        assert response.headers["x-unlearnd-route"] == route
    return response.json()


def stream(client: TestClient, path: str, body: dict, route: str | None = None) -> list[dict]:
    """Every `data:` chunk of a stream (the closing [DONE] checked, not returned)."""
    with client.stream("POST", path, json={**body, "stream": True}) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        if route is not None:
            assert response.headers["x-unlearnd-route"] == route
        lines = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert lines and lines[-1] == "data: [DONE]"
    return [json.loads(line[len("data: ") :]) for line in lines[:-1]]


def check_chat(schemas: OpenAISchemas, body: dict, n: int = 1) -> None:
    schemas.check(body, "CreateChatCompletionResponse")
    assert [c["index"] for c in body["choices"]] == list(range(n))
    for choice in body["choices"]:
        assert choice["message"]["refusal"] is None  # the refusal text, if any, is in `content`
        if choice["logprobs"] is not None:
            assert choice["logprobs"]["refusal"] is None


def check_chat_stream(schemas: OpenAISchemas, chunks: list[dict], n: int = 1, usage: bool = False) -> str:
    """Each chunk valid; every choice ends with a finish_reason; the usage chunk last when asked for.
    Returns choice 0's text."""
    finished: dict[int, str | None] = {}
    text = ""
    for chunk in chunks:
        schemas.check(chunk, "CreateChatCompletionStreamResponse")
        assert ("usage" in chunk) == usage  # present (null until the last chunk) only when asked for
        for choice in chunk["choices"]:
            assert finished.get(choice["index"]) is None, "a chunk after the choice's finish_reason"
            finished[choice["index"]] = choice["finish_reason"]
            if choice["index"] == 0:
                text += choice["delta"].get("content") or ""
    assert sorted(finished) == list(range(n)) and all(finished.values())
    if usage:
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] >= 1
        assert all(c["usage"] is None for c in chunks[:-1])
        schemas.check(chunks[-1]["usage"], "CompletionUsage")
    return text


def check_completion_stream(schemas: OpenAISchemas, chunks: list[dict], choices: int, usage: bool = False) -> None:
    finished: dict[int, str | None] = {}
    for chunk in chunks:
        unfinished = any(c["finish_reason"] is None for c in chunk["choices"])
        schemas.check(chunk, "CreateCompletionResponse", streamed_completion=unfinished)
        for choice in chunk["choices"]:
            assert finished.get(choice["index"]) is None, "a chunk after the choice's finish_reason"
            finished[choice["index"]] = choice["finish_reason"]
    assert sorted(finished) == list(range(choices)) and all(finished.values())
    usage_chunks = [c for c in chunks if "usage" in c]
    if usage:
        assert usage_chunks == [chunks[-1]] and chunks[-1]["choices"] == []
    else:
        assert usage_chunks == []


def chat_body(messages=HI, **extra) -> dict:
    return {"model": "tiny", "messages": messages, "max_tokens": 5, "temperature": 0, **extra}


# -- the extract and the validator -----------------------------------------------------------------


def test_the_validator_rejects_what_the_issue_found(schemas):
    """The shapes sent before: a chat message and chat log-probs without `refusal`, a completion chunk
    with `usage: null`, a model list entry of another object type. (A validator that accepts anything
    would make every other test here pass.)"""
    message = {"role": "assistant", "content": "Hi."}
    choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": "stop"}
    old_chat = {"id": "c", "object": "chat.completion", "created": 1, "model": "m", "choices": [choice]}
    chat = "CreateChatCompletionResponse"
    assert schemas.errors(old_chat, chat) == ["choices/0/message: 'refusal' is a required property"]
    choice["message"] = {**message, "refusal": None}
    assert schemas.errors(old_chat, chat) == []
    choice["logprobs"] = {"content": []}
    assert schemas.errors(old_chat, chat) == ["choices/0/logprobs: 'refusal' is a required property"]
    chunk = {"id": "c", "object": "text_completion", "created": 1, "model": "m", "choices": [], "usage": None}
    assert schemas.errors(chunk, "CreateCompletionResponse", streamed_completion=True)
    models = {"object": "list", "data": [{"id": "m", "object": "card", "created": 1, "owned_by": "x"}]}
    assert schemas.errors(models, "ListModelsResponse")


# -- chat ------------------------------------------------------------------------------------------


def test_chat(client, schemas):
    body = post_ok(client, "/v1/chat/completions", chat_body(), route="none")
    check_chat(schemas, body)
    assert body["object"] == "chat.completion" and body["choices"][0]["finish_reason"] in ("stop", "length")


def test_chat_n2(client, schemas):
    check_chat(schemas, post_ok(client, "/v1/chat/completions", chat_body(n=2, temperature=1.0, seed=3)), n=2)


def test_chat_logprobs(client, schemas):
    body = post_ok(client, "/v1/chat/completions", chat_body(logprobs=True, top_logprobs=3))
    check_chat(schemas, body)
    content = body["choices"][0]["logprobs"]["content"]
    assert content and all(len(item["top_logprobs"]) == 3 for item in content)


def test_chat_logprobs_without_alternatives_n2(client, schemas):
    body = chat_body(n=2, temperature=1.0, seed=5, logprobs=True)
    check_chat(schemas, post_ok(client, "/v1/chat/completions", body), n=2)


def test_chat_stream_with_usage_and_logprobs(client, schemas):
    chunks = stream(
        client,
        "/v1/chat/completions",
        chat_body(n=2, temperature=1.0, seed=1, logprobs=True, top_logprobs=2, stream_options={"include_usage": True}),
    )
    check_chat_stream(schemas, chunks, n=2, usage=True)
    assert any(c["choices"] and c["choices"][0]["logprobs"] for c in chunks)


def test_chat_stream_without_usage(client, schemas):
    text = check_chat_stream(schemas, stream(client, "/v1/chat/completions", chat_body()))
    whole = post_ok(client, "/v1/chat/completions", chat_body())["choices"][0]["message"]["content"]
    assert text == whole


# -- completions -----------------------------------------------------------------------------------


def completion_body(**extra) -> dict:
    return {"model": "tiny", "prompt": "Hello", "max_tokens": 4, "temperature": 0, **extra}


def test_completions(client, schemas):
    body = post_ok(client, "/v1/completions", completion_body(), route="none")
    schemas.check(body, "CreateCompletionResponse")
    assert body["object"] == "text_completion" and body["choices"][0]["logprobs"] is None


def test_completions_logprobs_batch_n2(client, schemas):
    body = completion_body(prompt=["Hello", "World"], n=2, temperature=1.0, seed=7, logprobs=2)
    body = post_ok(client, "/v1/completions", body)
    schemas.check(body, "CreateCompletionResponse")
    assert sorted(c["index"] for c in body["choices"]) == [0, 1, 2, 3]
    assert all(c["logprobs"]["tokens"] and c["logprobs"]["top_logprobs"] for c in body["choices"])


def test_completions_stream(client, schemas):
    check_completion_stream(schemas, stream(client, "/v1/completions", completion_body()), choices=1)


def test_completions_stream_batch_with_usage_and_logprobs(client, schemas):
    body = completion_body(
        prompt=["Hello", "World"], n=2, temperature=1.0, seed=2, logprobs=1, stream_options={"include_usage": True}
    )
    chunks = stream(client, "/v1/completions", body)
    check_completion_stream(schemas, chunks, choices=4, usage=True)
    schemas.check(chunks[-1]["usage"], "CompletionUsage")


# -- the refuse route and the output guard -----------------------------------------------------------


def test_refused_chat(client, schemas):
    body = post_ok(client, "/v1/chat/completions", chat_body(ASK_FORGOTTEN, max_tokens=40), route="refuse")
    check_chat(schemas, body)
    assert body["choices"][0]["message"]["content"] == REFUSAL
    with_logprobs = chat_body(ASK_FORGOTTEN, max_tokens=40, n=2, temperature=1.0, logprobs=True, top_logprobs=2)
    check_chat(schemas, post_ok(client, "/v1/chat/completions", with_logprobs, route="refuse"), n=2)


def test_refused_chat_stream(client, schemas):
    body = chat_body(ASK_FORGOTTEN, max_tokens=40, stream_options={"include_usage": True})
    chunks = stream(client, "/v1/chat/completions", body, route="refuse")
    assert check_chat_stream(schemas, chunks, usage=True) == REFUSAL


def test_refused_completions(client, schemas):
    body = completion_body(prompt=f"{FORGOTTEN} was born in", max_tokens=40, logprobs=1)
    schemas.check(post_ok(client, "/v1/completions", body, route="refuse"), "CreateCompletionResponse")
    chunks = stream(client, "/v1/completions", body, route="refuse")
    check_completion_stream(schemas, chunks, choices=1)


def test_output_blocked_chat(guarded, schemas):
    body = {"model": "tiny", "messages": ASK_UNFLAGGED, "max_tokens": 40, "logprobs": True, "top_logprobs": 1}
    response = post_ok(guarded, "/v1/chat/completions", body, route="output_blocked")
    check_chat(schemas, response)
    assert response["choices"][0]["message"]["content"] == REFUSAL
    chunks = stream(guarded, "/v1/chat/completions", {**body, "stream_options": {"include_usage": True}})
    assert check_chat_stream(schemas, chunks, usage=True).endswith(REFUSAL)


def test_output_blocked_completions(guarded, schemas):
    body = {"model": "tiny", "prompt": "A novelist:", "max_tokens": 40, "logprobs": 1}
    response = post_ok(guarded, "/v1/completions", body, route="output_blocked")
    schemas.check(response, "CreateCompletionResponse")
    assert response["choices"][0]["text"] == REFUSAL
    check_completion_stream(schemas, stream(guarded, "/v1/completions", body), choices=1)


# -- models and errors -------------------------------------------------------------------------------


def test_models(client, schemas):
    response = client.get("/v1/models")
    assert response.status_code == 200
    schemas.check(response.json(), "ListModelsResponse")


def check_error(schemas: OpenAISchemas, response, status: int) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    schemas.check(body, "ErrorResponse")
    return body["error"]


CHAT = "/v1/chat/completions"
TOO_BIG = {"model": "tiny", "messages": [{"role": "user", "content": "x" * 100_000}]}


@pytest.mark.parametrize(
    "method,path,kwargs,status,code",
    [
        ("POST", CHAT, {"json": {"model": "tiny", "messages": []}}, 400, "invalid_request"),
        ("POST", CHAT, {"json": {"model": "tiny"}}, 400, "invalid_request"),
        ("POST", CHAT, {"json": chat_body(temperature=5)}, 400, "invalid_request"),
        ("POST", CHAT, {"json": chat_body(tools=[{"type": "function"}])}, 400, "invalid_request"),
        ("POST", CHAT, {"json": chat_body(max_tokens=1000)}, 400, "context_length_exceeded"),
        ("POST", CHAT, {"content": b"{not json", "headers": {"content-type": "application/json"}}, 400, None),
        ("POST", "/v1/completions", {"json": completion_body(prompt=[[10**9]])}, 400, None),
        ("POST", CHAT, {"json": chat_body(model="nope")}, 404, "model_not_found"),
        ("POST", "/v1/completions", {"json": completion_body(model="nope")}, 404, "model_not_found"),
        ("GET", "/v1/no-such-endpoint", {}, 404, None),
        ("GET", CHAT, {}, 405, None),
        ("GET", "/v1/unlearning/requests", {}, 401, "invalid_admin_key"),
        ("GET", "/v1/unlearning/requests/fr-missing", {"headers": ADMIN}, 404, "request_not_found"),
        ("POST", CHAT, {"json": TOO_BIG}, 413, "body_too_large"),
    ],
)
def test_errors(client, schemas, method, path, kwargs, status, code):
    error = check_error(schemas, client.request(method, path, **kwargs), status)
    if code is not None:
        assert error["code"] == code


def test_a_wrong_api_key_gets_an_error_object(tmp_path, default_model_dir, schemas):
    settings = app_settings(tmp_path / "data", api_key="user-key")
    with TestClient(create_app(settings, engine=TinyEngine(default_model_dir, max_model_len=128))) as client:
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            error = check_error(schemas, client.post(CHAT, json=chat_body(), headers=headers), 401)
            assert error["code"] == "invalid_api_key"
            check_error(schemas, client.get("/v1/models", headers=headers), 401)
        assert client.post(CHAT, json=chat_body(), headers={"Authorization": "Bearer user-key"}).status_code == 200


class FailingEngine(TinyEngine):
    """Says one word, then fails."""

    async def generate(self, request: EngineInput) -> AsyncIterator[ChoiceDelta]:
        yield ChoiceDelta(index=0, text="Well", token_ids=[0])
        raise EngineError("the engine died")


def test_an_engine_failure_is_an_error_object_streamed_or_not(tmp_path, default_model_dir, schemas):
    settings = app_settings(tmp_path / "data")
    with TestClient(create_app(settings, engine=FailingEngine(default_model_dir, max_model_len=128))) as client:
        error = check_error(schemas, client.post(CHAT, json=chat_body()), 500)
        assert error["code"] == "engine_error"
        for path, body in ((CHAT, chat_body()), ("/v1/completions", completion_body())):
            chunks = stream(client, path, body)
            schemas.check(chunks[-1], "ErrorResponse")  # in-band: the status line had gone out
            assert chunks[-1]["error"]["code"] == "engine_error"
