"""Processes a killed server leaves behind (its vLLM engine core, its training worker) are stopped
when a server starts again on the same data dir.

A SIGKILLed server cannot clean up: its children keep running, holding memory, the accelerator and
(for the worker) the registry. The server records its children's pids with their start times in
`<data dir>/server.pids`; the next server stops those still alive (a recycled pid has another start
time and is left alone).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from unlearnd.artifacts import write_json_atomic

log = logging.getLogger(__name__)

PIDS_FILE = "server.pids"


def record_children(data_dir: str | Path) -> list[int]:
    """Write this server's pid and its live descendants (engine core, worker) to the pids file."""
    import psutil

    me = psutil.Process()
    processes = [me, *me.children(recursive=True)]
    entries = [{"pid": p.pid, "started": p.create_time()} for p in processes]
    write_json_atomic(Path(data_dir) / PIDS_FILE, {"server": me.pid, "processes": entries})
    return [e["pid"] for e in entries]


def stop_orphans(data_dir: str | Path, timeout_s: float = 10.0) -> list[int]:
    """Stop what a previous server on this data dir left running; returns the pids stopped."""
    import psutil

    path = Path(data_dir) / PIDS_FILE
    try:
        recorded = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    if recorded.get("server") == os.getpid():
        return []
    alive = []
    for entry in recorded.get("processes", []):
        try:
            process = psutil.Process(int(entry["pid"]))
            if abs(process.create_time() - float(entry["started"])) < 1.0 and process.pid != os.getpid():
                alive.append(process)
        except (psutil.Error, KeyError, ValueError):
            continue
    if any(p.pid == recorded.get("server") for p in alive):
        raise RuntimeError(f"another unlearnd server (pid {recorded['server']}) is running on {data_dir}")
    for process in alive:
        log.warning("stopping pid %d left by a dead server (%s)", process.pid, " ".join(process.cmdline()[:4]))
        process.terminate()
    _, still = psutil.wait_procs(alive, timeout=timeout_s)
    for process in still:
        process.kill()
    path.unlink(missing_ok=True)
    return [p.pid for p in alive]
