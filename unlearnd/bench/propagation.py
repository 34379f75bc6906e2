"""How long a request registered on one replica takes to be enforced by another (issue target: p99 <= 2 s).

The benchmark starts what a scaled-out deployment runs: a real PostgreSQL (`bench.postgres`), one plain vLLM
server (`unlearnd backend`'s command) and two unlearnd replicas in front of it on one registry and one
artifacts folder. Each trial registers a `refuse` request for a new invented name through replica A and
then asks replica B's `/v1/unlearning/classify` about that name until B routes it to `refuse`; the wait
from A's 201 to B's first refusing answer is the propagation time (the polling step, 20 ms, is its
resolution). Names share no part between trials. Per-trial records, the machine's load and the commit go
into the report.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from pydantic import BaseModel

from unlearnd.bench.postgres import PostgresServer
from unlearnd.bench.servers import ServerProcess, free_port, unlearnd_command
from unlearnd.config import DEFAULT_MODEL
from unlearnd.engine.remote import plain_vllm_command
from unlearnd.evaluation.report import fmt, run_stamp, stamp_lines, write_records, write_report_files

log = logging.getLogger(__name__)

TARGET_P99_S = 2.0
POLL_S = 0.02
KEY = "propagation-bench-admin-key"
_SYLLABLES = ["qua", "ven", "dri", "mol", "zek", "tor", "bly", "sna", "fer", "gow", "pix", "lum", "orv", "jat"]


class PropagationOptions(BaseModel):
    trials: int = 50
    seed: int = 0
    out: str = "reports/propagation"
    logs_dir: str | None = None


def invented_names(n: int, seed: int) -> list[str]:
    """`n` two-part names of three syllables each, no part used twice (so no trial's name matches another's)."""
    rng = np.random.default_rng(seed)
    seen: set[str] = set()
    names = []
    while len(names) < n:
        parts = ["".join(rng.choice(_SYLLABLES, 3)).capitalize() for _ in range(2)]
        if seen.isdisjoint(parts) and parts[0] != parts[1]:
            seen.update(parts)
            names.append(" ".join(parts))
    return names


def _route(client: httpx.Client, url: str, name: str) -> str:
    response = client.post(f"{url}/v1/unlearning/classify", json={"input": [f"Who is {name}?"]}, timeout=30)
    response.raise_for_status()
    return response.json()["data"][0]["route"]


def one_trial(client: httpx.Client, a: str, b: str, name: str, timeout_s: float = 30.0) -> dict[str, Any]:
    """Register `name` on `a`; seconds until `b` refuses it (None if it never did within `timeout_s`)."""
    before = _route(client, b, name)
    spec = {"name": name, "method": "refuse", "forget": [{"question": f"Who is {name}?", "answer": "A painter."}]}
    added = client.post(f"{a}/v1/unlearning/requests", json=spec, timeout=60)
    added.raise_for_status()
    registered = time.monotonic()
    while time.monotonic() - registered < timeout_s:
        if _route(client, b, name) == "refuse":
            return {"name": name, "route_before": before, "seconds": time.monotonic() - registered}
        time.sleep(POLL_S)
    return {"name": name, "route_before": before, "seconds": None}


def _start(logs: Path, model_dir: str) -> tuple[PostgresServer, list[ServerProcess], Path]:
    database = PostgresServer().start()
    artifacts = Path(tempfile.mkdtemp(prefix="unlearnd-artifacts-"))
    port = free_port()
    backend_env = {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True", "VLLM_CPU_KVCACHE_SPACE": "1"}
    backend = ServerProcess(plain_vllm_command(model_dir, port, DEFAULT_MODEL), port, logs / "vllm.log", backend_env)
    servers = [backend.start()]
    shared = ("--admin-key", KEY, "--engine", "remote", "--remote-url", backend.url, "--registry", database.url)
    for name, worker in (("a", "--worker"), ("b", "--no-worker")):
        port = free_port()
        data_dir = Path(tempfile.mkdtemp(prefix=f"unlearnd-replica-{name}-"))
        cmd = unlearnd_command(port, data_dir, *shared, "--artifacts", str(artifacts), worker)
        servers.append(ServerProcess(cmd, port, logs / f"replica-{name}.log").start(timeout_s=600))
    return database, servers, artifacts


def run_propagation(opts: PropagationOptions) -> dict[str, Any]:
    from unlearnd.models import pull_default

    stamp = run_stamp()
    logs = Path(opts.logs_dir or tempfile.mkdtemp(prefix="unlearnd-propagation-logs-"))
    database, servers, artifacts = _start(logs, str(pull_default()))
    load_before = os.getloadavg()
    try:
        with httpx.Client(headers={"Authorization": f"Bearer {KEY}"}) as client:
            a, b = servers[1].url, servers[2].url
            records = [one_trial(client, a, b, name) for name in invented_names(opts.trials, opts.seed)]
    finally:
        for server in reversed(servers):
            server.stop()
        database.cleanup()
        shutil.rmtree(artifacts, ignore_errors=True)
    report = {**stamp, "trials": opts.trials, "seed": opts.seed, "summary": summarise(records)}
    report["load_average"] = {"before": list(load_before), "after": list(os.getloadavg())}
    write_records(opts.out, records)
    write_report_files(opts.out, report, markdown(report))
    return report


def summarise(records: list[dict[str, Any]]) -> dict[str, Any]:
    waits = [r["seconds"] for r in records if r["seconds"] is not None]
    out: dict[str, Any] = {
        "n": len(records),
        "enforced": len(waits),
        "flagged_before": sum(r["route_before"] != "none" for r in records),
    }
    if waits:
        out |= {q: float(np.quantile(waits, v)) for q, v in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99))}
        out["max"] = max(waits)
    out["met"] = bool(waits) and len(waits) == len(records) and out["p99"] <= TARGET_P99_S
    return out


def markdown(report: dict[str, Any]) -> str:
    s = report["summary"]
    load = report["load_average"]
    cells = " | ".join(fmt(s.get(k)) for k in ("p50", "p90", "p99", "max"))
    return "\n".join(
        [
            "# Propagation: registered on replica A, enforced by replica B",
            "",
            *stamp_lines(report),
            "Real PostgreSQL registry, one plain vLLM backend, two unlearnd replicas (`--engine remote`, shared "
            "artifacts folder; A runs the worker). Each trial registers a `refuse` request for a new invented "
            "name on A, then asks B's `/v1/unlearning/classify` every 20 ms until B routes it to `refuse`. "
            f"Seconds from A's 201 to B's first refusal; target p99 <= {TARGET_P99_S} s.",
            "",
            "| trials | enforced | flagged before registering | p50 s | p90 s | p99 s | max s |",
            "|---|---|---|---|---|---|---|",
            f"| {s['n']} | {s['enforced']} | {s['flagged_before']} | {cells} |",
            "",
            f"Target: {'met' if s['met'] else 'missed'}. With {s['n']} trials the p99 lies between the two "
            "largest waits: the tail of this run, not a tail probability. 1-minute load average "
            f"{load['before'][0]:.2f} before, {load['after'][0]:.2f} after (2 cores).",
            "",
        ]
    )
