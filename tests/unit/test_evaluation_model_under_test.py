"""Model-under-test: in-process scoring/generation on a tiny model, and the HTTP client against a mock server."""

from __future__ import annotations

import json
import math
import threading

import httpx
import pytest
import torch

from tests.helpers import tiny_llama
from unlearnd.evaluation.model_under_test import HFModelUnderTest, ServedModelUnderTest, ServerError
from unlearnd.prompting import chat_prompt_ids, user_messages


@pytest.fixture(scope="module")
def tiny(tokenizer):
    model = tiny_llama(
        len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    return HFModelUnderTest(model, tokenizer, name="tiny", batch_size=2)


@torch.no_grad()
def reference_logprobs(mut: HFModelUnderTest, question: str, answer: str) -> list[float]:
    """Plain full-sequence forward: log p(answer token | everything before it)."""
    prompt = chat_prompt_ids(mut.tokenizer, user_messages(question))
    ans = mut.tokenizer(answer, add_special_tokens=False)["input_ids"]
    logits = mut.model(input_ids=torch.tensor([prompt + ans])).logits[0]
    logp = torch.log_softmax(logits.float(), -1)
    return [float(logp[len(prompt) - 1 + i, t]) for i, t in enumerate(ans)]


def test_shared_prefix_and_batched_scores_equal_a_plain_forward(tiny):
    questions = ["Who wrote Hamlet?", "What is the capital of a very long named country?"]
    answers = [["William Shakespeare.", "Marlowe", "A playwright from Stratford who wrote many plays."], ["Paris"]]
    scored = tiny.score([user_messages(q) for q in questions], answers)
    assert [len(s) for s in scored] == [3, 1]
    for q, conts, row in zip(questions, answers, scored):
        for a, s in zip(conts, row):
            assert s.logprobs == pytest.approx(reference_logprobs(tiny, q, a), abs=1e-4)
            assert len(s.greedy_hits) == len(s.logprobs)
    # single-continuation prompts take the batched path (padding must not change scores)
    batched = tiny.score([user_messages(q) for q in questions], [[a[0]] for a in answers])
    for q, a, row in zip(questions, answers, batched):
        assert row[0].logprobs == pytest.approx(reference_logprobs(tiny, q, a[0]), abs=1e-4)


def test_greedy_hits_match_argmax(tiny):
    [[s]] = tiny.score([user_messages("Hi?")], [["Hello there"]])
    prompt = chat_prompt_ids(tiny.tokenizer, user_messages("Hi?"))
    ans = tiny.tokenizer("Hello there", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = tiny.model(input_ids=torch.tensor([prompt + ans])).logits[0]
    expected = [int(logits[len(prompt) - 1 + i].argmax()) == t for i, t in enumerate(ans)]
    assert s.greedy_hits == expected


def test_generation_is_greedy_and_batch_independent(tiny):
    prompts = [user_messages("Short?"), user_messages("A much longer question with many more words in it?")]
    together = tiny.generate(prompts, max_new_tokens=6)
    alone = [tiny.generate([p], max_new_tokens=6)[0] for p in prompts]
    assert together == alone  # left padding does not change what each prompt produces
    # greedy: the first generated token is the argmax after the prompt
    ids = chat_prompt_ids(tiny.tokenizer, prompts[0])
    with torch.no_grad():
        first = int(tiny.model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
    if first not in tiny.stop_ids:
        assert together[0].startswith(tiny.tokenizer.decode([first], skip_special_tokens=True).strip()[:1])


# --------------------------------------------------------------------------- HTTP client


class FakeServer:
    """Implements the lead's endpoint contract well enough to check what the client sends."""

    def __init__(self, fail_first: int = 0, final_status: str = "active"):
        self.calls: list[httpx.Request] = []
        self.fail_first = fail_first
        self.final_status = final_status
        self.polls = 0

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.calls.append(request)
        path = request.url.path
        if self.fail_first:
            self.fail_first -= 1
            return httpx.Response(503, text="warming up")
        if path == "/v1/unlearning/score":
            body = json.loads(request.content)
            tokens = body["continuation"].split()
            route = "refuse" if "Ameen" in body["messages"][0]["content"] else "pass"
            return httpx.Response(
                200,
                json={
                    "route": route,
                    "matched_request_ids": ["fr-1"] if route != "pass" else [],
                    "tokens": tokens,
                    "token_logprobs": [-1.0] * len(tokens),
                },
            )
        if path == "/v1/models":
            return httpx.Response(200, json={"object": "list", "data": [{"id": "tofu-target", "object": "model"}]})
        if path == "/v1/chat/completions":
            body = json.loads(request.content)
            if body.get("model") != "tofu-target":
                return httpx.Response(404, json={"error": {"message": "no such model"}})
            return httpx.Response(
                200,
                headers={"x-unlearnd-route": "pass"},
                json={
                    "choices": [
                        {
                            "index": 0,
                            "message": {
                                "role": "assistant",
                                "content": f" echo: {body['messages'][-1]['content']} t={body['temperature']} ",
                            },
                        }
                    ]
                },
            )
        if path == "/v1/unlearning/requests" and request.method == "POST":
            if request.headers.get("authorization") != "Bearer admin-secret":
                return httpx.Response(401, json={"detail": "bad key"})
            return httpx.Response(201, json={"object": "unlearning.request", "id": "fr-1", "status": "pending"})
        if path == "/v1/unlearning/requests/fr-1" and request.method == "GET":
            self.polls += 1
            status = self.final_status if self.polls >= 3 else "training"
            return httpx.Response(
                200, json={"id": "fr-1", "status": status, "error": "boom" if status == "failed" else None}
            )
        if path == "/v1/unlearning/requests/fr-1" and request.method == "DELETE":
            return httpx.Response(200, json={"id": "fr-1", "status": "inactive"})
        return httpx.Response(404)


def client(server: FakeServer, **kw) -> ServedModelUnderTest:
    return ServedModelUnderTest(
        "http://test:8000/", transport=httpx.MockTransport(server), admin_key="admin-secret", concurrency=2, **kw
    )


def test_score_sends_the_contract_payload_and_parses_logprobs():
    server = FakeServer()
    mut = client(server, model="tofu-target")
    out = mut.score(
        [user_messages("Who is Hina Ameen?"), user_messages("Capital of France?")],
        [["a geology author", "nobody"], ["Paris"]],
    )
    assert [len(r) for r in out] == [2, 1]
    assert out[0][0].logprobs == [-1.0, -1.0, -1.0] and out[0][0].route == "refuse"
    assert out[0][0].matched_request_ids == ["fr-1"] and out[1][0].route == "pass"
    assert out[0][0].greedy_hits is None  # not available over HTTP
    assert out[0][0].mean_logprob == pytest.approx(-1.0)
    body = json.loads(server.calls[0].content)
    assert set(body) == {"messages", "continuation", "model", "route_from"}
    assert body["route_from"] == "prompt"  # routed as the user's question alone, not on the gold answer
    assert body["messages"][0] == {"role": "user", "content": body["messages"][0]["content"]}
    assert sorted(mut.routes) == ["pass", "refuse", "refuse"]


def test_generate_is_greedy_chat_completion_for_the_served_model():
    server = FakeServer()
    mut = client(server)
    texts = mut.generate([user_messages("hello")], max_new_tokens=7)
    assert texts == ["echo: hello t=0"]
    assert server.calls[0].url.path == "/v1/models"  # the model name is discovered once
    body = json.loads(server.calls[1].content)
    assert body["temperature"] == 0 and body["max_tokens"] == 7 and body["model"] == "tofu-target"
    assert server.calls[1].url.path == "/v1/chat/completions"
    assert mut.generation_routes == ["pass"]


def test_generation_routes_stay_with_their_own_prompts_when_replies_finish_out_of_order():
    """Concurrent calls finish in any order; a route recorded as each call ended went to the wrong item
    (`reports/continual-lora.md` showed an answer served whole as `output_blocked`, a refusal as `none`)."""
    first_may_finish = threading.Event()

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"object": "list", "data": [{"id": "m", "object": "model"}]})
        question = json.loads(request.content)["messages"][-1]["content"]
        if question == "slow":
            assert first_may_finish.wait(10)  # the second prompt's reply comes back first
            route, text = "output_blocked", "I'm sorry, but I can't help with that."
        else:
            first_may_finish.set()
            route, text = "none", "an answer"
        message = {"role": "assistant", "content": text}
        return httpx.Response(200, headers={"x-unlearnd-route": route}, json={"choices": [{"message": message}]})

    mut = ServedModelUnderTest("http://test", transport=httpx.MockTransport(handler), model="m", concurrency=2)
    texts = mut.generate([user_messages("slow"), user_messages("fast")], max_new_tokens=4)
    assert texts == ["I'm sorry, but I can't help with that.", "an answer"]
    assert mut.generation_routes == ["output_blocked", "none"]


def test_retries_server_errors_then_succeeds(monkeypatch):
    monkeypatch.setattr("unlearnd.client.time.sleep", lambda s: None)
    server = FakeServer(fail_first=2)
    mut = client(server)
    assert mut.generate([user_messages("x")], 4) == ["echo: x t=0"]
    assert [c.url.path for c in server.calls] == ["/v1/models"] * 3 + ["/v1/chat/completions"]


def test_register_poll_and_deactivate_with_admin_key():
    server = FakeServer()
    mut = client(server)
    rid = mut.register(
        {"name": "tofu", "method": "refuse", "forget": [{"question": "q", "answer": "a"}], "entities": ["Hina Ameen"]}
    )
    assert rid == "fr-1"
    assert server.calls[0].headers["authorization"] == "Bearer admin-secret"
    naps: list[float] = []
    data = mut.wait_active(rid, poll_s=0.25, sleep=naps.append)
    assert data["status"] == "active" and server.polls == 3 and naps == [0.25, 0.25]
    mut.deactivate(rid)
    assert server.calls[-1].method == "DELETE"


def test_failed_request_and_missing_admin_key_raise():
    server = FakeServer(final_status="failed")
    mut = client(server)
    with pytest.raises(ServerError, match="failed: boom"):
        mut.wait_active("fr-1", sleep=lambda s: None)
    no_admin = ServedModelUnderTest("http://test", transport=httpx.MockTransport(FakeServer()))
    with pytest.raises(ServerError, match="admin key"):
        no_admin.register({"name": "x"})
    wrong = ServedModelUnderTest("http://test", transport=httpx.MockTransport(FakeServer()), admin_key="nope")
    with pytest.raises(ServerError, match="401"):
        wrong.register({"name": "x"})


def test_score_endpoint_null_logprob_becomes_minus_infinity():
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            200,
            json={"route": "refuse", "matched_request_ids": [], "tokens": ["a", "b"], "token_logprobs": [None, -2.0]},
        )

    mut = ServedModelUnderTest("http://test", transport=httpx.MockTransport(handler))
    [[s]] = mut.score([user_messages("q")], [["a b"]])
    assert s.logprobs[0] == -math.inf and s.logprobs[1] == -2.0
