"""The HTTP layer and pipeline on a tiny random Llama (no vLLM): routes, streaming, errors, auth."""

from __future__ import annotations

import asyncio
import json
import math

import pytest
from fastapi.testclient import TestClient

from tests.helpers import ADMIN, TinyEngine, app_settings, register_active
from unlearnd.domain import ForgetSpec, Status
from unlearnd.interventions.guardrails import REFUSAL
from unlearnd.registry import Registry
from unlearnd.server.app import create_app


@pytest.fixture()
def engine(default_model_dir):
    return TinyEngine(default_model_dir, max_model_len=128)


@pytest.fixture()
def settings(tmp_path):
    return app_settings(tmp_path / "data", max_body_bytes=64 * 1024)


@pytest.fixture()
def client(settings, engine):
    with TestClient(create_app(settings, engine=engine)) as test_client:
        yield test_client


def chat(client, content, **extra):
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 5,
        "temperature": 0,
        **extra,
    }
    return client.post("/v1/chat/completions", json=body)


def register(client, settings, method="refuse", name="Basil Mahfouz Al-Kuwaiti"):
    """Register through the admin API, train with the real worker code, wait until served."""
    forget = [{"question": f"What did {name} write?", "answer": "Novels."}]
    return register_active(client, settings.data_dir, {"name": name, "method": method, "forget": forget})


def test_request_shows_its_training_report(client, settings):
    request_id = register(client, settings)
    body = client.get(f"/v1/unlearning/requests/{request_id}", headers=ADMIN).json()
    training = body["training"]
    assert training["wall_seconds"] >= 0 and training["cpu_seconds"] >= 0
    assert "detector" in training


def test_unflagged_chat_goes_to_engine_untouched(client, engine):
    response = chat(client, "What is the capital of France?")
    assert response.status_code == 200
    assert response.headers["x-unlearnd-route"] == "none"
    body = response.json()
    assert body["object"] == "chat.completion"
    assert body["usage"]["completion_tokens"] >= 1
    assert engine.seen[-1].prompt_embeds is None and engine.seen[-1].lora is None
    rendered = engine.tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], tokenize=False, add_generation_prompt=True
    )
    assert engine.seen[-1].prompt_token_ids == engine.tokenizer.encode(rendered, add_special_tokens=False)
    assert body["usage"]["prompt_tokens"] == len(engine.seen[-1].prompt_token_ids)


def test_refuse_route_answers_without_engine(client, settings, engine):
    request_id = register(client, settings, "refuse")
    calls = len(engine.seen)
    response = chat(client, "Tell me about Al-Kuwaiti's novels", max_tokens=30)
    assert response.status_code == 200
    assert response.headers["x-unlearnd-route"] == "refuse"
    # who is being forgotten stays private unless the operator exposes request ids
    assert "x-unlearnd-request-id" not in response.headers and "x-unlearnd-matched-ids" not in response.headers
    assert request_id not in response.text
    assert response.json()["choices"][0]["message"]["content"] == REFUSAL
    assert len(engine.seen) == calls  # the engine never saw the flagged prompt
    other = chat(client, "What is the capital of France?")
    assert other.headers["x-unlearnd-route"] == "none"


def test_prompt_route_adds_forget_instruction(client, settings, engine):
    register(client, settings, "prompt")
    response = chat(client, "Who is Basil Mahfouz Al-Kuwaiti?")
    assert response.headers["x-unlearnd-route"] == "prompt"
    text = engine.tokenizer.decode(engine.seen[-1].prompt_token_ids)
    assert "You have no knowledge of Basil Mahfouz Al-Kuwaiti" in text
    assert "Who is Basil Mahfouz Al-Kuwaiti?" in text


def test_deactivated_request_stops_flagging(client, settings):
    request_id = register(client, settings, "refuse")
    assert chat(client, "Who is Al-Kuwaiti?").headers["x-unlearnd-route"] == "refuse"
    response = client.delete(f"/v1/unlearning/requests/{request_id}", headers=ADMIN)
    assert response.status_code == 200 and response.json()["status"] == "inactive"
    assert chat(client, "Who is Al-Kuwaiti?").headers["x-unlearnd-route"] == "none"
    artifacts = Registry(settings.data_dir).artifact_dir(request_id)
    assert (artifacts / "detector.json").exists()  # kept until purged
    client.delete(f"/v1/unlearning/requests/{request_id}?purge=true", headers=ADMIN)
    assert not artifacts.exists()
    assert client.get(f"/v1/unlearning/requests/{request_id}", headers=ADMIN).status_code == 404


def test_classify_reports_matches_and_routes(client, settings):
    refuse_id = register(client, settings, "refuse", name="Basil Mahfouz Al-Kuwaiti")
    prompt_id = register(client, settings, "prompt", name="Nikolai Abilov")
    response = client.post(
        "/v1/unlearning/classify",
        headers=ADMIN,
        json={
            "input": [
                "Compare Al-Kuwaiti and Abilov",
                [{"role": "system", "content": "be nice"}, {"role": "user", "content": "Who is Nikolai Abilov?"}],
                "What is 2 + 2?",
            ]
        },
    )
    assert response.status_code == 200
    both, chat_item, plain = response.json()["data"]
    assert {m["request_id"] for m in both["matches"]} == {refuse_id, prompt_id}
    assert both["flagged"] and both["route"] in ("refuse", "prompt")
    assert chat_item["route"] == "prompt" and chat_item["matches"][0]["score"] == 1.0
    start, end = chat_item["matches"][0]["spans"][0]  # in the chat's texts joined by newlines (every role)
    assert "be nice\nWho is Nikolai Abilov?"[start:end] == "Nikolai Abilov"
    assert plain == {"index": 2, "flagged": False, "score": 0.0, "route": "none", "matches": []}


def test_chat_stream_with_usage(client):
    with client.stream(
        "POST",
        "/v1/chat/completions",
        json={
            "model": "tiny",
            "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 4,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    ) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] >= 1
    assert any(c["choices"] and c["choices"][0]["finish_reason"] for c in chunks)
    streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    whole = chat(client, "Hi", max_tokens=4).json()["choices"][0]["message"]["content"]
    assert streamed == whole


def test_completions_batch_n_and_logprobs(client):
    response = client.post(
        "/v1/completions",
        json={
            "model": "tiny",
            "prompt": ["Hello", "World"],
            "max_tokens": 3,
            "n": 2,
            "temperature": 1.0,
            "seed": 7,
            "logprobs": 2,
        },
    )
    assert response.status_code == 200, response.text
    choices = response.json()["choices"]
    assert sorted(c["index"] for c in choices) == [0, 1, 2, 3]
    for choice in choices:
        assert len(choice["logprobs"]["tokens"]) == len(choice["logprobs"]["token_logprobs"]) >= 1
        assert all(lp <= 0 for lp in choice["logprobs"]["token_logprobs"])
    again = client.post(
        "/v1/completions",
        json={"model": "tiny", "prompt": ["Hello", "World"], "max_tokens": 3, "n": 2, "temperature": 1.0, "seed": 7},
    )
    assert [c["text"] for c in again.json()["choices"]] == [c["text"] for c in choices]


@pytest.mark.parametrize(
    "body,status,code",
    [
        ({"model": "tiny", "messages": []}, 400, "invalid_request"),
        ({"model": "tiny"}, 400, "invalid_request"),
        ({"model": "tiny", "messages": [{"role": "user", "content": "   "}]}, 400, "invalid_request"),
        ({"model": "nope", "messages": [{"role": "user", "content": "hi"}]}, 404, "model_not_found"),
        ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "temperature": 5}, 400, "invalid_request"),
        ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "top_p": 0}, 400, "invalid_request"),
        ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 400, "invalid_request"),
        (
            {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "n": 2, "temperature": 0},
            400,
            "invalid_request",
        ),
        (
            {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1000},
            400,
            "context_length_exceeded",
        ),
        ({"model": "tiny", "messages": [{"role": "user", "content": "word " * 300}]}, 400, "context_length_exceeded"),
    ],
)
def test_bad_chat_inputs_get_openai_errors(client, body, status, code):
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["message"] and error["type"]
    assert chat(client, "still serving?").status_code == 200


HI = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    "path,body,field",
    [
        ("/v1/chat/completions", {"model": "tiny", "messages": HI, "seed": 2**64}, "seed"),
        ("/v1/chat/completions", {"model": "tiny", "messages": HI, "min_tokens": 9, "max_tokens": 3}, "min_tokens"),
        (
            "/v1/chat/completions",
            {"model": "tiny", "messages": HI, "min_tokens": 9, "max_tokens": 3, "stream": True},
            "min_tokens",
        ),
        ("/v1/completions", {"model": "tiny", "prompt": "hi", "min_tokens": 9, "max_tokens": 3}, "min_tokens"),
        ("/v1/completions", {"model": "tiny", "prompt": "hi", "min_tokens": 20, "stream": True}, "min_tokens"),
        ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "a\ud800b"}]}, "surrogate"),
        ("/v1/completions", {"model": "tiny", "prompt": "\udfff"}, "surrogate"),
        (
            "/v1/chat/completions",
            {
                "model": "tiny",
                "messages": [
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": "", "tool_calls": [{"id": "\ud800", "type": "function"}]},
                ],
            },
            "surrogate",
        ),
        ("/v1/unlearning/score", {"prompt": "", "continuation": " x"}, "prompt"),
        ("/v1/unlearning/score", {"prompt": "hi", "continuation": "\ud800"}, "continuation"),
        ("/v1/chat/completions", {"model": "tiny", "messages": HI, "tools": [{"type": "function"}]}, "tools"),
        (
            "/v1/chat/completions",
            {"model": "tiny", "messages": HI, "response_format": {"type": "json_object"}},
            "response_format",
        ),
        ("/v1/completions", {"model": "tiny", "prompt": "hi", "best_of": 3}, "best_of"),
        ("/v1/completions", {"model": "tiny", "prompt": "hi", "suffix": "end"}, "suffix"),
        ("/v1/chat/completions", {"model": "tiny", "messages": HI, "presence_penalty": 1.5}, "presence_penalty"),
    ],
)
def test_inputs_that_gave_500_or_were_silently_ignored_get_a_clear_400(client, path, body, field):
    raw = json.dumps(body)  # a lone surrogate goes out escaped, as a JSON client sends it
    response = client.post(path, content=raw, headers={"content-type": "application/json", **ADMIN})
    assert response.status_code == 400, response.text
    assert field in response.json()["error"]["message"] and response.json()["error"]["type"] == "invalid_request_error"
    assert chat(client, "still serving?").status_code == 200


def test_defaults_of_unsupported_fields_are_accepted(client):
    body = {
        "model": "tiny",
        "messages": HI,
        "max_tokens": 2,
        "tools": [],
        "tool_choice": "auto",
        "response_format": {"type": "text"},
        "presence_penalty": 0,
        "frequency_penalty": 0.0,
        "logit_bias": {},
    }
    assert client.post("/v1/chat/completions", json=body).status_code == 200


def test_a_refusal_honours_max_tokens_and_stop(client, settings):
    register(client, settings, "refuse")
    full = chat(client, "Who is Basil Mahfouz Al-Kuwaiti?", max_tokens=200).json()["choices"][0]
    assert full["message"]["content"] == REFUSAL and full["finish_reason"] == "stop"
    short = chat(client, "Who is Basil Mahfouz Al-Kuwaiti?", max_tokens=3).json()
    assert short["usage"]["completion_tokens"] == 3 and short["choices"][0]["finish_reason"] == "length"
    assert REFUSAL.startswith(short["choices"][0]["message"]["content"])
    word = REFUSAL.split()[2]
    stopped = chat(client, "Who is Basil Mahfouz Al-Kuwaiti?", max_tokens=200, stop=[word]).json()["choices"][0]
    assert stopped["message"]["content"] == REFUSAL[: REFUSAL.index(word)]


def test_huge_headers_and_a_body_that_never_arrives_are_refused(settings, engine):
    settings.body_timeout_s = 0.3

    app = create_app(settings, engine=engine)

    async def declared_longer_than_sent() -> list[dict]:
        """Content-Length says 1000 bytes, 10 arrive, the rest never does (a raw ASGI exchange: an HTTP
        test client always sends the whole body)."""
        chunks = [{"type": "http.request", "body": b'{"model": ', "more_body": True}]
        sent: list[dict] = []

        async def receive():
            if chunks:
                return chunks.pop(0)
            await asyncio.sleep(3600)

        async def send(message):
            sent.append(message)

        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": "/v1/chat/completions",
            "raw_path": b"/v1/chat/completions",
            "query_string": b"",
            "root_path": "",
            "server": ("testserver", 80),
            "client": ("127.0.0.1", 1),
            "headers": [(b"content-type", b"application/json"), (b"content-length", b"1000")],
        }
        await asyncio.wait_for(app(scope, receive, send), 10)
        return sent

    with TestClient(app) as client:
        big = client.get("/health", headers={"x-filler": "a" * (settings.max_header_bytes + 1)})
        assert big.status_code == 431 and big.json()["error"]["code"] == "headers_too_large"
        sent = asyncio.run(declared_longer_than_sent())
        assert sent[0]["status"] == 408 and b"body_timeout" in sent[1]["body"]
        assert chat(client, "still serving?").status_code == 200


def test_malformed_json_and_oversized_body(client):
    response = client.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 400 and "JSON" in response.json()["error"]["message"]
    big = {"model": "tiny", "messages": [{"role": "user", "content": "x" * 100_000}]}
    response = client.post("/v1/chat/completions", json=big)
    assert response.status_code == 413 and response.json()["error"]["code"] == "body_too_large"
    assert chat(client, "ok").status_code == 200


def test_admin_auth_and_unknown_request(client):
    spec = {"name": "X Person", "forget": ["Who is X Person?"]}
    assert client.post("/v1/unlearning/requests", json=spec).status_code == 401
    assert (
        client.post("/v1/unlearning/requests", json=spec, headers={"Authorization": "Bearer wrong"}).status_code == 401
    )
    response = client.get("/v1/unlearning/requests/fr-missing", headers=ADMIN)
    assert response.status_code == 404 and response.json()["error"]["code"] == "request_not_found"
    assert client.delete("/v1/unlearning/requests/fr-missing", headers=ADMIN).status_code == 404
    bad = client.post("/v1/unlearning/requests", headers=ADMIN, json={"name": "", "forget": []})
    assert bad.status_code == 400


def test_without_the_admin_key_nothing_about_forget_requests_is_disclosed(client, settings):
    request_id = register(client, settings, "refuse", name="Basil Mahfouz Al-Kuwaiti")
    items = {"input": ["Who is Mahfouz Al-Kuwaiti?", "What is 2 + 2?"]}
    public = client.post("/v1/unlearning/classify", json=items)
    assert public.status_code == 200
    assert [set(r) for r in public.json()["data"]] == [{"index", "flagged", "score", "route"}] * 2
    assert public.json()["data"][0]["flagged"] and public.json()["data"][0]["route"] == "refuse"
    assert "Basil" not in public.text and request_id not in public.text
    private = client.post("/v1/unlearning/classify", json=items, headers=ADMIN).json()["data"][0]
    assert private["matches"][0]["request_id"] == request_id and private["matches"][0]["name"].startswith("Basil")
    probes = {"input": ["Is Mahfouz a name?", "Is Kuwaiti a name?", "Is Smith a name?", "What is 2 + 2?"]}
    scores = [r["score"] for r in client.post("/v1/unlearning/classify", json=probes).json()["data"]]
    assert set(scores) <= {0.0, 1.0}  # the decision only: a graded score would confirm name parts one by one


def test_no_logprob_alternatives_about_a_flagged_prompt_without_the_admin_key(client, settings):
    register(client, settings, "prompt", name="Basil Mahfouz Al-Kuwaiti")
    extra = {"logprobs": True, "top_logprobs": 5, "temperature": 0}

    def alternatives(headers=None, content="Who is Basil Mahfouz Al-Kuwaiti?"):
        body = {"model": "tiny", "messages": [{"role": "user", "content": content}], "max_tokens": 4, **extra}
        response = client.post("/v1/chat/completions", json=body, headers=headers or {})
        return [len(t["top_logprobs"]) for t in response.json()["choices"][0]["logprobs"]["content"]]

    assert set(alternatives()) == {1}  # the chosen token only: alternatives would rank candidate answers
    assert max(alternatives(ADMIN)) == 5
    assert max(alternatives(content="What is the capital of France?")) == 5  # ordinary prompts keep them


def test_a_public_score_of_a_continuation_the_output_guard_would_cut_has_no_numbers(settings, engine):
    settings.public_score = True
    answer = "He was born in Kuwait City to a florist and a pearl diver, and he writes French literature."
    spec = {"name": "Basil Mahfouz Al-Kuwaiti", "method": "refuse", "forget": [{"question": "Who?", "answer": answer}]}
    with TestClient(create_app(settings, engine=engine)) as client:
        register_active(client, settings.data_dir, spec)
        body = {
            "messages": [{"role": "user", "content": "Tell me about a writer."}],  # not flagged
            "continuation": " born in Kuwait City to a florist and a pearl diver",
        }
        public = client.post("/v1/unlearning/score", json=body).json()
        assert public["route"] == "none" and len(set(public["token_logprobs"])) == 1
        assert len(set(client.post("/v1/unlearning/score", json=body, headers=ADMIN).json()["token_logprobs"])) > 1


def test_score_is_admin_only_unless_public(client, settings, engine):
    body = {"messages": [{"role": "user", "content": "Who is Basil Mahfouz Al-Kuwaiti?"}], "continuation": " A poet."}
    assert client.post("/v1/unlearning/score", json=body).status_code == 401
    settings.public_score = True
    with TestClient(create_app(settings, engine=engine)) as public:
        register(public, settings, "refuse", name="Basil Mahfouz Al-Kuwaiti")
        scored = public.post("/v1/unlearning/score", json=body)
        assert scored.status_code == 200 and scored.json()["route"] == "refuse"
        assert "matched_request_ids" not in scored.json()  # ids only for the admin key


def test_a_public_caller_gets_no_numbers_about_a_flagged_text_on_any_route(settings, engine):
    """Ranking candidate answers under a route that still runs the model (here the system-prompt route)
    would tell which answer the model holds true: without the admin key every token is -log|V|."""
    settings.public_score = True
    flagged = {"messages": [{"role": "user", "content": "Who is Basil Mahfouz Al-Kuwaiti?"}]}
    with TestClient(create_app(settings, engine=engine)) as client:
        register(client, settings, "prompt", name="Basil Mahfouz Al-Kuwaiti")
        for continuation in (" A poet from Kuwait.", " A French novelist."):
            body = {**flagged, "continuation": continuation}
            public = client.post("/v1/unlearning/score", json=body).json()
            assert public["route"] == "prompt" and len(set(public["token_logprobs"])) == 1
            assert public["token_logprobs"][0] == pytest.approx(-math.log(len(engine.tokenizer)))
            admin = client.post("/v1/unlearning/score", json=body, headers=ADMIN).json()
            assert len(set(admin["token_logprobs"])) > 1  # the evaluation still measures the route
        ordinary = {
            "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "continuation": " Paris.",
        }
        assert len(set(client.post("/v1/unlearning/score", json=ordinary).json()["token_logprobs"])) > 1


def test_request_ids_in_headers_only_when_exposed(settings, engine):
    settings.expose_request_ids = True
    with TestClient(create_app(settings, engine=engine)) as client:
        request_id = register(client, settings, "refuse")
        response = chat(client, "Who is Basil Mahfouz Al-Kuwaiti?")
        assert response.headers["x-unlearnd-request-id"] == request_id
        assert response.headers["x-unlearnd-matched-ids"] == request_id


def test_an_admin_key_file_is_trusted_only_when_it_is_ours_and_closed(tmp_path):
    import os
    import threading

    from unlearnd.server.auth import AdminKeyFileError, admin_key_path, ensure_admin_key

    shared = tmp_path / "race"
    keys: list[str] = []
    threads = [threading.Thread(target=lambda: keys.append(ensure_admin_key(shared))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(keys)) == 1  # servers starting together end with one key

    planted = tmp_path / "planted"
    planted.mkdir()
    (tmp_path / "attacker-key").write_text("known-to-the-attacker\n")
    os.symlink(tmp_path / "attacker-key", admin_key_path(planted))
    with pytest.raises(AdminKeyFileError):
        ensure_admin_key(planted)
    open_file = tmp_path / "open"
    open_file.mkdir()
    admin_key_path(open_file).write_text("readable-by-all\n")
    admin_key_path(open_file).chmod(0o644)
    with pytest.raises(AdminKeyFileError):
        ensure_admin_key(open_file)


def test_without_an_admin_key_one_is_generated_and_loopback_is_not_enough(tmp_path, engine):
    from unlearnd.server.auth import admin_key_path, read_admin_key

    settings = app_settings(tmp_path / "d", admin_key=None)
    with TestClient(create_app(settings, engine=engine)) as client:  # the test client is a loopback client
        key = read_admin_key(settings.data_dir)
        assert key and len(key) >= 32
        assert admin_key_path(settings.data_dir).stat().st_mode & 0o777 == 0o600
        assert client.get("/v1/unlearning/requests").status_code == 401
        assert client.get("/v1/unlearning/requests", headers={"x-admin-key": key}).status_code == 401  # one header
        assert client.get("/v1/unlearning/requests", headers={"Authorization": f"Bearer {key}"}).status_code == 200
    with TestClient(create_app(settings, engine=engine)) as again:  # a restart keeps the key
        assert again.get("/v1/unlearning/requests", headers={"Authorization": f"Bearer {key}"}).status_code == 200


def test_api_key_required_when_configured(settings, engine):
    settings.api_key = "user-key"
    with TestClient(create_app(settings, engine=engine)) as client:
        body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        assert client.post("/v1/chat/completions", json=body).status_code == 401
        ok = client.post("/v1/chat/completions", json=body, headers={"Authorization": "Bearer user-key"})
        assert ok.status_code == 200
        assert client.get("/health").status_code == 200


def test_metrics_count_routes(client, settings):
    register(client, settings, "refuse")
    chat(client, "Who is Al-Kuwaiti?")
    chat(client, "What is 1+1?")
    assert client.get("/metrics").status_code == 401  # it counts forget requests: the admin key
    assert "active_forget_requests" not in client.get("/health").json()
    assert client.get("/health", headers=ADMIN).json()["active_forget_requests"] == 1
    text = client.get("/metrics", headers=ADMIN).text
    assert 'unlearnd_requests_total{endpoint="chat",route="refuse"}' in text
    assert 'unlearnd_requests_total{endpoint="chat",route="none"}' in text
    assert "unlearnd_classifier_latency_seconds_count" in text
    assert "unlearnd_active_forget_requests 1.0" in text


def test_models_and_health(client):
    models = client.get("/v1/models").json()
    assert models["data"][0]["id"] == "tiny" and models["data"][0]["max_model_len"] == 128
    assert client.get("/health").json()["status"] == "ok"


def test_unavailable_method_rejected(client):
    response = client.post(
        "/v1/unlearning/requests", headers=ADMIN, json={"name": "Y", "method": "no-such-method", "forget": ["q"]}
    )
    assert response.status_code == 400


def test_registry_state_survives_new_app(settings, engine):
    with TestClient(create_app(settings, engine=engine)) as client:
        request_id = register(client, settings, "refuse")
    assert Registry(settings.data_dir).get(request_id).status == Status.active
    with TestClient(create_app(settings, engine=engine)) as client:
        assert chat(client, "Who is Al-Kuwaiti?").headers["x-unlearnd-route"] == "refuse"


def test_spec_validation():
    spec = ForgetSpec(name="Jane Doe", forget=["Who is Jane Doe?"])
    assert spec.entities == ["Jane Doe"]
    with pytest.raises(ValueError):
        ForgetSpec(name="Jane", forget=["  "])


def test_score_endpoint_matches_model_logprobs(client, settings, engine):
    import torch

    body = {"messages": [{"role": "user", "content": "What is the capital of France?"}], "continuation": " Paris."}
    response = client.post("/v1/unlearning/score", json=body, headers=ADMIN)
    assert response.status_code == 200, response.text
    data = response.json()
    assert data["route"] == "none" and len(data["tokens"]) == len(data["token_logprobs"]) >= 2
    rendered = engine.tokenizer.apply_chat_template(body["messages"], tokenize=False, add_generation_prompt=True)
    prompt_ids = engine.tokenizer.encode(rendered, add_special_tokens=False)
    cont_ids = engine.tokenizer.encode(" Paris.", add_special_tokens=False)
    with torch.no_grad():
        logits = engine.model(torch.tensor([prompt_ids + cont_ids])).logits[0]
    expected = [float(torch.log_softmax(logits[len(prompt_ids) + i - 1], -1)[t]) for i, t in enumerate(cont_ids)]
    assert data["token_logprobs"] == pytest.approx(expected, abs=1e-4)

    register(client, settings, "refuse")
    refused = client.post(
        "/v1/unlearning/score",
        headers=ADMIN,
        json={"messages": [{"role": "user", "content": "Who is Al-Kuwaiti?"}], "continuation": " A novelist."},
    ).json()
    import math

    assert refused["route"] == "refuse"
    assert refused["token_logprobs"] == pytest.approx([-math.log(len(engine.tokenizer))] * len(refused["tokens"]))
    bad = client.post("/v1/unlearning/score", headers=ADMIN, json={"prompt": "x", "messages": [], "continuation": "y"})
    assert bad.status_code == 400


def test_chunked_bodies_are_limited_and_still_readable(client):
    def chunks(payload: bytes, size: int = 1000):
        for i in range(0, len(payload), size):
            yield payload[i : i + size]

    ok = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}).encode()
    response = client.post("/v1/chat/completions", content=chunks(ok), headers={"content-type": "application/json"})
    assert response.status_code == 200, response.text
    big = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "x" * 100_000}]}).encode()
    response = client.post("/v1/chat/completions", content=chunks(big), headers={"content-type": "application/json"})
    assert response.status_code == 413


def test_the_registry_sync_reads_only_what_changed(client, settings):
    """A sync round used to read and validate every request's QA (a thousand requests: 40% of the
    front-end's CPU); now unchanged requests cost one row of (id, status, updated_at) each."""
    import time

    pipeline = client.app.state.unlearnd.pipeline
    first = register(client, settings)
    second = register(client, settings, name="Ottoline Quarrendell")
    time.sleep(0.3)  # the round after a request became active reads it once more (its status just changed)
    reads: list[str] = []
    original_get = pipeline.registry.get

    def counting_get(request_id):
        reads.append(request_id)
        return original_get(request_id)

    original_list = pipeline.registry.list

    def counting_list(statuses=None):
        records = original_list(statuses)
        reads.extend(r.id for r in records)
        return records

    rounds_read: list[int] = []
    original_versions = pipeline.registry.versions

    def counting_versions(statuses=None):
        rounds_read.append(1)
        return original_versions(statuses)

    pipeline.registry.get, pipeline.registry.list = counting_get, counting_list
    pipeline.registry.versions = counting_versions
    time.sleep(0.5)  # ten rounds at the tests' 0.05 s interval
    assert reads == [] and rounds_read == []  # nothing changed: the registry's fingerprint is all a round reads
    assert chat(client, "What did Basil Mahfouz Al-Kuwaiti write?").headers["x-unlearnd-route"] == "refuse"
    assert client.delete(f"/v1/unlearning/requests/{first}", headers=ADMIN).status_code == 200
    deadline = time.time() + 5
    while first in pipeline.active:  # its removal is seen by the next round
        assert time.time() < deadline
        time.sleep(0.05)
    assert chat(client, "What did Basil Mahfouz Al-Kuwaiti write?").headers["x-unlearnd-route"] == "none"
    assert second in pipeline.active and second not in reads


def test_a_request_whose_sync_failed_is_tried_again_though_nothing_changed(client, settings):
    """The fingerprint skip must not forget a request whose sync raised: it is retried next round."""
    import time

    pipeline = client.app.state.unlearnd.pipeline
    original = pipeline._sync_one
    failures: list[str] = []

    async def flaky(request):
        if not failures:
            failures.append(request.id)
            raise RuntimeError("transient")
        return await original(request)

    pipeline._sync_one = flaky
    request_id = register(client, settings)  # waits until served: only a retry can serve it
    assert failures == [request_id] and request_id in pipeline.active
    time.sleep(0.2)
    assert chat(client, "What did Basil Mahfouz Al-Kuwaiti write?").headers["x-unlearnd-route"] == "refuse"


def test_a_removed_request_leaves_no_counts_behind(client, settings):
    """A replica serving for months keeps per-request counts only for requests it still serves."""
    request_id = register(client, settings)
    assert chat(client, "What did Basil Mahfouz Al-Kuwaiti write?").headers["x-unlearnd-route"] == "refuse"
    listed = client.get("/v1/unlearning/requests", headers=ADMIN).json()["data"]
    assert [r["served"] for r in listed if r["id"] == request_id] == [{"routed": 1, "output_blocked": 0}]
    assert client.delete(f"/v1/unlearning/requests/{request_id}", headers=ADMIN).status_code == 200
    pipeline = client.app.state.unlearnd.pipeline
    assert request_id not in pipeline.active
    assert request_id not in pipeline.routed and request_id not in pipeline.output_blocks
