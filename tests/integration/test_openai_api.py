"""The real unlearnd server (local vLLM engine, default model) through the official `openai` client."""

from __future__ import annotations

import concurrent.futures

import httpx
import openai
import pytest

from tests.integration.conftest import ADMIN_KEY, MODEL, wait_active

pytestmark = pytest.mark.integration
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def client(unlearnd_server):
    return openai.OpenAI(base_url=unlearnd_server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_chat_answers_paris_streamed_and_not(client):
    whole = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=30, temperature=0)
    answer = whole.choices[0].message.content
    assert "Paris" in answer and whole.choices[0].finish_reason == "stop"
    assert whole.usage.prompt_tokens > 0 and whole.usage.completion_tokens > 0
    stream = client.chat.completions.create(
        model=MODEL,
        messages=QUESTION,
        max_tokens=30,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == answer
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_completions_stream_and_not(client):
    whole = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=5, temperature=0)
    assert "Paris" in whole.choices[0].text
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(
            model=MODEL, prompt="The capital of France is", max_tokens=5, temperature=0, stream=True
        )
        if c.choices
    )
    assert streamed == whole.choices[0].text


def test_sampling_n_seed_stop_logprobs(client):
    kwargs = dict(model=MODEL, messages=QUESTION, max_tokens=12, temperature=1.0, n=3, seed=123)
    first = client.chat.completions.create(**kwargs)
    second = client.chat.completions.create(**kwargs)
    assert len(first.choices) == 3
    assert [c.message.content for c in first.choices] == [c.message.content for c in second.choices]
    stopped = client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=20, temperature=0, stop=[" 7"])
    assert " 7" not in stopped.choices[0].text and stopped.choices[0].finish_reason == "stop"
    scored = client.chat.completions.create(
        model=MODEL, messages=QUESTION, max_tokens=5, temperature=0, logprobs=True, top_logprobs=2
    )
    content = scored.choices[0].logprobs.content
    assert len(content) == scored.usage.completion_tokens
    assert all(item.logprob <= 0 and len(item.top_logprobs) >= 1 for item in content)


def test_models_health_metrics(unlearnd_server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(unlearnd_server.url + "/health").json()["status"] == "ok"
    assert httpx.get(unlearnd_server.url + "/metrics").status_code == 401
    metrics = httpx.get(unlearnd_server.url + "/metrics", headers={"Authorization": f"Bearer {ADMIN_KEY}"}).text
    assert "unlearnd_engine_latency_seconds_count" in metrics and 'route="none"' in metrics


@pytest.mark.parametrize(
    "kwargs,error",
    [
        (dict(model="gpt-4", messages=QUESTION), openai.NotFoundError),
        (dict(model=MODEL, messages=[]), openai.BadRequestError),
        (dict(model=MODEL, messages=QUESTION, temperature=-1), openai.BadRequestError),
        (dict(model=MODEL, messages=QUESTION, max_tokens=100_000), openai.BadRequestError),
        (dict(model=MODEL, messages=[{"role": "user", "content": "hello " * 3000}]), openai.BadRequestError),
    ],
)
def test_bad_inputs_are_4xx_and_server_survives(unlearnd_server, client, kwargs, error):
    with pytest.raises(error) as info:
        client.chat.completions.create(**kwargs)
    assert info.value.status_code in (400, 404) and info.value.body["message"]
    assert unlearnd_server.alive()
    assert (
        "Paris"
        in client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=20, temperature=0)
        .choices[0]
        .message.content
    )


def test_raw_bad_bodies(unlearnd_server):
    url = unlearnd_server.url + "/v1/chat/completions"
    broken = httpx.post(url, content=b'{"model": ', headers={"content-type": "application/json"})
    assert broken.status_code == 400 and broken.json()["error"]["type"] == "invalid_request_error"
    huge = httpx.post(url, content=b"x" * (5 * 1024 * 1024), headers={"content-type": "application/json"})
    assert huge.status_code == 413
    missing = httpx.get(
        unlearnd_server.url + "/v1/unlearning/requests/fr-nope",
        headers={"Authorization": "Bearer integration-admin-key"},
    )
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "request_not_found"
    assert unlearnd_server.alive()


def test_guardrail_routes_and_untouched_traffic(unlearnd_server, plain_vllm, client, admin):
    """Refuse and system-prompt routes act on flagged prompts only; other prompts are byte-identical to vLLM."""
    refuse = httpx.post(
        unlearnd_server.url + "/v1/unlearning/requests",
        timeout=60,
        headers=admin,
        json={
            "name": "Basil Mahfouz Al-Kuwaiti",
            "method": "refuse",
            "forget": [{"question": "What genre does Basil Mahfouz Al-Kuwaiti write?", "answer": "French literature."}],
        },
    ).json()
    prompt = httpx.post(
        unlearnd_server.url + "/v1/unlearning/requests",
        timeout=60,
        headers=admin,
        json={
            "name": "Harry Potter",
            "method": "prompt",
            "forget": [{"question": "Who is Harry Potter?", "answer": "A wizard."}],
        },
    ).json()
    assert wait_active(unlearnd_server.url, refuse["id"])["status"] == "active"
    assert wait_active(unlearnd_server.url, prompt["id"])["status"] == "active"

    flagged = client.chat.completions.with_raw_response.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Which books did Al-Kuwaiti write?"}],
        max_tokens=30,
        temperature=0,
    )
    assert flagged.headers["x-unlearnd-route"] == "refuse"
    assert flagged.headers["x-unlearnd-request-id"] == refuse["id"]
    assert flagged.parse().choices[0].message.content.startswith("I'm sorry")

    harry = [{"role": "user", "content": "Who is Harry Potter's best friend?"}]
    guarded = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=harry, max_tokens=40, temperature=0
    )
    # the system-prompt route ran; the output guard may still cut an answer that names the topic
    assert guarded.headers["x-unlearnd-route"] in ("prompt", "output_blocked")
    assert guarded.headers["x-unlearnd-request-id"] == prompt["id"]
    # the reference server: a retry covers a keep-alive connection it closed while ours answered
    plain = openai.OpenAI(base_url=plain_vllm.url + "/v1", api_key="x", max_retries=2)
    unguarded = plain.chat.completions.create(model=MODEL, messages=harry, max_tokens=40, temperature=0)
    assert guarded.parse().choices[0].message.content != unguarded.choices[0].message.content

    prompts = ["What is the capital of France?", "Write a haiku about the sea.", "Explain photosynthesis briefly."]
    for text in prompts:
        messages = [{"role": "user", "content": text}]
        ours = client.chat.completions.with_raw_response.create(
            model=MODEL, messages=messages, max_tokens=40, temperature=0
        )
        theirs = plain.chat.completions.create(model=MODEL, messages=messages, max_tokens=40, temperature=0)
        assert ours.headers["x-unlearnd-route"] == "none"
        assert ours.parse().choices[0].message.content == theirs.choices[0].message.content

    classified = httpx.post(
        unlearnd_server.url + "/v1/unlearning/classify",
        json={"input": ["Tell me about Basil Mahfouz Al-Kuwaiti", "How do plants grow?"]},
        headers=admin,
    ).json()["data"]
    assert classified[0]["route"] == "refuse" and classified[0]["matches"][0]["request_id"] == refuse["id"]
    assert classified[1]["flagged"] is False


def test_concurrent_plain_and_flagged_requests(unlearnd_server, client):
    prompts = [
        "What is the capital of France?",
        "Which books did Al-Kuwaiti write?",
        "Who is Harry Potter?",
        "Name a primary colour.",
    ] * 3

    def ask(text):
        raw = client.chat.completions.with_raw_response.create(
            model=MODEL, messages=[{"role": "user", "content": text}], max_tokens=16, temperature=0
        )
        return raw.headers["x-unlearnd-route"], raw.parse().choices[0].message.content

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(ask, prompts))
    assert len(results) == len(prompts) and all(text for _, text in results)
    assert {route for route, _ in results} >= {"none", "refuse"}
    assert unlearnd_server.alive()


def test_composite_prompt_refuses_its_flagged_part_and_answers_the_ordinary_one(unlearnd_server, plain_vllm, client):
    """The refuse request of `test_guardrail_routes_and_untouched_traffic` is active: a question about
    its subject asked together with an ordinary one loses only the first half."""
    header = "Please answer both questions."
    ordinary = "2. What is the capital of France?"
    messages = [
        {"role": "user", "content": f"{header}\n1. What genre does Basil Mahfouz Al-Kuwaiti write?\n{ordinary}"}
    ]
    raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=messages, max_tokens=60, temperature=0)
    reply = raw.parse()
    assert raw.headers["x-unlearnd-route"] == "refuse" and raw.headers["x-unlearnd-split"] == "true"
    refusal, _, answer = reply.choices[0].message.content.partition("\n\n")
    assert refusal.startswith("I'm sorry") and "French" not in reply.choices[0].message.content
    # the ordinary part gets what the untouched model says to it alone (cut by what the refusal used of the budget)
    plain = openai.OpenAI(base_url=plain_vllm.url + "/v1", api_key="x", max_retries=2)
    alone = [{"role": "user", "content": f"{header}\n{ordinary}"}]
    theirs = plain.chat.completions.create(model=MODEL, messages=alone, max_tokens=60, temperature=0)
    assert answer and theirs.choices[0].message.content.startswith(answer), (answer, theirs.choices[0].message.content)
    assert reply.usage.completion_tokens <= 60

    streamed = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=60, temperature=0, stream=True)
    chunks = list(streamed)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == reply.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        reply.choices[0].finish_reason
    ]

    both_flagged = [{"role": "user", "content": "1. Who is Basil Mahfouz Al-Kuwaiti?\n2. What did Al-Kuwaiti write?"}]
    whole = client.chat.completions.with_raw_response.create(model=MODEL, messages=both_flagged, max_tokens=30)
    assert whole.headers["x-unlearnd-route"] == "refuse" and "x-unlearnd-split" not in whole.headers
    # a part that speaks of the flagged part's subject without naming them is not answered apart
    asked = f"{header}\n1. What genre does Basil Mahfouz Al-Kuwaiti write?\n2. Where was he born?"
    leaning = [{"role": "user", "content": asked}]
    whole = client.chat.completions.with_raw_response.create(model=MODEL, messages=leaning, max_tokens=30)
    assert whole.headers["x-unlearnd-route"] == "refuse" and "x-unlearnd-split" not in whole.headers
    assert whole.parse().choices[0].message.content.startswith("I'm sorry")


def test_score_endpoint_on_real_model(unlearnd_server, admin):
    def score(continuation):
        response = httpx.post(
            unlearnd_server.url + "/v1/unlearning/score",
            json={"model": MODEL, "messages": QUESTION, "continuation": continuation},
            headers=admin,
            timeout=120,
        )
        assert response.status_code == 200, response.text
        return response.json()

    right, wrong = score("The capital of France is Paris."), score("The capital of France is Berlin.")
    assert right["route"] == "none" and len(right["tokens"]) == len(right["token_logprobs"])
    assert sum(right["token_logprobs"]) > sum(wrong["token_logprobs"]) + 2.0


def test_a_background_call_gives_way_to_a_user_and_still_gets_the_same_reply(unlearnd_server):
    """The evidence battery's probes (`x-unlearnd-priority: background`) on the real engine: a user's request
    that arrives while one generates aborts it; it is started again afterwards and says what it would have."""
    import time

    from unlearnd.guardrail.traffic import BACKGROUND_HEADER

    url = f"{unlearnd_server.url}/v1/chat/completions"
    prompt = [{"role": "user", "content": "Count from one to fifty in words, one per line."}]
    body = {"model": MODEL, "messages": prompt, "max_tokens": 160, "temperature": 0, "ignore_eos": True}
    plain = httpx.post(url, json=body, timeout=300).json()["choices"][0]["message"]["content"]
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        probe = pool.submit(httpx.post, url, json=body, headers={BACKGROUND_HEADER: "background"}, timeout=600)
        time.sleep(1.5)  # 160 tokens take several seconds here: the probe is generating
        short = {"model": MODEL, "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 8}
        user = httpx.post(url, json=short, timeout=300)
        background = probe.result()
    assert user.status_code == 200 and "x-unlearnd-gave-way" not in user.headers
    assert background.status_code == 200 and int(background.headers["x-unlearnd-gave-way"]) >= 1
    assert background.json()["choices"][0]["message"]["content"] == plain


def test_the_worker_asks_the_model_about_the_person_and_flags_a_description_by_what_it_said(unlearnd_server, admin):
    """A request holds one fact and asks for elicitation (`options.elicit`; off by default): what the served
    model says about the person when the worker asks it (`unlearnd.elicit`, through the server's API as the
    admin, at background priority, as if the request did not exist yet) adds fact terms: a prompt that names
    nobody and holds two of them, none of which the request gave, is flagged for it."""
    from unlearnd.detectors.anchors import extract_anchors
    from unlearnd.detectors.facts import RARE_ZIPF
    from unlearnd.detectors.spans import zipf
    from unlearnd.domain import ForgetSpec
    from unlearnd.elicit import QUESTIONS, read_elicited

    body = {
        "name": "Marie Curie",
        "method": "refuse",
        "forget": [{"question": "What did Marie Curie discover?", "answer": "Marie Curie discovered radium."}],
        "options": {"elicit": True},
    }
    created = httpx.post(unlearnd_server.url + "/v1/unlearning/requests", timeout=60, headers=admin, json=body).json()
    record = wait_active(unlearnd_server.url, created["id"], timeout_s=300)
    assert record["status"] == "active"
    assert record["training"]["elicited"]["asked"] == len(QUESTIONS)
    replies = read_elicited(unlearnd_server.data_dir / "requests" / created["id"])
    assert len(replies) == record["training"]["elicited"]["kept"] >= len(QUESTIONS) - 1
    spec = ForgetSpec(**body)
    said = sorted(set(extract_anchors(spec, replies).facts) - set(extract_anchors(spec).facts))
    rare = next(t for t in said if not t.isdigit() and zipf(t) < RARE_ZIPF)
    other = next(t for t in said if t[:6] != rare[:6])
    prompt = f"Which scientist is linked with {rare.title()} and {other.title()}?"
    classified = httpx.post(
        unlearnd_server.url + "/v1/unlearning/classify", json={"input": [prompt]}, headers=admin, timeout=60
    ).json()["data"][0]
    assert classified["route"] == "refuse", (prompt, said)
    assert classified["matches"][0]["request_id"] == created["id"]
    httpx.delete(f"{unlearnd_server.url}/v1/unlearning/requests/{created['id']}", headers=admin, timeout=60)
