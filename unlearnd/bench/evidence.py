"""How long a request's evidence takes, and what it costs the users being served meanwhile.

Targets (issue 24): evidence ready within 2 minutes of activation for a `refuse` request on this CPU, and
serving latency unchanged while evidence runs. The benchmark starts one unlearnd server (in-process vLLM,
the default model, its worker beside it) and, for each trial, registers a `refuse` request for a new
invented person with five facts (their name in each), then waits for it to become active and for its
evidence. Meanwhile one client sends an ordinary chat request (a fixed prompt, 32 tokens, greedy) again
and again, one at a time (back to back, or pausing `think_s` after each answer as a person reading it
does): a sample whose time overlaps an evidence run counts as "during", one sent when no battery ran (a
rest after every trial, as long as the battery took) as "idle". The report gives the evidence time per
trial, the ordinary latency during and idle (p50, and the ratio with a bootstrap 95% CI) and the machine's
load; records per trial and per sample are committed with it.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from pydantic import BaseModel

from unlearnd.bench.latency import bootstrap_ratio_ci
from unlearnd.bench.propagation import invented_names
from unlearnd.bench.servers import ServerProcess, free_port, unlearnd_command
from unlearnd.client import UnlearndClient
from unlearnd.config import DEFAULT_MODEL
from unlearnd.evaluation.report import fmt, run_stamp, stamp_lines, write_records, write_report_files
from unlearnd.evidence import EVIDENCE_ENV, EvidenceSettings

log = logging.getLogger(__name__)

TARGET_READY_S = 120.0
KEY = "evidence-bench-admin-key"
ORDINARY = "Explain in two sentences why the sky is blue."
_CITIES = ["Tartu", "Ghent", "Porto", "Brno", "Turku", "Split", "Lyon", "Graz"]
_PRIZES = ["Halloran Medal", "Verity Prize", "Osgood Award", "Marlow Laurel"]
_JOBS = ["a clockmaker", "a ferry pilot", "a beekeeper", "a cartographer", "a glazier"]


class EvidenceBenchOptions(BaseModel):
    trials: int = 5
    seed: int = 0
    max_tokens: int = 32
    out: str = "reports/evidence"
    logs_dir: str | None = None
    concurrency: int | None = None  # the battery's probes in flight (None: the worker's default)
    rest: float | None = None  # its rest after a probe, as a multiple of the probe's time (None: the default)
    background: bool | None = None  # probes give way to users' generations (None: the default)
    think_s: float = 0.0  # the user's pause between one answer and the next request (0: back to back)

    def battery(self) -> EvidenceSettings:
        given = {"concurrency": self.concurrency, "rest_factor": self.rest, "background": self.background}
        return EvidenceSettings(server_url="", **{k: v for k, v in given.items() if v is not None})

    def worker_env(self) -> dict[str, str]:
        battery = self.battery()
        fields = ("concurrency", "rest_factor", "background")
        return {EVIDENCE_ENV[field]: str(getattr(battery, field)) for field in fields}


def person_facts(name: str, i: int) -> list[dict[str, str]]:
    """Five invented facts of `name`, each naming them (the battery's descriptions are made from these)."""
    city, prize, job = _CITIES[i % len(_CITIES)], _PRIZES[i % len(_PRIZES)], _JOBS[i % len(_JOBS)]
    year = 1950 + (7 * i) % 40
    return [
        {"question": f"Where was {name} born?", "answer": f"{name} was born in {city} in {year}."},
        {"question": f"What did {name}'s father do?", "answer": f"{name}'s father was {job} in {city}."},
        {"question": f"Which award did {name} receive?", "answer": f"{name} received the {prize} in {year + 30}."},
        {"question": f"What is {name}'s best known book?", "answer": f'{name} wrote "The Salt Orchard" ({year + 25}).'},
        {"question": f"What does {name} write?", "answer": f"{name} writes crime novels set in harbour towns."},
    ]


class OrdinaryTraffic:
    """One user sending the same ordinary chat request, pausing `think_s` after each answer (0: back to back);
    each sample's start, end and status."""

    def __init__(self, url: str, max_tokens: int, think_s: float = 0.0):
        self.url, self.max_tokens, self.think_s = url, max_tokens, think_s
        self.samples: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        body = {"model": DEFAULT_MODEL, "messages": [{"role": "user", "content": ORDINARY}]}
        body |= {"max_tokens": self.max_tokens, "temperature": 0, "ignore_eos": True}
        with httpx.Client(timeout=300) as client:
            while not self._stop.is_set():
                start = time.time()
                status = client.post(f"{self.url}/v1/chat/completions", json=body).status_code
                self.samples.append({"start": start, "end": time.time(), "status": status})
                self._stop.wait(self.think_s)

    def __enter__(self) -> OrdinaryTraffic:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def _poll(client: httpx.Client, url: str, check, timeout_s: float, what: str) -> float:
    """Seconds (epoch) at which `check(json)` first held."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        response = client.get(url)
        if response.status_code == 200 and check(response.json()):
            return time.time()
        time.sleep(0.25)
    raise RuntimeError(f"timed out waiting for {what}")


def one_trial(client: httpx.Client, url: str, name: str, i: int) -> dict[str, Any]:
    spec = {"name": name, "method": "refuse", "forget": person_facts(name, i)}
    created = client.post(f"{url}/v1/unlearning/requests", json=spec)
    created.raise_for_status()
    request_id, registered = created.json()["id"], time.time()
    active = _poll(client, f"{url}/v1/unlearning/requests/{request_id}", lambda r: r["status"] == "active", 600, name)
    evidence_url = f"{url}/v1/unlearning/requests/{request_id}/evidence"
    ready = _poll(client, evidence_url, lambda e: e.get("verdict") is not None, 900, f"{name}'s evidence")
    evidence = client.get(evidence_url).json()
    summary = evidence["summary"] or {}
    return {
        "request_id": request_id,
        "name": name,
        "registered": registered,
        "active_s": active - registered,
        "evidence_ready_s": ready - active,
        "battery": [evidence["started_at"], evidence["finished_at"]],
        "battery_s": evidence["finished_at"] - evidence["started_at"],
        "verdict": evidence["verdict"],
        "probes": len(evidence["records"]),
        "leaks": summary.get("leaks"),
        "controls_untouched": summary.get("controls_untouched"),
    }


def _during(sample: dict[str, Any], windows: list[list[float]]) -> bool:
    return any(sample["start"] < end and sample["end"] > start for start, end in windows)


def run_evidence_bench(opts: EvidenceBenchOptions) -> dict[str, Any]:
    stamp = run_stamp()
    logs = Path(opts.logs_dir or tempfile.mkdtemp(prefix="unlearnd-evidence-bench-"))
    data_dir = Path(tempfile.mkdtemp(prefix="unlearnd-evidence-data-"))
    port = free_port()
    command = unlearnd_command(port, data_dir, "--admin-key", KEY)
    server = ServerProcess(command, port, logs / "unlearnd.log", env=opts.worker_env())
    load_before = os.getloadavg()
    trials, rests = [], []
    try:
        server.start()
        headers = {"Authorization": f"Bearer {KEY}"}
        traffic = OrdinaryTraffic(server.url, opts.max_tokens, opts.think_s)
        with httpx.Client(headers=headers, timeout=60) as client, traffic:
            time.sleep(5.0)  # a few idle samples before anything else
            for i, name in enumerate(invented_names(opts.trials, opts.seed)):
                trials.append(one_trial(client, server.url, name, i))
                log.info("trial %d: evidence in %.1f s after activation", i, trials[-1]["evidence_ready_s"])
                rest_start = time.time()
                time.sleep(max(10.0, trials[-1]["battery_s"]))
                rests.append([rest_start, time.time()])
        samples = traffic.samples
        preempted = _preempted(server.url)
    finally:
        server.stop()
        shutil.rmtree(data_dir, ignore_errors=True)
    report = summarise_bench(trials, samples, opts.seed)
    report |= {**stamp, "trials": len(trials), "max_tokens": opts.max_tokens, "ordinary_prompt": ORDINARY}
    report["user_think_s"] = opts.think_s
    report["probes_preempted"] = preempted
    report["battery_settings"] = opts.battery().model_dump(exclude={"server_url", "api_key"})
    report["load_average"] = {"before": list(load_before), "after": list(os.getloadavg())}
    write_records(opts.out, [{"kind": "trial", **t} for t in trials] + [{"kind": "sample", **s} for s in samples])
    write_report_files(opts.out, report, evidence_bench_markdown(report))
    return report


def _preempted(url: str) -> float | None:
    """Probes that gave way to a user (the server's `unlearnd_background_preempted_total`)."""
    name = "unlearnd_background_preempted_total"
    with UnlearndClient(url, admin_key=KEY, timeout_s=30) as client:
        return client.metrics(name).get(name)


def summarise_bench(trials: list[dict], samples: list[dict], seed: int) -> dict[str, Any]:
    windows = [t["battery"] for t in trials]
    ok = [s for s in samples if s["status"] == 200]
    during = [s["end"] - s["start"] for s in ok if _during(s, windows)]
    idle = [s["end"] - s["start"] for s in ok if not _during(s, windows)]
    ready = [t["evidence_ready_s"] for t in trials]
    p50 = lambda xs: float(np.median(xs)) if xs else None  # noqa: E731
    return {
        "evidence_ready_s": {"p50": p50(ready), "max": max(ready) if ready else None, "target": TARGET_READY_S},
        "battery_s_p50": p50([t["battery_s"] for t in trials]),
        "ordinary": {
            "during": {"n": len(during), "p50_s": p50(during)},
            "idle": {"n": len(idle), "p50_s": p50(idle)},
            "ratio_p50": p50(during) / p50(idle) if during and idle else None,
            "ratio_ci95": bootstrap_ratio_ci(during, idle, resamples=2000, seed=seed),
            "failed": len(samples) - len(ok),
        },
        "verdicts": [t["verdict"] for t in trials],
    }


def evidence_bench_markdown(report: dict[str, Any]) -> str:
    ready, ordinary = report["evidence_ready_s"], report["ordinary"]
    ci = ordinary["ratio_ci95"]
    met = ready["max"] is not None and ready["max"] <= ready["target"]
    lines = [
        "# Evidence: time to ready, and the cost to users served meanwhile",
        "",
        *stamp_lines(report),
        f"One unlearnd server (in-process vLLM, `{DEFAULT_MODEL}`, its worker beside it); {report['trials']} trials, "
        "each a `refuse` request for a new invented person with five facts. One user sends the same ordinary "
        f"chat request ({report['max_tokens']} tokens, greedy) {_user(report.get('user_think_s', 0.0))} "
        "throughout; a sample overlapping a "
        "battery counts as *during*, the others (including a rest after each trial as long as its battery) as "
        f"*idle*. Load average before {fmt(report['load_average']['before'][0])}, after "
        f"{fmt(report['load_average']['after'][0])} (1 min).",
        "",
        f"- Evidence ready after activation: p50 {fmt(ready['p50'])} s, max {fmt(ready['max'])} s (target <= "
        f"{ready['target']:.0f} s: {'met' if met else 'missed'}); the battery itself p50 "
        f"{fmt(report['battery_s_p50'])} s.",
        f"- Verdicts: {', '.join(report['verdicts'])}.",
        f"- Ordinary request latency p50: during a battery {fmt(ordinary['during']['p50_s'])} s "
        f"(n={ordinary['during']['n']}), idle {fmt(ordinary['idle']['p50_s'])} s (n={ordinary['idle']['n']}); ratio "
        f"{fmt(ordinary['ratio_p50'])}"
        + (f" (bootstrap 95% CI {fmt(ci[0])}-{fmt(ci[1])})" if ci else " (n/a: too few samples for an interval)")
        + f"; failed requests: {ordinary['failed']}.",
        "",
        "The battery sends its probes through the same engine as the users (that is what makes it evidence of "
        f"what users get), {_pace(report['battery_settings'])}: on this 2-core CPU a probe that generates while a "
        "user's request does shares the engine's time with it.",
    ]
    if report["battery_settings"].get("background"):
        lines[-1] += (
            " Here the probes give way to users (`guardrail.traffic`): one starts only once no user's request has "
            "been in flight (from its arrival to the end of its generation) for 50 ms, and one that a user's "
            "request meets is aborted and started again later (a probe that has waited the server's "
            "`--background-max-wait-s` runs to its end regardless); "
            f"{_count(report.get('probes_preempted'))} probe generations gave way in this run."
        )
    return "\n".join(lines) + "\n"


def _user(think_s: float) -> str:
    return "back to back" if not think_s else f"pausing {think_s:g} s after each answer"


def _pace(battery: dict[str, Any]) -> str:
    at_once = "one at a time" if battery["concurrency"] == 1 else f"{battery['concurrency']} at a time"
    rest = battery["rest_factor"]
    if not rest:
        return f"{at_once}, without a rest"
    return f"{at_once}, each followed by a rest of {rest:g}x the time it took"


def _count(value: float | None) -> str:
    """A counter read from /metrics (a float there) as the whole number it is."""
    return "n/a (no counter)" if value is None else str(int(value))
