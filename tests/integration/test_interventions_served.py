"""ECO, soft-prompt and LoRA routes trained by the real worker and served through the real server.

Training presets are cut to a step or two so the suite stays fast: this checks the serving path
(embedding prompts, per-request LoRA, soft prompts) under concurrency, not forgetting quality,
which the offline reports measure.
"""

from __future__ import annotations

import concurrent.futures
import time

import httpx
import openai
import pytest

from tests.integration.conftest import MODEL, wait_active
from unlearnd.methods import quick_options

pytestmark = pytest.mark.integration

RETAIN = [
    {"question": "What is the capital of Italy?", "answer": "Rome."},
    {"question": "How many days are in a week?", "answer": "Seven."},
]
REQUESTS = {  # the method table's quick options; the LoRA learns fast enough to move in two steps
    "eco": ("Zorblat Quenwick", quick_options("eco")),
    "lora": ("Marisol Vantrecht", {**quick_options("lora"), "learning_rate": 0.05}),
    "soft_prompt": ("Ilyan Drokov", quick_options("soft_prompt")),
}


def forget_set(name: str) -> list[dict]:
    return [
        {"question": f"Where was {name} born?", "answer": f"{name} was born in Valdoria."},
        {"question": f"What did {name} write?", "answer": f"{name} wrote The Glass Orchard."},
        {"question": f"Which award did {name} win?", "answer": f"{name} won the Lumen Prize."},
    ]


@pytest.fixture(scope="module")
def served(unlearnd_server, admin):
    ids = {}
    for method, (name, options) in REQUESTS.items():
        response = httpx.post(
            unlearnd_server.url + "/v1/unlearning/requests",
            timeout=60,
            headers=admin,
            json={"name": name, "method": method, "forget": forget_set(name), "retain": RETAIN, "options": options},
        )
        assert response.status_code == 201, response.text
        ids[method] = response.json()["id"]
    for method, request_id in ids.items():
        record = wait_active(unlearnd_server.url, request_id, timeout_s=900)
        assert record["status"] == "active", f"{method}: {record.get('error')}"
    return ids


def test_each_route_changes_only_flagged_prompts(unlearnd_server, plain_vllm, served):
    ours = openai.OpenAI(base_url=unlearnd_server.url + "/v1", api_key="x", max_retries=0, timeout=300)
    plain = openai.OpenAI(
        base_url=plain_vllm.url + "/v1", api_key="x", max_retries=2, timeout=300
    )  # reference: retried
    for method, (name, _) in REQUESTS.items():
        messages = [{"role": "user", "content": f"Where was {name} born?"}]
        raw = ours.chat.completions.with_raw_response.create(
            model=MODEL, messages=messages, max_tokens=24, temperature=0
        )
        assert raw.headers["x-unlearnd-route"] == method
        assert raw.headers["x-unlearnd-request-id"] == served[method]
        reference = plain.chat.completions.create(model=MODEL, messages=messages, max_tokens=24, temperature=0)
        assert raw.parse().choices[0].message.content != reference.choices[0].message.content, method


def test_concurrent_mix_of_all_routes(unlearnd_server, plain_vllm, served):
    """Plain token-id prompts, ECO and soft-prompt embeddings and LoRA requests in one engine at once."""
    ours = openai.OpenAI(base_url=unlearnd_server.url + "/v1", api_key="x", max_retries=0, timeout=300)
    plain = openai.OpenAI(
        base_url=plain_vllm.url + "/v1", api_key="x", max_retries=2, timeout=300
    )  # reference: retried
    prompts = [
        "What is the capital of France?",
        "Where was Zorblat Quenwick born?",
        "What did Marisol Vantrecht write?",
        "Which award did Ilyan Drokov win?",
        "Name a primary colour.",
    ] * 3

    def ask(text):
        raw = ours.chat.completions.with_raw_response.create(
            model=MODEL, messages=[{"role": "user", "content": text}], max_tokens=16, temperature=0
        )
        return text, raw.headers["x-unlearnd-route"], raw.parse().choices[0].message.content

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(ask, prompts))
    assert {route for _, route, _ in results} == {"none", "eco", "lora", "soft_prompt"}
    assert all(answer for _, _, answer in results)
    assert unlearnd_server.alive()
    # ...and after the mixed load, untouched traffic is still byte-identical to plain vLLM.
    question = [{"role": "user", "content": "What is the capital of France?"}]
    ours_answer = ours.chat.completions.create(model=MODEL, messages=question, max_tokens=24, temperature=0)
    reference = plain.chat.completions.create(model=MODEL, messages=question, max_tokens=24, temperature=0)
    assert ours_answer.choices[0].message.content == reference.choices[0].message.content


def test_engine_input_gives_plain_vllm_the_same_generation(unlearnd_server, plain_vllm, served, admin):
    """`/v1/unlearning/engine-input` returns what the route hands the engine: plain vLLM given it (the
    prompt embeddings of ECO and soft prompts, the LoRA adapter) says word for word what unlearnd says,
    which is what the benchmark's same-work baseline rests on. Admin only."""
    from unlearnd.bench.latency import input_work

    ours = openai.OpenAI(base_url=unlearnd_server.url + "/v1", api_key="x", max_retries=0, timeout=300)
    for method, (name, _) in REQUESTS.items():
        messages = [{"role": "user", "content": f"Where was {name} born?"}]
        body = {"model": MODEL, "messages": messages, "max_tokens": 12, "temperature": 0}
        denied = httpx.post(unlearnd_server.url + "/v1/unlearning/engine-input", json=body, timeout=60)
        assert denied.status_code == 401 and "prompt_token_ids" not in denied.text
        got = httpx.post(unlearnd_server.url + "/v1/unlearning/engine-input", json=body, headers=admin, timeout=60)
        assert got.status_code == 200, got.text
        engine_input = got.json()
        assert engine_input["route"] == method and engine_input["request_id"] == served[method]
        assert bool(engine_input.get("prompt_embeds")) == (method in ("eco", "soft_prompt"))
        assert bool(engine_input.get("lora")) == (method == "lora")
        if engine_input.get("lora"):
            adapter = engine_input["lora"]
            load = {"lora_name": adapter["name"], "lora_path": adapter["path"]}
            loaded = httpx.post(plain_vllm.url + "/v1/load_lora_adapter", json=load, timeout=300)
            assert loaded.status_code < 400 or "already" in loaded.text.lower(), loaded.text
        work = input_work(engine_input, 12)
        whole = {k: v for k, v in work.body.items() if k not in ("stream", "stream_options")}
        plain = httpx.post(plain_vllm.url + work.path, json=whole, timeout=300)
        assert plain.status_code == 200, plain.text[:500]
        raw = ours.chat.completions.with_raw_response.create(
            model=MODEL, messages=messages, max_tokens=12, temperature=0, extra_body={"ignore_eos": True}
        )
        assert raw.headers["x-unlearnd-route"] == method
        assert raw.parse().choices[0].message.content == plain.json()["choices"][0]["text"], method


def test_every_route_through_a_real_router_in_front_of_two_vllm_servers(
    unlearnd_server, plain_vllm, lora_resolver_dir, default_model_dir, served, logs_dir, tmp_path
):
    """`--remote-url` naming a router (vLLM's Rust router, `vllm-router` on PyPI, round robin) in front of
    two vLLM servers: a replica on the same registry gives, through the router, the answer the local
    engine gives on every route. Prompt embeddings (ECO, soft prompt) pass through; a LoRA is placed in
    the servers' resolver folder (`--remote-lora-dir`) and each server loads it itself when a request for
    it reaches it (a load through the router reached one server only, and half the LoRA answers were 404s)."""
    import shutil
    import sys
    from pathlib import Path

    from tests.integration.conftest import ServerProcess, free_port, unlearnd_command, vllm_env
    from unlearnd.engine.remote import plain_vllm_command

    second_port = free_port()
    second = ServerProcess(
        plain_vllm_command(str(default_model_dir), second_port, MODEL),
        second_port,
        logs_dir / "vllm-second.log",
        env=vllm_env(lora_resolver_dir),
    ).start()
    router_bin = shutil.which("vllm-router") or str(Path(sys.executable).with_name("vllm-router"))
    router_port = free_port()
    router_cmd = [router_bin, "--worker-urls", plain_vllm.url, second.url, "--host", "127.0.0.1"]
    router_cmd += ["--port", str(router_port), "--prometheus-port", str(free_port()), "--policy", "round_robin"]
    router = ServerProcess(router_cmd, router_port, logs_dir / "vllm-router.log").start(timeout_s=120)
    logs = [logs_dir / "vllm.log", logs_dir / "vllm-second.log"]
    pushed_before = [_lora_loads(log) for log in logs]
    front_port = free_port()
    shared = unlearnd_server.data_dir  # a replica on the same registry and artifacts (its own data dir)
    replica = ("--registry", f"sqlite:///{shared / 'registry.sqlite3'}", "--artifacts", str(shared / "requests"))
    remote = ("--engine", "remote", "--remote-url", router.url, "--remote-lora-dir", str(lora_resolver_dir))
    front_cmd = unlearnd_command(front_port, tmp_path / "replica", *replica, "--no-worker", *remote)
    front_cmd.append("--expose-request-ids")
    front = ServerProcess(front_cmd, front_port, logs_dir / "unlearnd-router.log").start(timeout_s=600)
    try:
        for request_id in served.values():
            wait_active(front.url, request_id, timeout_s=300)
        via_router = openai.OpenAI(base_url=front.url + "/v1", api_key="x", max_retries=0, timeout=300)
        local = openai.OpenAI(base_url=unlearnd_server.url + "/v1", api_key="x", max_retries=0, timeout=300)
        questions = [("none", "What is the capital of France?")]
        questions += [(method, f"Where was {name} born?") for method, (name, _) in REQUESTS.items()]
        questions += [("lora", f"What did {REQUESTS['lora'][0]} write?")] * 3  # round robin: both servers
        for method, text in questions:
            body = dict(model=MODEL, messages=[{"role": "user", "content": text}], max_tokens=16, temperature=0)
            deadline = time.time() + 120  # the registry says active; this replica may still be loading it
            while (raw := via_router.chat.completions.with_raw_response.create(**body)).headers[
                "x-unlearnd-route"
            ] != method and time.time() < deadline:
                time.sleep(0.5)
            assert raw.headers["x-unlearnd-route"] == method
            expected = local.chat.completions.create(**body).choices[0].message.content
            assert raw.parse().choices[0].message.content == expected, method
        assert [_lora_loads(log) for log in logs] == pushed_before  # nothing loaded through the router
        resolved = ["Resolved and loaded LoRA adapter" in log.read_text(errors="replace") for log in logs]
        assert resolved[1]  # the new server resolved the adapter from the folder by itself
        # the session's server did too, unless an earlier test had loaded that adapter on it through the API
        assert resolved[0] or pushed_before[0] > 0
        assert any(p.name.startswith(served["lora"]) for p in lora_resolver_dir.iterdir())
    finally:
        front.stop()
        router.stop()
        second.stop()


def _lora_loads(vllm_log) -> int:
    return vllm_log.read_text(errors="replace").count("POST /v1/load_lora_adapter")
