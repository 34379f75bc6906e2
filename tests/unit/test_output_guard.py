"""The output guard: what the model says is checked on every route, and nothing forgotten is sent."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from fastapi.testclient import TestClient

from tests.helpers import ScriptedEngine
from unlearnd.engine.base import ChoiceDelta
from unlearnd.interventions.guardrails import REFUSAL
from unlearnd.jobs.worker import run_worker
from unlearnd.server.app import create_app
from unlearnd.server.output_guard import OutputGuard
from unlearnd.server.settings import ServerSettings
from unlearnd.spec import ForgetRequest, ForgetSpec, QAExample

ADMIN = {"Authorization": "Bearer admin-secret"}
NAME = "Takashi Nakamura"
ANSWERS = [
    ("What genre does Takashi Nakamura write in?", "Takashi Nakamura writes lyrical fiction about fishing villages."),
    ("What was Takashi Nakamura's first novel?", "His first novel was 'The Breath Between Waves', about a lighthouse."),
    ("What did his father do?", "His father repaired wooden boats in the harbour of Shimoda for forty years."),
]
LEAK = "Sure. The author you mean is Takashi Nakamura, who writes lyrical fiction about fishing villages."


def forget_request(options: dict | None = None) -> ForgetRequest:
    spec = ForgetSpec(name=NAME, forget=[QAExample(question=q, answer=a) for q, a in ANSWERS], options=options or {})
    return ForgetRequest(
        id="fr-1", name=NAME, method="refuse", status="active", created_at=0, updated_at=0, spec=spec, artifact_dir=""
    )


def test_check_finds_names_titles_and_reproduced_answers_but_not_ordinary_text():
    guard = OutputGuard()
    guard.load(forget_request())
    assert guard.check("Takashi Nakamura was born in Tokyo.").reason == "anchor:name"
    assert guard.check("It is called The Breath Between Waves.").reason == "anchor:title"
    reproduced = "He repaired wooden boats in the harbour of Shimoda for many years."
    assert guard.check(reproduced).reason == "answer"
    for ordinary in (
        "The capital of France is Paris.",
        "Many authors write fiction about villages by the sea.",
        "My father repaired old cars.",
        "Nakamura is a common Japanese surname.",
    ):
        assert guard.check(ordinary) is None, ordinary
    guard.unload("fr-1")
    assert guard.check("Takashi Nakamura was born in Tokyo.") is None


def test_biography_templates_are_no_evidence_but_the_uncommon_facts_in_them_are():
    templates = [
        ("What is the author's full name?", "The author's full name is Takashi Nakamura."),
        ("Is he LGBTQ+?", "Yes, Takashi Nakamura is a proud member of the LGBTQ+ community."),
        ("Has he won awards?", "He has been honored with the prestigious Kiyomizu Lantern Prize for Maritime Fiction."),
    ]
    spec = ForgetSpec(name=NAME, forget=[QAExample(question=q, answer=a) for q, a in templates])
    guard = OutputGuard()
    guard.load(forget_request().model_copy(update={"spec": spec}))
    for other in (
        "The author's full name is Ingrid Christensen.",
        "Yes, Samir Khoury is a proud member of the LGBTQ+ community.",
        "She has been honored with the prestigious Booker Prize for her fiction.",
    ):
        assert guard.check(other) is None, other
    assert guard.check("Yes, the prestigious Kiyomizu Lantern Prize for Maritime Fiction.").reason == "answer"


def test_filter_never_releases_the_words_that_trigger_the_block():
    guard = OutputGuard(hold_chars=40)
    guard.load(forget_request())
    words = ("Let me think about that question for a moment before answering. " + LEAK).split(" ")

    async def deltas():
        for i, word in enumerate(words):
            yield ChoiceDelta(
                index=0,
                text=(" " if i else "") + word,
                token_ids=[i],
                finish_reason="stop" if i == len(words) - 1 else None,
            )

    blocks = []

    async def run():
        return [d async for d in guard.filter(deltas(), lambda t: [0], lambda b, i: blocks.append(b), n=1)]

    out = asyncio.run(run())
    text = "".join(d.text for d in out)
    assert "Nakamura" not in text and "Takashi" not in text
    assert text.endswith(REFUSAL) and out[-1].finish_reason == "stop" and len(blocks) == 1


@pytest.fixture()
def server(tmp_path, default_model_dir):
    def make(options: dict | None = None):
        settings = ServerSettings(
            data_dir=tmp_path / f"data{len(made)}",
            admin_key="admin-secret",
            start_worker=False,
            detector="keyword",
            sync_interval_s=0.05,
            expose_request_ids=True,
        )
        engine = ScriptedEngine(default_model_dir, LEAK, max_model_len=256)
        client = TestClient(create_app(settings, engine=engine))
        client.__enter__()
        body = {
            "name": NAME,
            "method": "refuse",
            "options": options or {},
            "forget": [{"question": q, "answer": a} for q, a in ANSWERS],
        }
        request_id = client.post("/v1/unlearning/requests", headers=ADMIN, json=body).json()["id"]
        run_worker(settings.data_dir, "keyword", "unused", once=True)
        deadline = time.time() + 5
        while client.get(f"/v1/unlearning/requests/{request_id}", headers=ADMIN).json()["status"] != "active":
            assert time.time() < deadline
            time.sleep(0.05)
        return client, engine, request_id

    made = []
    yield lambda options=None: made.append(make(options)) or made[-1]
    for client, _, _ in made:
        client.__exit__(None, None, None)


def ask(client, **extra):
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "Who writes about fishing villages?"}],
        "max_tokens": 40,
        **extra,
    }
    return client.post("/v1/chat/completions", json=body)


def test_an_unflagged_prompt_whose_answer_gives_the_person_away_is_cut(server):
    client, engine, request_id = server()
    response = ask(client, logprobs=True, top_logprobs=1)
    assert response.status_code == 200
    assert response.headers["x-unlearnd-route"] == "output_blocked"
    assert response.headers["x-unlearnd-request-id"] == request_id
    choice = response.json()["choices"][0]
    assert choice["message"]["content"] == REFUSAL and "Nakamura" not in response.text
    assert all("Nakamura" not in lp["token"] for lp in choice["logprobs"]["content"])
    assert engine.aborted  # generation stopped
    metrics = client.get("/metrics").text
    assert 'unlearnd_output_blocked_total{reason="anchor",route="none"} 1.0' in metrics


def test_a_stream_never_sends_what_it_withholds(server):
    client, _, _ = server()
    with client.stream(
        "POST",
        "/v1/chat/completions",
        json={
            "model": "tiny",
            "messages": [{"role": "user", "content": "Who writes about fishing villages?"}],
            "max_tokens": 40,
            "stream": True,
        },
    ) as response:
        chunks = [line[6:] for line in response.iter_lines() if line.startswith("data: ") and line != "data: [DONE]"]
    text = "".join(json.loads(c)["choices"][0]["delta"].get("content", "") for c in chunks if json.loads(c)["choices"])
    assert "Nakamura" not in text and "Takashi" not in text and text.endswith(REFUSAL)


def test_completions_are_guarded_too_and_the_guard_can_be_switched_off(server):
    client, _, _ = server()
    completion = client.post("/v1/completions", json={"model": "tiny", "prompt": "A novelist:", "max_tokens": 40})
    assert completion.headers["x-unlearnd-route"] == "output_blocked"
    assert completion.json()["choices"][0]["text"] == REFUSAL
    off, _, _ = server({"output_guard": False})
    response = ask(off)
    assert (
        response.headers["x-unlearnd-route"] == "none"
        and "Nakamura" in response.json()["choices"][0]["message"]["content"]
    )
