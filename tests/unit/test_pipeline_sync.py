"""The registry sync of a server: the order in which it serves what changed."""

from __future__ import annotations

import threading
import time

from fastapi.testclient import TestClient

from tests.helpers import ADMIN, TinyEngine, app_settings
from unlearnd.guardrail.pipeline import GuardrailPipeline
from unlearnd.interventions.guardrails import REFUSAL
from unlearnd.jobs.worker import run_worker
from unlearnd.server.app import create_app


def _spec(name: str, person: str) -> dict:
    forget = [{"question": f"Who is {person}?", "answer": "A novelist."}]
    return {"name": name, "method": "refuse", "entities": [person], "forget": forget}


def test_a_request_registered_while_artifacts_load_is_refused_before_the_next_load(
    tmp_path, default_model_dir, monkeypatch
):
    """A replica loading trained requests' artifacts (seconds each for a LoRA on a remote engine; a thousand
    of them when it starts) refuses a request registered meanwhile by name before its next load, not after
    all of them. The old round loaded in registry order and reached the new request last."""
    gates = {"slow-1": threading.Event(), "slow-2": threading.Event()}
    loading: list[str] = []
    real_load = GuardrailPipeline._load

    def slow_load(self, request):
        if request.name in gates:
            loading.append(request.name)
            gates[request.name].wait(30)
        return real_load(self, request)

    monkeypatch.setattr(GuardrailPipeline, "_load", slow_load)
    settings = app_settings(tmp_path / "data")
    ask = {"model": "tiny", "messages": [{"role": "user", "content": "Who is Basil Mahfouz?"}], "max_tokens": 32}
    with TestClient(create_app(settings, engine=TinyEngine(default_model_dir, max_model_len=128))) as client:
        try:
            for name, person in (("slow-1", "Jane Doe"), ("slow-2", "John Roe")):
                assert client.post("/v1/unlearning/requests", headers=ADMIN, json=_spec(name, person)).status_code < 300
            run_worker(settings.data_dir, "keyword", "unused", once=True)  # both trained: the sync loads them
            deadline = time.time() + 10
            while not loading and time.time() < deadline:
                time.sleep(0.02)
            assert loading == ["slow-1"]  # the first load holds the round
            client.post("/v1/unlearning/requests", headers=ADMIN, json=_spec("new", "Basil Mahfouz"))
            gates["slow-1"].set()  # the second load will hold it as long as the gate stays shut
            deadline, reply = time.time() + 5, ""
            while reply != REFUSAL and time.time() < deadline:
                reply = client.post("/v1/chat/completions", json=ask).json()["choices"][0]["message"]["content"]
                time.sleep(0.05)
            assert reply == REFUSAL  # refused by name while the second load is still under way
            assert not gates["slow-2"].is_set()
        finally:
            for gate in gates.values():
                gate.set()
