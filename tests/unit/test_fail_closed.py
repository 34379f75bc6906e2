"""Fail closed: a request whose artifacts cannot be loaded keeps blocking (matched by name, refused),
a broken adapter never reaches the engine, and a dead engine is reported and ends the process."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
import torch
from fastapi.testclient import TestClient
from safetensors import SafetensorError
from safetensors.torch import save_file

from tests.helpers import ADMIN, TinyEngine, app_settings
from unlearnd.artifacts import tree_digest
from unlearnd.domain import ForgetSpec, QAExample, Status
from unlearnd.engine.base import EngineError
from unlearnd.engine.remote import BackendFailure
from unlearnd.interventions.guardrails import REFUSAL
from unlearnd.interventions.lora import LoRAArtifact, check_adapter_weights
from unlearnd.jobs.worker import run_worker
from unlearnd.registry import Registry
from unlearnd.server import app as app_module
from unlearnd.server.app import create_app, watch_engine

NAME = "Basil Mahfouz Al-Kuwaiti"
FLAGGED = f"What did {NAME} write?"


@pytest.fixture()
def engine(default_model_dir):
    return TinyEngine(default_model_dir, max_model_len=128)


@pytest.fixture()
def settings(tmp_path):
    return app_settings(tmp_path / "data")


def chat(client, content):
    body = {"model": "tiny", "messages": [{"role": "user", "content": content}], "max_tokens": 20, "temperature": 0}
    return client.post("/v1/chat/completions", json=body)


WAIT_S = 30.0  # a loaded 2-core machine (a benchmark beside the suite) took over 5 s for one sync


def wait_status(client, request_id, status, timeout_s=WAIT_S):
    deadline = time.time() + timeout_s
    while (current := client.get(f"/v1/unlearning/requests/{request_id}", headers=ADMIN).json())["status"] != status:
        assert time.time() < deadline, current
        time.sleep(0.05)
    return current


def test_an_unloadable_detector_artifact_fails_closed_and_recovers_by_retraining(settings, engine):
    spec = {"name": NAME, "method": "prompt", "forget": [{"question": FLAGGED, "answer": "Novels."}]}
    with TestClient(create_app(settings, engine=engine)) as client:
        request_id = client.post("/v1/unlearning/requests", headers=ADMIN, json=spec).json()["id"]
        run_worker(settings.data_dir, "keyword", "unused", once=True)
        wait_status(client, request_id, "active")
        assert chat(client, FLAGGED).headers["x-unlearnd-route"] == "prompt"

        registry = Registry(settings.data_dir)
        (registry.artifact_dir(request_id) / "detector.json").write_text('{"entities": ["Bas')  # truncated
        broken_as_trained = tree_digest(registry.artifact_dir(request_id))  # the digest matches: the load fails
        registry.set_status(request_id, Status.ready, artifact_digest=broken_as_trained)  # e.g. a restart
        client.app.state.unlearnd.pipeline._unload(request_id)
        degraded = wait_status(client, request_id, "degraded")
        assert degraded["error"].startswith("load failed: JSONDecodeError")
        refused = chat(client, FLAGGED)
        assert refused.headers["x-unlearnd-route"] == "refuse"
        assert refused.json()["choices"][0]["message"]["content"] == REFUSAL  # never the raw model
        assert chat(client, "What is the capital of France?").headers["x-unlearnd-route"] == "none"
        health = client.get("/health", headers=ADMIN).json()
        assert health["degraded_forget_requests"] == 1
        assert "unlearnd_degraded_forget_requests 1.0" in client.get("/metrics", headers=ADMIN).text

        assert client.post(f"/v1/unlearning/requests/{request_id}/retrain", headers=ADMIN).json()["status"] == "pending"
        time.sleep(0.2)  # a few syncs while it waits for the worker: still refused by name
        assert chat(client, FLAGGED).headers["x-unlearnd-route"] == "refuse"
        run_worker(settings.data_dir, "keyword", "unused", once=True)
        wait_status(client, request_id, "active")
        assert chat(client, FLAGGED).headers["x-unlearnd-route"] == "prompt"
        assert client.post(f"/v1/unlearning/requests/{request_id}/retrain", headers=ADMIN).status_code == 409


def test_an_artifact_changed_after_training_fails_closed_even_when_it_still_loads(settings, engine):
    """A replica loading a folder that is not what the worker made ready (edited, another version, half
    copied) refuses the request by name instead of serving whatever the folder now says."""
    spec = {"name": NAME, "method": "prompt", "forget": [{"question": FLAGGED, "answer": "Novels."}]}
    with TestClient(create_app(settings, engine=engine)) as client:
        request_id = client.post("/v1/unlearning/requests", headers=ADMIN, json=spec).json()["id"]
        run_worker(settings.data_dir, "keyword", "unused", once=True)
        wait_status(client, request_id, "active")
        registry = Registry(settings.data_dir)
        assert registry.get(request_id).artifact_digest.startswith("sha256:")
        detector = registry.artifact_dir(request_id) / "detector.json"
        detector.write_text(json.dumps(json.loads(detector.read_text()), indent=4))  # same content, still loads
        registry.set_status(request_id, Status.ready)  # e.g. another replica, or a restart: loaded again
        client.app.state.unlearnd.pipeline._unload(request_id)
        degraded = wait_status(client, request_id, "degraded")
        assert degraded["error"].startswith("load failed: ArtifactMismatch")
        refused = chat(client, FLAGGED)
        assert refused.headers["x-unlearnd-route"] == "refuse"
        assert refused.json()["choices"][0]["message"]["content"] == REFUSAL
        # a hand re-fit (`unlearnd train detector --request`) stores the folder's new digest: it loads again
        from typer.testing import CliRunner

        from unlearnd.cli import app as cli

        args = ["train", "detector", "--request", request_id, "--data-dir", str(settings.data_dir)]
        assert CliRunner().invoke(cli, [*args, "--detector", "keyword"]).exit_code == 0
        assert registry.get(request_id).artifact_digest == tree_digest(registry.artifact_dir(request_id))
        run_worker(settings.data_dir, "keyword", "unused", once=True)  # nothing to do until re-trained
        assert client.post(f"/v1/unlearning/requests/{request_id}/retrain", headers=ADMIN).status_code == 200
        run_worker(settings.data_dir, "keyword", "unused", once=True)
        wait_status(client, request_id, "active")
        assert chat(client, FLAGGED).headers["x-unlearnd-route"] == "prompt"


SMOLLM2 = {  # SmolLM2-135M's config.json, the part adapters must fit
    "hidden_size": 576,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
}


def _adapter(folder, rank=4, hidden=576, nan=False, garbage=False, module="q_proj", out=576, layer=0):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps({"r": rank, "lora_alpha": 8, "target_modules": [module]}))
    if garbage:
        (folder / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage" + bytes(64))
        return
    a = torch.randn(rank, hidden)
    if nan:
        a[0, 0] = float("nan")
    prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
    save_file(
        {f"{prefix}.lora_A.weight": a, f"{prefix}.lora_B.weight": torch.zeros(out, rank)},
        str(folder / "adapter_model.safetensors"),
    )


def test_adapter_weights_are_checked_before_the_engine_sees_them(tmp_path):
    config = {"r": 4}
    _adapter(tmp_path / "good")
    check_adapter_weights(tmp_path / "good", config, SMOLLM2)
    _adapter(tmp_path / "good-kv", module="k_proj", out=192)  # 3 key/value heads of 64
    check_adapter_weights(tmp_path / "good-kv", config, SMOLLM2)
    broken = {
        "nan": {"nan": True},
        "garbage": {"garbage": True},
        "width": {"hidden": 64},
        "kv-out": {"module": "k_proj", "out": 576},  # the width of q, not of k: passed the width-only check
        "layer": {"layer": 30},  # the model has layers 0-29
        "rank": {"rank": 8},
    }
    for name, kwargs in broken.items():
        _adapter(tmp_path / name, **kwargs)
        with pytest.raises((ValueError, SafetensorError)):  # refused, whichever check sees it first
            check_adapter_weights(tmp_path / name, config, SMOLLM2)


def test_a_garbage_adapter_is_refused_by_name_and_ordinary_requests_go_on(settings, engine):
    registry = Registry(settings.data_dir)
    spec = ForgetSpec(name=NAME, method="lora", forget=[QAExample(question=FLAGGED, answer="Novels.")])
    record = registry.add(spec)
    artifact_dir = registry.artifact_dir(record.id)
    from unlearnd.detectors import get_detector

    get_detector("keyword").fit(record, artifact_dir)
    _adapter(artifact_dir / "lora", garbage=True)
    LoRAArtifact(folders={"1.0": "lora"}).write(artifact_dir)
    registry.set_status(record.id, Status.ready)
    with TestClient(create_app(settings, engine=engine)) as client:
        assert wait_status(client, record.id, "degraded")["error"].startswith("load failed:")
        pipeline = client.app.state.unlearnd.pipeline
        assert record.id in pipeline.detector.loaded_ids  # its detector loaded: it keeps flagging, not names only
        assert chat(client, FLAGGED).json()["choices"][0]["message"]["content"] == REFUSAL
        assert not any(r.lora for r in engine.seen)  # the adapter never reached the engine
        for _ in range(3):
            assert chat(client, "What is the capital of France?").status_code == 200


class AdapterLoadingEngine(TinyEngine):
    """Records the adapters it is asked to load ahead of use; refuses them all when `refuse` is set."""

    refuse = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.loaded: list[str] = []

    async def load_adapter(self, lora):
        if self.refuse:
            raise EngineError(f"vLLM did not load adapter {lora.name}")
        self.loaded.append(lora.name)


@pytest.mark.parametrize("engine_refuses", [False, True])
def test_the_engine_loads_an_adapter_before_any_prompt_is_routed_to_it(settings, default_model_dir, engine_refuses):
    engine = AdapterLoadingEngine(default_model_dir, max_model_len=128)
    engine.refuse = engine_refuses
    registry = Registry(settings.data_dir)
    record = registry.add(ForgetSpec(name=NAME, method="lora", forget=[QAExample(question=FLAGGED, answer="Novels.")]))
    artifact_dir = registry.artifact_dir(record.id)
    from unlearnd.detectors import get_detector

    get_detector("keyword").fit(record, artifact_dir)
    _adapter(artifact_dir / "lora", hidden=32, out=32)  # fits the tiny test model: passes the file checks
    LoRAArtifact(folders={"1.0": "lora"}, threshold=0.0).write(artifact_dir)
    registry.set_status(record.id, Status.ready)
    with TestClient(create_app(settings, engine=engine)) as client:
        if engine_refuses:  # what the engine cannot load is found here, not by a user's prompt
            assert "EngineError: vLLM did not load adapter" in wait_status(client, record.id, "degraded")["error"]
            assert chat(client, FLAGGED).json()["choices"][0]["message"]["content"] == REFUSAL
            assert not any(r.lora for r in engine.seen)
        else:
            wait_status(client, record.id, "active")
            assert engine.loaded == [f"{record.id}-v1"]
            assert chat(client, FLAGGED).headers["x-unlearnd-route"] == "lora"
            assert engine.seen[-1].lora.name == f"{record.id}-v1"
        assert chat(client, "What is the capital of France?").headers["x-unlearnd-route"] == "none"


class DyingEngine(TinyEngine):
    dead: str | None = None

    def dead_reason(self):
        return self.dead


def test_a_dead_engine_makes_health_503_and_ends_the_process(settings, default_model_dir, monkeypatch):
    engine = DyingEngine(default_model_dir, max_model_len=128)
    with TestClient(create_app(settings, engine=engine)) as client:
        assert client.get("/health").status_code == 200
        engine.dead = "the vLLM engine core died (EngineDeadError)"
        response = client.get("/health")
        assert response.status_code == 503 and response.json()["status"] == "engine_dead"
        assert client.get("/health", headers=ADMIN).json()["error"].startswith("the vLLM engine core died")

    exits = []
    monkeypatch.setattr(app_module.os, "_exit", lambda code: exits.append(code))
    asyncio.run(watch_engine(engine, exit_process=True, interval_s=0.01, grace_s=0.0))
    assert exits == [app_module.ENGINE_DEAD_EXIT]


def test_a_request_is_refused_by_name_from_registration_until_its_artifacts_serve_it(settings, engine):
    spec = {"name": NAME, "method": "prompt", "forget": [{"question": FLAGGED, "answer": "Novels."}]}
    broken = {"name": "Jaime Vasquez", "method": "eco", "forget": [{"question": "Who is Jaime Vasquez?"}]}
    with TestClient(create_app(settings, engine=engine)) as client:
        request_id = client.post("/v1/unlearning/requests", headers=ADMIN, json=spec).json()["id"]
        broken_id = client.post(
            "/v1/unlearning/requests", headers=ADMIN, json={**broken, "options": {"no_such_option": 1}}
        ).json()["id"]
        # no worker has run: both are pending, and refused by name from the moment they were registered
        assert wait_status(client, request_id, "pending")
        pending = chat(client, f"Tell me about {NAME}.")
        assert pending.headers["x-unlearnd-route"] == "refuse"
        assert pending.json()["choices"][0]["message"]["content"] == REFUSAL
        assert chat(client, "What is the capital of France?").headers["x-unlearnd-route"] == "none"
        assert client.get("/health", headers=ADMIN).json()["untrained_forget_requests"] == 2

        run_worker(settings.data_dir, "keyword", "unused", once=True)
        run_worker(settings.data_dir, "keyword", "unused", once=True)
        wait_status(client, request_id, "active")
        assert chat(client, FLAGGED).headers["x-unlearnd-route"] == "prompt"  # its own route, once trained
        assert wait_status(client, broken_id, "failed")["error"]
        assert chat(client, "Who is Jaime Vasquez?").headers["x-unlearnd-route"] == "refuse"  # a failed training
        health = client.get("/health", headers=ADMIN).json()
        assert (health["active_forget_requests"], health["untrained_forget_requests"]) == (1, 1)


def test_a_request_another_server_activated_is_served_by_its_own_route_here_too(settings, engine):
    spec = {"name": NAME, "method": "prompt", "forget": [{"question": FLAGGED, "answer": "Novels."}]}
    with (
        TestClient(create_app(settings, engine=engine)) as first,
        TestClient(create_app(settings, engine=engine)) as second,
    ):
        request_id = first.post("/v1/unlearning/requests", headers=ADMIN, json=spec).json()["id"]
        deadline = time.time() + WAIT_S
        while request_id not in second.app.state.unlearnd.pipeline.active:  # its next sync
            assert time.time() < deadline
            time.sleep(0.05)
        assert chat(second, FLAGGED).headers["x-unlearnd-route"] == "refuse"  # both refuse it while untrained
        run_worker(settings.data_dir, "keyword", "unused", once=True)
        deadline = time.time() + WAIT_S
        while request_id in second.app.state.unlearnd.pipeline.degraded:  # whichever server activates it
            assert time.time() < deadline, "the second server kept refusing a trained request"
            time.sleep(0.05)
        for client in (first, second):
            wait_status(client, request_id, "active")
            assert chat(client, FLAGGED).headers["x-unlearnd-route"] == "prompt"


class FlakyRemoteEngine(AdapterLoadingEngine):
    """Its first adapter load meets a fleet that is restarting (a transport error), later ones work."""

    failures = 1
    error: Exception = httpx.ConnectError("connection refused")

    async def load_adapter(self, lora):
        if self.failures:
            self.failures -= 1
            raise self.error
        await super().load_adapter(lora)


@pytest.mark.parametrize(
    "error",
    [httpx.ConnectError("connection refused"), BackendFailure("remote vLLM server at http://b is not reachable")],
    ids=["transport", "backend"],
)
def test_an_engine_that_cannot_be_reached_delays_an_adapter_without_marking_it_broken(
    settings, default_model_dir, error
):
    engine = FlakyRemoteEngine(default_model_dir, max_model_len=128)
    engine.error = error
    registry = Registry(settings.data_dir)
    record = registry.add(ForgetSpec(name=NAME, method="lora", forget=[QAExample(question=FLAGGED, answer="Novels.")]))
    artifact_dir = registry.artifact_dir(record.id)
    from unlearnd.detectors import get_detector

    get_detector("keyword").fit(record, artifact_dir)
    _adapter(artifact_dir / "lora", hidden=32, out=32)
    LoRAArtifact(folders={"1.0": "lora"}, threshold=0.0).write(artifact_dir)
    registry.set_status(record.id, Status.ready)
    with TestClient(create_app(settings, engine=engine)) as client:
        # the first sync met the transport error: refused meanwhile, and never recorded as a broken artifact
        assert wait_status(client, record.id, "active")["error"] is None
        assert engine.loaded == [f"{record.id}-v1"]
        assert chat(client, FLAGGED).headers["x-unlearnd-route"] == "lora"
