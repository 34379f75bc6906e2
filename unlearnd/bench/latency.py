"""`unlearnd bench serve`: unlearnd against plain vLLM, same model, same engine settings, same prompts.

Both servers run on loopback; each (route, concurrency) cell is measured in rounds that alternate the
two servers, so machine drift hits both alike, and every number is reported as an
unlearnd / plain-vLLM ratio taken in the same run.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import numpy as np

from unlearnd.bench.profile import summarise
from unlearnd.bench.report import SAME_INPUT
from unlearnd.client import UnlearndClient
from unlearnd.config import DEFAULT_DETECTOR, DEFAULT_MODEL
from unlearnd.methods import METHODS, quick_options

log = logging.getLogger(__name__)

# Ordinary prompts that match no forget request.
PLAIN_PROMPTS = [
    "What is the capital of France?",
    "Give me three tips for better sleep.",
    "Explain photosynthesis simply.",
    "Write a haiku about autumn leaves.",
    "How do I boil an egg?",
    "What is the boiling point of water?",
    "Name three primary colours.",
    "Summarise the plot of a heist movie in two sentences.",
    "What does a compiler do?",
    "Suggest a name for a pet turtle.",
    "Why is the sky blue?",
    "How many legs does a spider have?",
    "Translate 'good morning' into Spanish.",
    "What is 12 times 7?",
    "Describe a sunset in one sentence.",
    "What are the benefits of regular exercise?",
]


@dataclass
class Sample:
    ttft: float
    e2e: float
    output_tokens: int
    route: str = "none"
    error: str | None = None

    @property
    def tpot(self) -> float | None:
        if self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


@dataclass
class CellResult:
    """All samples of one server in one (route, concurrency) cell, over all rounds."""

    samples: list[Sample] = field(default_factory=list)
    wall_s: float = 0.0
    reached: list[int] = field(default_factory=list)  # most requests in flight at once, per round

    def summary(self) -> dict[str, float]:
        ok = [s for s in self.samples if s.error is None]
        tokens = sum(s.output_tokens for s in ok)
        tpots = [t for t in (s.tpot for s in ok) if t is not None]
        return {
            "requests": len(self.samples),
            "errors": len(self.samples) - len(ok),
            "ttft_p50": percentile([s.ttft for s in ok], 50),
            "ttft_p99": percentile([s.ttft for s in ok], 99),
            "tpot_p50": percentile(tpots, 50),
            "tpot_p99": percentile(tpots, 99),
            "e2e_p50": percentile([s.e2e for s in ok], 50),
            "e2e_p99": percentile([s.e2e for s in ok], 99),
            "req_throughput": len(ok) / self.wall_s if self.wall_s else float("nan"),
            "tok_throughput": tokens / self.wall_s if self.wall_s else float("nan"),
            "output_tokens_mean": tokens / len(ok) if ok else float("nan"),
        }


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile; NaN for no data (never a made-up zero)."""
    return float(np.percentile(np.asarray(values, dtype=float), q)) if len(values) else float("nan")


CI_METRICS = ("ttft_p50", "e2e_p50")


def bootstrap_ratio_ci(
    ours: list[float], plain: list[float], q: float = 50, resamples: int = 1000, seed: int = 0
) -> list[float] | None:
    """95% percentile-bootstrap interval of percentile_q(ours) / percentile_q(plain), each server's samples
    resampled on their own; None with fewer than 2 samples on either side."""
    a, b = np.asarray(ours, dtype=float), np.asarray(plain, dtype=float)
    if len(a) < 2 or len(b) < 2:
        return None
    rng = np.random.default_rng(seed)
    num = np.percentile(a[rng.integers(0, len(a), (resamples, len(a)))], q, axis=1)
    den = np.percentile(b[rng.integers(0, len(b), (resamples, len(b)))], q, axis=1)
    ratio = num / np.where(den > 0, den, np.nan)
    lo, hi = np.nanpercentile(ratio, [2.5, 97.5])
    return [float(lo), float(hi)]


def ratio_intervals(ours: CellResult, plain: CellResult, seed: int = 0) -> dict[str, list[float] | None]:
    """Bootstrap intervals of the TTFT and end-to-end p50 ratios of one cell."""

    def values(cell: CellResult, metric: str) -> list[float]:
        return [getattr(s, metric.removesuffix("_p50")) for s in cell.samples if s.error is None]

    return {m: bootstrap_ratio_ci(values(ours, m), values(plain, m), seed=seed) for m in CI_METRICS}


def ratios(ours: dict[str, float], plain: dict[str, float]) -> dict[str, float]:
    """unlearnd / plain vLLM for every shared metric of one cell (lower is better, except throughput)."""
    keys = [k for k in ours if k not in ("requests", "errors") and k in plain]
    return {k: (ours[k] / plain[k]) if plain[k] and not np.isnan(plain[k]) else float("nan") for k in keys}


@dataclass
class Work:
    """One request of a cell as one server gets it: the endpoint and its JSON body (streamed)."""

    path: str
    body: dict


def _generation(max_tokens: int) -> dict:
    """What every benchmark request asks for: `max_tokens` greedy tokens, streamed, usage at the end."""
    return {
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def chat_work(prompt: str, max_tokens: int) -> Work:
    body = {"model": DEFAULT_MODEL, "messages": [{"role": "user", "content": prompt}], **_generation(max_tokens)}
    return Work("/v1/chat/completions", body)


def input_work(engine_input: dict, max_tokens: int) -> Work:
    """Plain vLLM given what unlearnd's engine is given (`/v1/unlearning/engine-input`): the same token
    ids, prompt embeddings or adapter, as a completion of those tokens (no chat template applied again)."""
    body = {
        "model": engine_input["lora"]["name"] if engine_input.get("lora") else DEFAULT_MODEL,
        **_generation(max_tokens),
    }
    if engine_input.get("prompt_embeds"):
        body["prompt_embeds"] = engine_input["prompt_embeds"]
    else:
        body["prompt"] = engine_input["prompt_token_ids"]
    return Work("/v1/completions", body)


async def _one(client: httpx.AsyncClient, work: Work) -> Sample:
    start = time.perf_counter()
    ttft, tokens, route = None, 0, "none"
    try:
        async with client.stream("POST", work.path, json=work.body) as response:
            route = response.headers.get("x-unlearnd-route", "none")
            if response.status_code != 200:
                return Sample(float("nan"), float("nan"), 0, route, f"HTTP {response.status_code}")
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                choices = chunk.get("choices") or []
                if ttft is None and any(c.get("text") or (c.get("delta") or {}).get("content") for c in choices):
                    ttft = time.perf_counter() - start
    except httpx.HTTPError as exc:
        return Sample(float("nan"), float("nan"), 0, route, type(exc).__name__)
    e2e = time.perf_counter() - start
    return Sample(ttft if ttft is not None else e2e, e2e, tokens, route)


async def drive(
    url: str,
    works: list[Work],
    concurrency: int,
    timeout_s: float = 600,
    in_flight: list[int] | None = None,
) -> tuple[list[Sample], float]:
    """Send every request once with at most `concurrency` in flight; bounded by count and time. The most
    requests that were in flight at once is appended to `in_flight` (what the cell really measured)."""
    queue: asyncio.Queue[Work] = asyncio.Queue()
    for work in works:
        queue.put_nowait(work)
    samples: list[Sample] = []
    deadline = time.perf_counter() + timeout_s
    now, peak = 0, 0
    async with httpx.AsyncClient(base_url=url, timeout=timeout_s) as client:

        async def worker() -> None:
            nonlocal now, peak
            while not queue.empty() and time.perf_counter() < deadline:
                work = queue.get_nowait()
                now += 1
                peak = max(peak, now)
                try:
                    samples.append(await _one(client, work))
                finally:
                    now -= 1

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    if in_flight is not None:
        in_flight.append(peak)
    return samples, wall


def classifier_seconds(client: UnlearndClient) -> tuple[float, float]:
    """(sum, count) of the detector-latency histogram on an unlearnd server's /metrics."""
    total, count = "unlearnd_classifier_latency_seconds_sum", "unlearnd_classifier_latency_seconds_count"
    values = client.metrics(total, count)
    return values.get(total, 0.0), values.get(count, 0.0)


def active_count(client: UnlearndClient) -> int:
    return int(client.health()["active_forget_requests"])


def worker_cpu_seconds(server_pid: int | None) -> float | None:
    """CPU seconds the unlearnd server's training worker (a child process) has used so far."""
    if server_pid is None:
        return None
    import psutil

    try:
        for child in psutil.Process(server_pid).children(recursive=True):
            if any("unlearnd.jobs.worker" in part for part in child.cmdline()):
                times = child.cpu_times()
                return times.user + times.system
    except psutil.Error:
        return None
    return None


def register_requests(
    client: UnlearndClient, specs: list[dict], method: str, options: dict | None = None, timeout_s: float = 3600
) -> list[str]:
    """Register one request per spec and wait until every one is active."""
    fields = ("name", "entities", "forget")
    ids = [
        client.add_request({**{k: spec[k] for k in fields}, "method": method, "options": options or {}})["id"]
        for spec in specs
    ]
    deadline = time.monotonic() + timeout_s
    for request_id in ids:
        client.wait_active(request_id, timeout_s=max(1.0, deadline - time.monotonic()), poll_s=0.5)
    return ids


def load_sample(when: str) -> dict:
    one, five, fifteen = os.getloadavg()
    return {"when": when, "load1": one, "load5": five, "load15": fifteen, "time": time.time()}


class BusyMachine(RuntimeError):
    """The machine was busy before the run: its timings would measure the other work too."""


# -- the benchmark --------------------------------------------------------------------------------
@dataclass
class BenchConfig:
    concurrency: tuple[int, ...] = (1, 8)  # of the non-flagged cells
    requests: int = 32  # per server, per cell, split over `rounds`
    rounds: int = 4
    output_len: int = 64
    routes: tuple[str, ...] = ("refuse", "prompt")
    route_concurrency: tuple[int, ...] = (8,)
    levels: tuple[int, ...] = (0, 10, 100, 1000)  # active forget requests the run steps through
    cell_levels: tuple[int, ...] = (10, 1000)  # levels at which the non-flagged cells run (routes: the first)
    classify_prompts: int = 64  # fresh ordinary prompts classified one by one at every level
    baselines: tuple[str, ...] = ("vllm",)  # plus "vllm-default": plain vLLM with its default flags
    timeout_s: float = 600
    output_guard: str = "strict"  # the unlearnd server's release rule (`serve --output-guard`)
    seed: int = 0  # of the look-alike names
    max_load: float = 1.0  # 1-minute load average above which the run refuses to start
    # Pause before every server's round. All servers share this machine's cores, and a vLLM worker keeps
    # polling its queue for a second after its last step (vLLM's shm-broadcast busy loop): a server measured
    # within that second of another's burst ran ~0.9 s later at c=8, whichever server it was.
    settle_s: float = 1.5
    force: bool = False  # run on a busy machine anyway (the report says so)
    # Training presets cut short (the method table's quick options): serving cost does not depend on how well
    # a route was trained.
    route_options: dict = field(
        default_factory=lambda: {name: quick_options(name) for name, entry in METHODS.items() if entry.quick_options}
    )
    # The route cells' own requests are registered with the output guard off for them, so their answers are
    # not cut and unlearnd generates what plain vLLM generates (the same work); the guard still checks every
    # output against every other active request. Its cost on a blocked answer is `reports/output_guard.md`'s.
    route_output_guard: bool = False


def measure_cell(
    urls: dict[str, str], works: dict[str, list[Work]], concurrency: int, cfg: BenchConfig, seed: int
) -> dict:
    """One cell: every server in `urls` ("unlearnd" first, then baselines) gets its requests (`works`, the
    same prompts or the same engine input) in `cfg.rounds` rounds whose server order rotates, so drift hits
    all alike; ratios are unlearnd over each baseline from this run, with bootstrap intervals."""
    names = list(urls)
    results = {name: CellResult() for name in names}
    round_tok_s: dict[str, list[float]] = {name: [] for name in names}
    per_round = max(1, len(works["unlearnd"]) // cfg.rounds)
    for r in range(cfg.rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            chunk = works[name][r * per_round : (r + 1) * per_round]
            time.sleep(cfg.settle_s)
            samples, wall = asyncio.run(drive(urls[name], chunk, concurrency, cfg.timeout_s, results[name].reached))
            results[name].samples += samples
            results[name].wall_s += wall
            round_tok_s[name].append(sum(s.output_tokens for s in samples if s.error is None) / wall)
    summaries = {name: results[name].summary() for name in names}
    reached = min(min(results[name].reached) for name in names)
    if reached < concurrency:
        log.warning("c=%d: at most %d requests were in flight in some round", concurrency, reached)
    baselines = [name for name in names if name != "unlearnd"]
    return {
        "concurrency": concurrency,
        "concurrency_reached": reached,
        "servers": summaries,
        "ratio": {b: ratios(summaries["unlearnd"], summaries[b]) for b in baselines},
        "ratio_ci95": {b: ratio_intervals(results["unlearnd"], results[b], seed=seed) for b in baselines},
        "throughput_ratio_by_round": {
            b: [u / v if v else float("nan") for u, v in zip(round_tok_s["unlearnd"], round_tok_s[b])]
            for b in baselines
        },
        "routes_seen": sorted({s.route for s in results["unlearnd"].samples}),
        "samples": {name: [asdict(s) for s in results[name].samples] for name in names},
    }


def classify_cost(server: UnlearndClient, level: int, n: int) -> dict:
    """The detector's cost for one new ordinary prompt: `n` fresh prompts classified one at a time
    (fresh wording, so no cache hides the cost); client-side wall time and the server's histogram."""
    before = classifier_seconds(server)
    walls = []
    for i in range(n):
        prompt = f"{PLAIN_PROMPTS[i % len(PLAIN_PROMPTS)]} (variant {level}-{i})"
        start = time.perf_counter()
        server.classify([prompt])
        walls.append(time.perf_counter() - start)
    after = classifier_seconds(server)
    count = after[1] - before[1]
    return {
        "classify_call_ms_p50": 1000 * percentile(walls, 50),
        "classify_call_ms_p99": 1000 * percentile(walls, 99),
        "detector_ms_per_prompt": 1000 * (after[0] - before[0]) / count if count else float("nan"),
        "classify_prompts": n,
    }


def _fill(server: UnlearndClient, specs: list[dict], server_pid: int | None) -> dict:
    """Register `specs` as refuse requests; what activating them cost (wall and worker CPU per request)."""
    if not specs:
        return {"activated": 0}
    cpu0, start = worker_cpu_seconds(server_pid), time.monotonic()
    register_requests(server, specs, "refuse")
    wall, cpu1 = time.monotonic() - start, worker_cpu_seconds(server_pid)
    return {
        "activated": len(specs),
        "activation_wall_s_per_request": wall / len(specs),
        "worker_cpu_s_per_request": (cpu1 - cpu0) / len(specs) if cpu0 is not None and cpu1 is not None else None,
    }


def run_bench(
    urls: dict[str, str],
    admin_key: str | None,
    tofu_dir: Path,
    cfg: BenchConfig,
    profiler=None,
    server_pid: int | None = None,
) -> dict:
    """Step through `cfg.levels` active requests; at each, the detector's cost, and at the cell levels the
    non-flagged cells (every server) and, at the first, the route cells (unlearnd and plain vLLM)."""
    server = UnlearndClient(urls["unlearnd"], admin_key=admin_key, timeout_s=120)
    from unlearnd.bench.population import flagged_prompts, population

    people = population(tofu_dir, max(max(cfg.levels, default=0), len(cfg.routes)), cfg.seed)
    route_people = dict(zip(cfg.routes, people))
    pending = people[len(route_people) :]
    loads, levels, cells, profile = [load_sample("start")], [], {}, None
    ordinary = [chat_work(PLAIN_PROMPTS[i % len(PLAIN_PROMPTS)], cfg.output_len) for i in range(cfg.requests)]
    routes_registered = False
    for level in sorted(cfg.levels):
        if level > 0 and not routes_registered:
            for route, person in route_people.items():
                options = {**cfg.route_options.get(route, {}), "output_guard": cfg.route_output_guard}
                register_requests(server, [person], route, options)
            routes_registered = True
        need = max(0, level - active_count(server))
        row = {"level": level, **_fill(server, pending[:need], server_pid)}
        pending = pending[need:]
        row.update(active_requests=active_count(server), **classify_cost(server, level, cfg.classify_prompts))
        levels.append(row)
        log.info("level %d: %s", level, row)
        if level not in cfg.cell_levels:
            continue
        profiling = level == max(cfg.cell_levels) and profiler is not None and profiler.start()
        for c in cfg.concurrency:
            cell = measure_cell(urls, {name: ordinary for name in urls}, c, cfg, seed=len(cells))
            cells[f"none@{c}@{level}"] = {"route": "none", "active": row["active_requests"], **cell}
            loads.append(load_sample(f"after none@{c}@{level}"))
        if profiling and (raw := profiler.stop()) is not None:
            summary = summarise(raw)
            profile = {"cells": f"none at {level} active", "raw": raw.name, "rate_hz": profiler.rate}
            profile.update(busy_s=summary["samples"] / profiler.rate, **summary)
        if level != min(cfg.cell_levels):
            continue
        pair = {"unlearnd": urls["unlearnd"], "vllm": urls["vllm"]}
        for route, person in route_people.items():
            prompts = flagged_prompts(person, cfg.requests)
            works, baseline = route_works(server, urls["vllm"], prompts, cfg.output_len)
            for c in cfg.route_concurrency:
                cell = measure_cell(pair, works, c, cfg, seed=len(cells))
                cells[f"{route}@{c}@{level}"] = {
                    "route": route,
                    "active": row["active_requests"],
                    "baseline_work": baseline,
                    **cell,
                }
                loads.append(load_sample(f"after {route}@{c}@{level}"))
    return {"config": asdict(cfg), "levels": levels, "cells": cells, "load": loads, "profile": profile}


PLAIN_PROMPT = "the plain prompt (the route answers without the engine)"


def route_works(server: UnlearndClient, plain_url: str, prompts: list[str], output_len: int) -> tuple[dict, str]:
    """A route cell's requests: unlearnd gets the chat prompts; plain vLLM gets, per prompt, what
    unlearnd's engine is given for it (the route's token ids, prompt embeddings or adapter, loaded on the
    plain server first), so the ratio is unlearnd's own cost for the same generation. A route that
    answers without the engine (refuse) has no engine input: plain vLLM answers the plain prompt."""
    params = {"max_tokens": output_len, "temperature": 0, "ignore_eos": True}
    inputs = [server.engine_input(DEFAULT_MODEL, [{"role": "user", "content": p}], **params) for p in prompts]
    ours = [chat_work(p, output_len) for p in prompts]
    if any(i.get("fixed_response") is not None for i in inputs):
        return {"unlearnd": ours, "vllm": ours}, PLAIN_PROMPT
    from unlearnd.engine.remote import LOAD_LORA_PATH, load_lora_body, raise_unless_lora_loaded

    adapters = {(i["lora"]["name"], i["lora"]["path"]) for i in inputs if i.get("lora")}
    for name, path in adapters:
        response = httpx.post(f"{plain_url}{LOAD_LORA_PATH}", json=load_lora_body(name, path), timeout=300)
        raise_unless_lora_loaded(response, name)
    return {"unlearnd": ours, "vllm": [input_work(i, output_len) for i in inputs]}, SAME_INPUT


def _start_servers(cfg: BenchConfig, workdir: Path, detector: str, admin_key: str, reuse: dict[str, str]) -> dict:
    """Plain vLLM with unlearnd's engine flags, plain vLLM with its defaults (when asked), and unlearnd;
    those named in `reuse` (name -> URL of a running server) are not started."""
    from unlearnd.bench.servers import ServerProcess, free_port, unlearnd_command
    from unlearnd.engine.remote import plain_vllm_command, plain_vllm_default_command
    from unlearnd.models import pull_default

    model_dir = str(pull_default())
    env = {
        "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
        "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
    }
    commands = {"vllm": lambda port: plain_vllm_command(model_dir, port, DEFAULT_MODEL)}
    if "vllm-default" in cfg.baselines:
        commands["vllm-default"] = lambda port: plain_vllm_default_command(model_dir, port, DEFAULT_MODEL)
    started: dict[str, ServerProcess] = {}
    try:
        for name, command in commands.items():
            if name in reuse:
                continue
            port = free_port()
            started[name] = ServerProcess(command(port), port, workdir / f"{name}.log", env=env).start()
        if "unlearnd" not in reuse:
            port = free_port()
            # No evidence batteries and no elicitation: their calls would generate on the measured engine (evidence
            # has its own bench; elicitation, ten short calls per request, would make 1000 requests take hours)
            extra = (
                "--admin-key",
                admin_key,
                "--detector",
                detector,
                "--output-guard",
                cfg.output_guard,
                "--no-evidence",
                "--no-elicit",
            )
            ours = ServerProcess(unlearnd_command(port, workdir / "data", *extra), port, workdir / "unlearnd.log")
            started["unlearnd"] = ours.start()
    except BaseException:
        for server in started.values():
            server.stop()
        raise
    return started


def bench_serve(
    out: Path,
    tofu_dir: Path,
    cfg: BenchConfig,
    detector: str = DEFAULT_DETECTOR,
    workdir: Path | None = None,
    command: str | None = None,
    profile: bool = True,
    reuse: dict[str, str] | None = None,
    admin_key: str | None = None,
) -> Path:
    """Start the servers (or reuse running ones: name -> URL, with the unlearnd server's `admin_key`), run
    the benchmark, write the report; returns the markdown path. Refuses to start on a busy machine
    (1-minute load average above `cfg.max_load`) unless `cfg.force`."""
    from unlearnd.bench.profile import Profiler
    from unlearnd.bench.report import write_report
    from unlearnd.engine.dtype import resolve_dtype
    from unlearnd.evaluation.report import run_stamp

    before = load_sample("before the servers started")
    if before["load1"] > cfg.max_load and not cfg.force:
        raise BusyMachine(
            f"1-minute load average {before['load1']:.2f} > {cfg.max_load} on {os.cpu_count()} cores: the timings "
            "would measure that work too; wait, or pass --force (the report then says so)"
        )
    # Every server resolves the same default dtype (`--dtype auto`) on this machine.
    stamp = run_stamp(command, dtype=resolve_dtype())
    workdir = Path(workdir or tempfile.mkdtemp(prefix="unlearnd-bench-"))
    reuse = dict(reuse or {})
    admin_key = admin_key or "bench-admin-key"
    started = _start_servers(cfg, workdir, detector, admin_key, reuse)
    try:
        urls = {**reuse, **{name: server.url for name, server in started.items()}}
        urls = {"unlearnd": urls.pop("unlearnd"), **urls}  # unlearnd first, then the baselines
        ours = started.get("unlearnd")  # profiled and its worker's CPU read only when started here
        pid = ours.proc.pid if ours is not None else None
        profiler = Profiler(pid, out.with_name(out.name + "-profile.txt")) if profile and pid else None
        result = run_bench(urls, admin_key, tofu_dir, cfg, profiler, server_pid=pid)
    finally:
        for server in reversed(list(started.values())):
            server.stop()
    result["load"].insert(0, before)
    result["evidence_off"] = "unlearnd" not in reuse  # a reused server runs with whatever it was given
    result["forced_on_busy_machine"] = before["load1"] > cfg.max_load
    return write_report(result, out, stamp)
