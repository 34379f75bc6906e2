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


async def _one(client: httpx.AsyncClient, prompt: str, max_tokens: int) -> Sample:
    body = {
        "model": DEFAULT_MODEL,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    ttft, tokens, route = None, 0, "none"
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            route = response.headers.get("x-unlearnd-route", "none")
            if response.status_code != 200:
                return Sample(float("nan"), float("nan"), 0, route, f"HTTP {response.status_code}")
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                if ttft is None and any(c.get("delta", {}).get("content") for c in chunk.get("choices", [])):
                    ttft = time.perf_counter() - start
    except httpx.HTTPError as exc:
        return Sample(float("nan"), float("nan"), 0, route, type(exc).__name__)
    e2e = time.perf_counter() - start
    return Sample(ttft if ttft is not None else e2e, e2e, tokens, route)


async def drive(
    url: str,
    prompts: list[str],
    concurrency: int,
    max_tokens: int,
    timeout_s: float = 600,
    in_flight: list[int] | None = None,
) -> tuple[list[Sample], float]:
    """Send every prompt once with at most `concurrency` in flight; bounded by count and time. The most
    requests that were in flight at once is appended to `in_flight` (what the cell really measured)."""
    queue: asyncio.Queue[str] = asyncio.Queue()
    for prompt in prompts:
        queue.put_nowait(prompt)
    samples: list[Sample] = []
    deadline = time.perf_counter() + timeout_s
    now, peak = 0, 0
    async with httpx.AsyncClient(base_url=url, timeout=timeout_s) as client:

        async def worker() -> None:
            nonlocal now, peak
            while not queue.empty() and time.perf_counter() < deadline:
                prompt = queue.get_nowait()
                now += 1
                peak = max(peak, now)
                try:
                    samples.append(await _one(client, prompt, max_tokens))
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
    values = {}
    for line in client.metrics_text().splitlines():
        for key in ("unlearnd_classifier_latency_seconds_sum", "unlearnd_classifier_latency_seconds_count"):
            if line.startswith(key + " "):
                values[key] = float(line.split()[-1])
    return values.get("unlearnd_classifier_latency_seconds_sum", 0.0), values.get(
        "unlearnd_classifier_latency_seconds_count", 0.0
    )


def active_count(client: UnlearndClient) -> int:
    return int(client.health()["active_forget_requests"])


# -- forget requests from TOFU authors ------------------------------------------------------------
def tofu_authors(tofu_dir: Path, count: int) -> list[dict]:
    """TOFU's full split holds 20 QA pairs per fictitious author, in order: one request per author
    whose name can be derived from its questions (a few authors' cannot, and are skipped)."""
    from unlearnd.data.tofu import TOFU_QA_PER_AUTHOR, TofuData
    from unlearnd.detectors.names import derive_entities

    rows = TofuData(tofu_dir, allow_hub=False).split("full")
    authors = []
    for index in range(len(rows) // TOFU_QA_PER_AUTHOR):
        if len(authors) == count:
            break
        pairs = rows[index * TOFU_QA_PER_AUTHOR : (index + 1) * TOFU_QA_PER_AUTHOR]
        names = derive_entities(pairs)
        if not names:
            continue
        authors.append(
            {
                "name": names[0],
                "entities": names,
                "forget": [{"question": p.question, "answer": p.answer} for p in pairs],
            }
        )
    return authors


def register_requests(
    client: UnlearndClient, specs: list[dict], method: str, options: dict | None = None, timeout_s: float = 1800
) -> list[str]:
    """Register one request per spec and wait until every one is active."""
    ids = [client.add_request({**spec, "method": method, "options": options or {}})["id"] for spec in specs]
    deadline = time.monotonic() + timeout_s
    for request_id in ids:
        client.wait_active(request_id, timeout_s=max(1.0, deadline - time.monotonic()), poll_s=1.0)
    return ids


# -- the benchmark --------------------------------------------------------------------------------
@dataclass
class BenchConfig:
    concurrency: tuple[int, ...] = (1, 4, 16)
    requests: int = 32  # per server, per (route, concurrency) cell, split over `rounds`
    rounds: int = 2
    output_len: int = 32
    routes: tuple[str, ...] = ("refuse", "prompt")
    sweep: tuple[int, ...] = (1, 10, 100)
    sweep_requests: int = 16
    timeout_s: float = 600
    active: int = 0  # refuse requests active during the cells (those of `routes` count); 0: one per route
    output_guard: str = "strict"  # the unlearnd server's release rule (`serve --output-guard`)
    # Training presets cut short (the method table's quick options): serving cost does not depend on how well
    # a route was trained.
    route_options: dict = field(
        default_factory=lambda: {name: quick_options(name) for name, entry in METHODS.items() if entry.quick_options}
    )


def _flagged_prompts(author: dict, n: int) -> list[str]:
    """Forget questions that name the author: this measures route latency, not detection recall."""
    names = [e.lower() for e in author["entities"]]
    questions = [qa["question"] for qa in author["forget"] if any(name in qa["question"].lower() for name in names)]
    questions = questions or [qa["question"] for qa in author["forget"]]
    return [questions[i % len(questions)] for i in range(n)]


def run_bench(
    plain_url: str, ours_url: str, admin_key: str | None, tofu_dir: Path, cfg: BenchConfig, profiler=None
) -> dict:
    """Measure every (route, concurrency) cell and the detector sweep; `profiler` (a started-on-demand
    `unlearnd.bench.profile.Profiler` of the unlearnd server) samples the non-flagged cells."""
    server = UnlearndClient(ours_url, admin_key=admin_key, timeout_s=60)
    wanted = max(len(cfg.routes), cfg.active) + max(cfg.sweep, default=0)
    authors = tofu_authors(tofu_dir, wanted)
    if len(authors) < wanted:
        raise ValueError(f"only {len(authors)} TOFU authors with a derivable name; lower --sweep or --active")
    route_authors = dict(zip(cfg.routes, authors))
    for route, author in route_authors.items():
        register_requests(server, [author], route, cfg.route_options.get(route))
    used = max(len(cfg.routes), cfg.active)
    if cfg.active > len(cfg.routes):
        register_requests(server, authors[len(cfg.routes) : used], "refuse")
    active = active_count(server)
    load_before = os.getloadavg()
    workloads = {"none": [PLAIN_PROMPTS[i % len(PLAIN_PROMPTS)] for i in range(cfg.requests)]}
    workloads.update({route: _flagged_prompts(author, cfg.requests) for route, author in route_authors.items()})

    cells: dict[str, dict] = {}
    profile = None
    for route, prompts in workloads.items():
        profiling = route == "none" and profiler is not None and profiler.start()
        for concurrency in cfg.concurrency:
            results = {"unlearnd": CellResult(), "vllm": CellResult()}
            per_round = max(1, len(prompts) // cfg.rounds)
            for r in range(cfg.rounds):
                chunk = prompts[r * per_round : (r + 1) * per_round]
                # Alternate which server goes first in each round.
                order = [("unlearnd", ours_url), ("vllm", plain_url)]
                if r % 2:
                    order.reverse()
                for name, url in order:
                    samples, wall = asyncio.run(
                        drive(url, chunk, concurrency, cfg.output_len, cfg.timeout_s, results[name].reached)
                    )
                    results[name].samples += samples
                    results[name].wall_s += wall
            ours, plain = results["unlearnd"].summary(), results["vllm"].summary()
            seen_routes = sorted({s.route for s in results["unlearnd"].samples})
            reached = min(results["unlearnd"].reached + results["vllm"].reached)
            if reached < concurrency:
                log.warning("%s c=%d: at most %d requests were in flight in some round", route, concurrency, reached)
            cells[f"{route}@{concurrency}"] = {
                "route": route,
                "concurrency": concurrency,
                "unlearnd": ours,
                "vllm": plain,
                "ratio": ratios(ours, plain),
                "ratio_ci95": ratio_intervals(results["unlearnd"], results["vllm"], seed=len(cells)),
                "concurrency_reached": reached,
                "routes_seen": seen_routes,
                "e2e_unlearnd": [s.e2e for s in results["unlearnd"].samples if s.error is None],
                "e2e_vllm": [s.e2e for s in results["vllm"].samples if s.error is None],
            }
            log.info(
                "%s c=%d: e2e p50 %.3fs vs %.3fs (ratio %.3f)",
                route,
                concurrency,
                ours["e2e_p50"],
                plain["e2e_p50"],
                cells[f"{route}@{concurrency}"]["ratio"]["e2e_p50"],
            )
        if profiling and (raw := profiler.stop()) is not None:
            summary = summarise(raw)
            profile = {
                "cells": "none@" + ",".join(map(str, cfg.concurrency)),
                "raw": raw.name,
                "rate_hz": profiler.rate,
                "busy_s": summary["samples"] / profiler.rate,
                **summary,
            }

    load_after_cells = os.getloadavg()
    sweep = []
    extra = iter(authors[used:])
    for target in cfg.sweep:
        need = max(0, target - active_count(server))
        if need:
            register_requests(server, [next(extra) for _ in range(need)], "refuse")
        active = active_count(server)
        before = classifier_seconds(server)
        # Fresh wording each round, so the detector's prompt cache cannot hide its cost.
        prompts = [f"{PLAIN_PROMPTS[i % len(PLAIN_PROMPTS)]} (variant {target}-{i})" for i in range(cfg.sweep_requests)]
        samples, _ = asyncio.run(drive(ours_url, prompts, 1, cfg.output_len, cfg.timeout_s))
        after = classifier_seconds(server)
        count = after[1] - before[1]
        sweep.append(
            {
                "active_requests": active,
                "classifier_ms_per_prompt": 1000 * (after[0] - before[0]) / count if count else float("nan"),
                "e2e_p50": percentile([s.e2e for s in samples if s.error is None], 50),
            }
        )
        log.info("sweep %d active: classifier %.2f ms/prompt", active, sweep[-1]["classifier_ms_per_prompt"])
    return {
        "config": asdict(cfg),
        "active_during_cells": active,
        "load_average": {"before_cells": load_before, "after_cells": load_after_cells},
        "cells": cells,
        "sweep": sweep,
        "profile": profile,
    }


def bench_serve(
    out: Path,
    tofu_dir: Path,
    cfg: BenchConfig,
    plain_url: str | None = None,
    unlearnd_url: str | None = None,
    admin_key: str | None = None,
    detector: str = DEFAULT_DETECTOR,
    workdir: Path | None = None,
    command: str | None = None,
    profile: bool = True,
) -> Path:
    """Start (or reuse) both servers, run the benchmark, write the report; returns the markdown path."""
    from unlearnd.bench.profile import Profiler
    from unlearnd.bench.report import write_report
    from unlearnd.bench.servers import ServerProcess, free_port, unlearnd_command
    from unlearnd.engine.dtype import resolve_dtype
    from unlearnd.engine.remote import plain_vllm_command
    from unlearnd.evaluation.report import run_stamp
    from unlearnd.models import pull_default

    # Both servers resolve the same default dtype (`--dtype auto`) on this machine.
    stamp = run_stamp(command, dtype=resolve_dtype())
    workdir = Path(workdir or tempfile.mkdtemp(prefix="unlearnd-bench-"))
    started: list[ServerProcess] = []
    try:
        model_dir = str(pull_default())
        if plain_url is None:
            port = free_port()
            plain = ServerProcess(
                plain_vllm_command(model_dir, port, DEFAULT_MODEL),
                port,
                workdir / "vllm.log",
                env={
                    "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
                    "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
                },
            )
            started.append(plain.start())
            plain_url = plain.url
        if unlearnd_url is None:
            port = free_port()
            admin_key = admin_key or "bench-admin-key"
            ours = ServerProcess(
                unlearnd_command(
                    port,
                    workdir / "data",
                    "--admin-key",
                    admin_key,
                    "--detector",
                    detector,
                    "--output-guard",
                    cfg.output_guard,
                ),  # fmt: skip
                port,
                workdir / "unlearnd.log",
            )
            started.append(ours.start())
            unlearnd_url = ours.url
        profiler = None
        if profile and started and started[-1].url == unlearnd_url:
            profiler = Profiler(started[-1].proc.pid, out.with_name(out.name + "-profile.txt"))
        result = run_bench(plain_url, unlearnd_url, admin_key, tofu_dir, cfg, profiler)
    finally:
        for server in reversed(started):
            server.stop()
    return write_report(result, out, stamp)
