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
import platform
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import numpy as np

from unlearnd.config import DEFAULT_DETECTOR

log = logging.getLogger(__name__)

MODEL = "SmolLM2-135M-Instruct"

# Ordinary prompts that match no forget request.
PLAIN_PROMPTS = [
    "What is the capital of France?", "Give me three tips for better sleep.", "Explain photosynthesis simply.",
    "Write a haiku about autumn leaves.", "How do I boil an egg?", "What is the boiling point of water?",
    "Name three primary colours.", "Summarise the plot of a heist movie in two sentences.",
    "What does a compiler do?", "Suggest a name for a pet turtle.", "Why is the sky blue?",
    "How many legs does a spider have?", "Translate 'good morning' into Spanish.", "What is 12 times 7?",
    "Describe a sunset in one sentence.", "What are the benefits of regular exercise?",
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

    def summary(self) -> dict[str, float]:
        ok = [s for s in self.samples if s.error is None]
        tokens = sum(s.output_tokens for s in ok)
        tpots = [t for t in (s.tpot for s in ok) if t is not None]
        return {
            "requests": len(self.samples),
            "errors": len(self.samples) - len(ok),
            "ttft_p50": percentile([s.ttft for s in ok], 50), "ttft_p99": percentile([s.ttft for s in ok], 99),
            "tpot_p50": percentile(tpots, 50), "tpot_p99": percentile(tpots, 99),
            "e2e_p50": percentile([s.e2e for s in ok], 50), "e2e_p99": percentile([s.e2e for s in ok], 99),
            "req_throughput": len(ok) / self.wall_s if self.wall_s else float("nan"),
            "tok_throughput": tokens / self.wall_s if self.wall_s else float("nan"),
        }


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile; NaN for no data (never a made-up zero)."""
    return float(np.percentile(np.asarray(values, dtype=float), q)) if len(values) else float("nan")


def ratios(ours: dict[str, float], plain: dict[str, float]) -> dict[str, float]:
    """unlearnd / plain vLLM for every shared metric of one cell (lower is better, except throughput)."""
    keys = [k for k in ours if k not in ("requests", "errors") and k in plain]
    return {k: (ours[k] / plain[k]) if plain[k] and not np.isnan(plain[k]) else float("nan") for k in keys}


async def _one(client: httpx.AsyncClient, prompt: str, max_tokens: int) -> Sample:
    body = {"model": MODEL, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
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


async def drive(url: str, prompts: list[str], concurrency: int, max_tokens: int,
                timeout_s: float = 600) -> tuple[list[Sample], float]:
    """Send every prompt once with at most `concurrency` in flight; bounded by count and time."""
    queue: asyncio.Queue[str] = asyncio.Queue()
    for prompt in prompts:
        queue.put_nowait(prompt)
    samples: list[Sample] = []
    deadline = time.perf_counter() + timeout_s
    async with httpx.AsyncClient(base_url=url, timeout=timeout_s) as client:
        async def worker() -> None:
            while not queue.empty() and time.perf_counter() < deadline:
                samples.append(await _one(client, queue.get_nowait(), max_tokens))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    return samples, wall


def classifier_seconds(url: str) -> tuple[float, float]:
    """(sum, count) of the detector-latency histogram on an unlearnd server's /metrics."""
    text = httpx.get(url + "/metrics", timeout=10).text
    values = {}
    for line in text.splitlines():
        for key in ("unlearnd_classifier_latency_seconds_sum", "unlearnd_classifier_latency_seconds_count"):
            if line.startswith(key + " "):
                values[key] = float(line.split()[-1])
    return values.get("unlearnd_classifier_latency_seconds_sum", 0.0), \
        values.get("unlearnd_classifier_latency_seconds_count", 0.0)


def active_count(url: str) -> int:
    return int(httpx.get(url + "/health", timeout=10).json()["active_forget_requests"])


# -- forget requests from TOFU authors ------------------------------------------------------------
def tofu_authors(tofu_dir: Path, count: int) -> list[dict]:
    """TOFU's full split holds 20 QA pairs per fictitious author, in order: one request per author
    whose name can be derived from its questions (a few authors' cannot, and are skipped)."""
    from unlearnd.tofu import derive_entities, qa_pairs, read_split

    rows = read_split(tofu_dir / "full.json")
    authors = []
    for index in range(len(rows) // 20):
        if len(authors) == count:
            break
        pairs = qa_pairs(rows[index * 20:(index + 1) * 20])
        names = derive_entities(pairs)
        if not names:
            continue
        authors.append({"name": names[0], "entities": names,
                        "forget": [p.model_dump() for p in pairs]})
    return authors


def register_requests(url: str, admin_key: str | None, specs: list[dict], method: str,
                      options: dict | None = None, timeout_s: float = 1800) -> list[str]:
    headers = {"Authorization": f"Bearer {admin_key}"} if admin_key else {}
    ids = []
    for spec in specs:
        body = {**spec, "method": method, "options": options or {}}
        response = httpx.post(url + "/v1/unlearning/requests", json=body, headers=headers, timeout=60)
        response.raise_for_status()
        ids.append(response.json()["id"])
    deadline = time.time() + timeout_s
    pending = set(ids)
    while pending and time.time() < deadline:
        for request_id in list(pending):
            status = httpx.get(f"{url}/v1/unlearning/requests/{request_id}", headers=headers).json()["status"]
            if status == "active":
                pending.discard(request_id)
            elif status == "failed":
                raise RuntimeError(f"forget request {request_id} failed to train")
        time.sleep(1)
    if pending:
        raise TimeoutError(f"{len(pending)} forget requests not active after {timeout_s}s")
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
    # Training presets cut short: serving cost does not depend on how well a route was trained.
    route_options: dict = field(default_factory=lambda: {
        "eco": {"preset": "cpu", "iterations": 1, "n_tune": 2, "n_eval": 2, "fluency_n": 1, "fluency_tokens": 4},
        "lora": {"preset": "cpu", "steps": 2, "batch_size": 2, "n_eval": 1, "n_samples": 1},
        "soft_prompt": {"preset": "cpu", "steps": 2, "batch_forget": 2, "batch_retain": 1, "n_retain": 2,
                        "n_eval": 1, "n_samples": 1, "sample_tokens": 4},
    })


def _flagged_prompts(author: dict, n: int) -> list[str]:
    """Forget questions that name the author: this measures route latency, not detection recall."""
    names = [e.lower() for e in author["entities"]]
    questions = [qa["question"] for qa in author["forget"] if any(name in qa["question"].lower() for name in names)]
    questions = questions or [qa["question"] for qa in author["forget"]]
    return [questions[i % len(questions)] for i in range(n)]


def run_bench(plain_url: str, ours_url: str, admin_key: str | None, tofu_dir: Path, cfg: BenchConfig,
              profiler=None) -> dict:
    """Measure every (route, concurrency) cell and the detector sweep; `profiler` (a started-on-demand
    `unlearnd.bench.profile.Profiler` of the unlearnd server) samples the non-flagged cells."""
    authors = tofu_authors(tofu_dir, len(cfg.routes) + max(cfg.sweep))
    if len(authors) < len(cfg.routes) + max(cfg.sweep):
        raise ValueError(f"only {len(authors)} TOFU authors with a derivable name; lower --sweep")
    route_authors = dict(zip(cfg.routes, authors))
    for route, author in route_authors.items():
        register_requests(ours_url, admin_key, [author], route, cfg.route_options.get(route))
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
                chunk = prompts[r * per_round:(r + 1) * per_round]
                # Alternate which server goes first in each round.
                order = [("unlearnd", ours_url), ("vllm", plain_url)]
                if r % 2:
                    order.reverse()
                for name, url in order:
                    samples, wall = asyncio.run(drive(url, chunk, concurrency, cfg.output_len, cfg.timeout_s))
                    results[name].samples += samples
                    results[name].wall_s += wall
            ours, plain = results["unlearnd"].summary(), results["vllm"].summary()
            seen_routes = sorted({s.route for s in results["unlearnd"].samples})
            cells[f"{route}@{concurrency}"] = {
                "route": route, "concurrency": concurrency, "unlearnd": ours, "vllm": plain,
                "ratio": ratios(ours, plain), "routes_seen": seen_routes,
                "e2e_unlearnd": [s.e2e for s in results["unlearnd"].samples if s.error is None],
                "e2e_vllm": [s.e2e for s in results["vllm"].samples if s.error is None],
            }
            log.info("%s c=%d: e2e p50 %.3fs vs %.3fs (ratio %.3f)", route, concurrency, ours["e2e_p50"],
                     plain["e2e_p50"], cells[f"{route}@{concurrency}"]["ratio"]["e2e_p50"])
        if profiling and (raw := profiler.stop()) is not None:
            from unlearnd.bench.profile import summarise

            summary = summarise(raw)
            profile = {"cells": "none@" + ",".join(map(str, cfg.concurrency)), "raw": raw.name,
                       "rate_hz": profiler.rate, "busy_s": summary["samples"] / profiler.rate, **summary}

    sweep = []
    extra = iter(authors[len(cfg.routes):])
    for target in cfg.sweep:
        need = max(0, target - active_count(ours_url))
        if need:
            register_requests(ours_url, admin_key, [next(extra) for _ in range(need)], "refuse")
        active = active_count(ours_url)
        before = classifier_seconds(ours_url)
        # Fresh wording each round, so the detector's prompt cache cannot hide its cost.
        prompts = [f"{PLAIN_PROMPTS[i % len(PLAIN_PROMPTS)]} (variant {target}-{i})"
                   for i in range(cfg.sweep_requests)]
        samples, _ = asyncio.run(drive(ours_url, prompts, 1, cfg.output_len, cfg.timeout_s))
        after = classifier_seconds(ours_url)
        count = after[1] - before[1]
        sweep.append({"active_requests": active, "classifier_ms_per_prompt":
                      1000 * (after[0] - before[0]) / count if count else float("nan"),
                      "e2e_p50": percentile([s.e2e for s in samples if s.error is None], 50)})
        log.info("sweep %d active: classifier %.2f ms/prompt", active, sweep[-1]["classifier_ms_per_prompt"])
    from unlearnd.engine.base import resolve_dtype

    # Both servers resolve the same default dtype (`--dtype auto`) on this machine.
    machine = {"cpus": os.cpu_count(), "dtype": resolve_dtype()}
    return {"config": asdict(cfg), "machine": machine, "cells": cells, "sweep": sweep, "profile": profile}


# -- report ---------------------------------------------------------------------------------------
TARGETS = [
    ("non-flagged e2e p50 ratio, c=1", lambda r: r["cells"].get("none@1", {}).get("ratio", {}).get("e2e_p50"), "<=", 1.03),
    ("non-flagged e2e p50 ratio, c=16", lambda r: r["cells"].get("none@16", {}).get("ratio", {}).get("e2e_p50"), "<=", 1.03),
    ("added TTFT p50 (ms), non-flagged c=1", lambda r: 1000 * (r["cells"]["none@1"]["unlearnd"]["ttft_p50"]
                                                              - r["cells"]["none@1"]["vllm"]["ttft_p50"])
     if "none@1" in r["cells"] else None, "<=", 5.0),
    ("ECO route e2e p50 ratio, c=1", lambda r: r["cells"].get("eco@1", {}).get("ratio", {}).get("e2e_p50"), "<=", 1.10),
    ("throughput ratio, non-flagged c=16", lambda r: r["cells"].get("none@16", {}).get("ratio", {}).get("tok_throughput"), ">=", 0.95),
    ("classifier cost 100 vs 1 requests", lambda r: (r["sweep"][-1]["classifier_ms_per_prompt"]
                                                     / r["sweep"][0]["classifier_ms_per_prompt"])
     if len(r["sweep"]) > 1 and r["sweep"][0]["classifier_ms_per_prompt"] else None, "<=", 1.2),
]


def _fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}"


def write_report(result: dict, out: Path, command: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1, default=float))
    cells = result["cells"]
    machine = result.get("machine", {})

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for cell in cells.values():
        if cell["concurrency"] != min(c["concurrency"] for c in cells.values()):
            continue
        for name, style in (("e2e_unlearnd", "-"), ("e2e_vllm", "--")):
            values = np.sort(cell[name])
            if len(values):
                axes[0].plot(values, np.arange(1, len(values) + 1) / len(values), style,
                             label=f"{cell['route']} ({'unlearnd' if name == 'e2e_unlearnd' else 'vLLM'})")
    axes[0].set_xlabel("end-to-end latency (s)")
    axes[0].set_ylabel("fraction of requests")
    axes[0].set_title("Latency CDF per route, lowest concurrency")
    axes[0].legend(fontsize=7)
    keys = list(cells)
    x = np.arange(len(keys))
    for offset, metric in ((-0.2, "e2e_p50"), (0.0, "ttft_p50"), (0.2, "tok_throughput")):
        axes[1].bar(x + offset, [cells[k]["ratio"].get(metric, np.nan) for k in keys], width=0.2, label=metric)
    axes[1].axhline(1.0, color="k", linewidth=0.8)
    axes[1].set_xticks(x, keys, rotation=60, fontsize=7)
    axes[1].set_ylabel("unlearnd / plain vLLM")
    axes[1].set_title("Ratios (same run)")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    plot = out.with_name(out.stem + ".png")
    fig.savefig(plot, dpi=110)
    plt.close(fig)

    lines = [
        "# Latency: unlearnd vs plain vLLM", "",
        f"Command: `{command}`", "",
        f"Machine: {platform.machine()}, {platform.processor() or 'CPU'}, {machine.get('cpus', 'n/a')} cores, no GPU; "
        f"Python {sys.version.split()[0]}; model {MODEL} ({machine.get('dtype', 'n/a')}, vLLM CPU, enforce-eager) on "
        f"both servers; output length "
        f"{result['config']['output_len']} tokens (ignore_eos), greedy.", "",
        "Each cell alternates the two servers in rounds; ratios are unlearnd / plain vLLM from the same run.", "",
        "## Targets", "", "| target | measured | goal | met |", "|---|---|---|---|",
    ]
    for name, getter, op, goal in TARGETS:
        try:
            value = getter(result)
        except (KeyError, IndexError, ZeroDivisionError):
            value = None
        met = "n/a" if value is None or np.isnan(value) else (
            "yes" if (value <= goal if op == "<=" else value >= goal) else "**no**")
        lines.append(f"| {name} | {_fmt(value)} | {op} {goal} | {met} |")
    lines += ["", "## Cells", "",
              "| route | conc. | e2e p50 (s) ours / vLLM | ratio | e2e p99 ratio | TTFT p50 (ms) ours / vLLM | "
              "TPOT p50 ratio | tok/s ours / vLLM | errors |",
              "|---|---|---|---|---|---|---|---|---|"]
    for cell in cells.values():
        o, v, r = cell["unlearnd"], cell["vllm"], cell["ratio"]
        lines.append(
            f"| {cell['route']} | {cell['concurrency']} | {_fmt(o['e2e_p50'])} / {_fmt(v['e2e_p50'])} | "
            f"{_fmt(r['e2e_p50'])} | {_fmt(r['e2e_p99'])} | {_fmt(1000 * o['ttft_p50'], 1)} / "
            f"{_fmt(1000 * v['ttft_p50'], 1)} | {_fmt(r['tpot_p50'])} | {_fmt(o['tok_throughput'], 1)} / "
            f"{_fmt(v['tok_throughput'], 1)} | {o['errors']}/{v['errors']} |")
    lines += ["", "## Detector cost vs active forget requests", "",
              "| active requests | detector ms / prompt | non-flagged e2e p50 (s) |", "|---|---|---|"]
    for row in result["sweep"]:
        lines.append(f"| {row['active_requests']} | {_fmt(row['classifier_ms_per_prompt'])} | {_fmt(row['e2e_p50'])} |")
    profile = result.get("profile")
    if profile:
        lines += ["", "## Where the unlearnd front-end's time goes", "",
                  f"py-spy samples of the unlearnd server process (HTTP, detector, routing, vLLM's front-end; "
                  f"the model runs in vLLM's engine-core process) while it served the non-flagged cells "
                  f"({profile['cells']}): {profile['samples']} busy samples"
                  + (f" at {profile['rate_hz']} Hz = {profile['busy_s']:.1f} s of busy time in the process"
                     if "busy_s" in profile else "") + f". Raw stacks: `{profile['raw']}`.", "",
                  "| component | share of busy samples |", "|---|---|"]
        lines += [f"| {name} | {100 * share:.1f}% |" for name, share in profile["components"].items()]
        lines += ["", "| hottest frame | share |", "|---|---|"]
        lines += [f"| `{row['frame']}` | {100 * row['share']:.1f}% |" for row in profile["top_frames"]]
    lines += ["", f"![latency]({plot.name})", ""]
    if result.get("notes"):
        lines += ["## Notes", "", *result["notes"], ""]
    md = out.with_suffix(".md")
    md.write_text("\n".join(lines))
    return md


def bench_serve(out: Path, tofu_dir: Path, cfg: BenchConfig, plain_url: str | None = None,
                unlearnd_url: str | None = None, admin_key: str | None = None, detector: str = DEFAULT_DETECTOR,
                workdir: Path | None = None, command: str | None = None, profile: bool = True) -> Path:
    """Start (or reuse) both servers, run the benchmark, write the report; returns the markdown path."""
    import tempfile

    from unlearnd.engine.remote import plain_vllm_command
    from unlearnd.models import pull_default
    from unlearnd.bench.servers import ServerProcess, free_port, unlearnd_command

    workdir = Path(workdir or tempfile.mkdtemp(prefix="unlearnd-bench-"))
    started: list[ServerProcess] = []
    try:
        model_dir = str(pull_default())
        if plain_url is None:
            port = free_port()
            plain = ServerProcess(plain_vllm_command(model_dir, port, MODEL), port, workdir / "vllm.log",
                                  env={"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
                                       "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")})
            started.append(plain.start())
            plain_url = plain.url
        if unlearnd_url is None:
            port = free_port()
            admin_key = admin_key or "bench-admin-key"
            ours = ServerProcess(unlearnd_command(port, workdir / "data", "--admin-key", admin_key,
                                                  "--detector", detector), port, workdir / "unlearnd.log")
            started.append(ours.start())
            unlearnd_url = ours.url
        profiler = None
        if profile and started and started[-1].url == unlearnd_url:
            from unlearnd.bench.profile import Profiler

            profiler = Profiler(started[-1].proc.pid, out.with_name(out.name + "-profile.txt"))
        result = run_bench(plain_url, unlearnd_url, admin_key, tofu_dir, cfg, profiler)
    finally:
        for server in reversed(started):
            server.stop()
    return write_report(result, out, command or "unlearnd bench serve " + shlex.join(sys.argv[3:]))


def register(bench_app) -> None:
    """Attach `unlearnd bench serve` to the CLI."""
    import typer

    @bench_app.command("serve")
    def serve_command(
        out: Path = typer.Option(Path("reports/latency"), help="Report path stem (.md, .json, .png)."),
        data: Path = typer.Option(None, "--data", help="TOFU folder (default: unlearnd.config.tofu_dir())."),
        concurrency: str = typer.Option("1,4,16"),
        requests: int = typer.Option(32, help="Requests per server per (route, concurrency) cell."),
        rounds: int = typer.Option(2, help="Alternating rounds per cell."),
        output_len: int = typer.Option(32),
        routes: str = typer.Option("refuse,prompt", help="Flagged routes to measure."),
        sweep: str = typer.Option("1,10,100", help="Active forget request counts for the detector sweep."),
        sweep_requests: int = typer.Option(16),
        detector: str = typer.Option(DEFAULT_DETECTOR),
        plain_url: str = typer.Option(None, help="Reuse a running plain vLLM server."),
        unlearnd_url: str = typer.Option(None, help="Reuse a running unlearnd server."),
        admin_key: str = typer.Option(None, envvar="UNLEARND_ADMIN_KEY"),
        timeout_s: float = typer.Option(600, help="Upper bound per driver run."),
        profile: bool = typer.Option(True, help="py-spy the unlearnd server during the non-flagged cells "
                                                "(when it is started here and py-spy is installed)."),
    ) -> None:
        """Latency and throughput of unlearnd against plain vLLM on the same model."""
        from unlearnd.config import tofu_dir

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
        ints = lambda text: tuple(int(x) for x in text.split(",") if x)
        cfg = BenchConfig(concurrency=ints(concurrency), requests=requests, rounds=rounds, output_len=output_len,
                          routes=tuple(r for r in routes.split(",") if r), sweep=ints(sweep),
                          sweep_requests=sweep_requests, timeout_s=timeout_s)
        md = bench_serve(out, data or tofu_dir(), cfg, plain_url, unlearnd_url, admin_key, detector,
                         profile=profile)
        typer.echo(str(md))
