"""Where a server's time goes: py-spy samples of its process, summarised by component.

The benchmark attaches this to the unlearnd server while it serves non-flagged traffic, so a missed
latency target comes with the share of the front-end process's busy time spent in the detector, in
vLLM's own front-end (tokenising, output processing), in HTTP handling and elsewhere. py-spy's `raw`
output is one line per distinct stack: `frame;frame;...;frame COUNT`, outermost frame first.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

log = logging.getLogger(__name__)

# component -> path fragments of its frames, in priority order: a stack belongs to the first
# component any of its frames matches (the detector called from an HTTP handler is detector time;
# vLLM called from unlearnd's engine wrapper is vLLM time)
COMPONENTS: dict[str, tuple[str, ...]] = {
    "detector (unlearnd/detectors)": ("unlearnd/detectors/", "onnxruntime", "faiss", "sklearn"),
    "vLLM front-end": ("vllm/", "transformers/", "tokenizers"),
    "unlearnd pipeline + interventions": ("unlearnd/guardrail/", "unlearnd/interventions/", "unlearnd/engine/"),
    "HTTP (uvicorn/starlette/fastapi/pydantic)": (
        "uvicorn",
        "starlette",
        "fastapi",
        "pydantic",
        "h11",
        "httptools",
        "sse_starlette",
        "unlearnd/server/",
    ),
    "asyncio event loop": ("asyncio/",),
}


def find_py_spy() -> str | None:
    """py-spy next to this interpreter (a venv), else on PATH."""
    local = Path(sys.executable).parent / "py-spy"
    return str(local) if local.exists() else shutil.which("py-spy")


class Profiler:
    """Record a process with py-spy between `start()` and `stop()` (raw collapsed stacks)."""

    def __init__(self, pid: int, out: Path, rate: int = 200):
        self.pid, self.out, self.rate = pid, Path(out), rate
        self.proc: subprocess.Popen | None = None

    def start(self) -> bool:
        exe = find_py_spy()
        if exe is None:
            log.warning("py-spy not found: no profile (pip install py-spy)")
            return False
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [
                exe,
                "record",
                "--pid",
                str(self.pid),
                "--format",
                "raw",
                "--rate",
                str(self.rate),
                "--nonblocking",
                "--output",
                str(self.out),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        return True

    def stop(self) -> Path | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # py-spy writes its output on Ctrl-C
        try:
            _, err = self.proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            return None
        if not self.out.exists():
            log.warning("py-spy wrote no profile: %s", (err or b"").decode(errors="replace")[-500:])
            return None
        return self.out


def read_raw(path: Path) -> Counter[tuple[str, ...]]:
    """py-spy raw output -> {stack (outermost first): samples}."""
    stacks: Counter[tuple[str, ...]] = Counter()
    for line in Path(path).read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            stacks[tuple(stack.split(";"))] += int(count)
    return stacks


def component(stack: tuple[str, ...]) -> str:
    """The first component (in COMPONENTS order) that any frame of the stack belongs to."""
    for name, fragments in COMPONENTS.items():
        if any(f in frame for frame in stack for f in fragments):
            return name
    return "other"


def summarise(path: Path, top: int = 12) -> dict:
    """Sample shares per component and the hottest innermost frames."""
    stacks = read_raw(path)
    total = sum(stacks.values())
    by_component: Counter[str] = Counter()
    leaves: Counter[str] = Counter()
    for stack, count in stacks.items():
        by_component[component(stack)] += count
        leaves[stack[-1]] += count

    def share(c: int) -> float:
        return c / total if total else 0.0

    return {
        "samples": total,
        "components": {name: share(c) for name, c in by_component.most_common()},
        "top_frames": [{"frame": frame, "share": share(c)} for frame, c in leaves.most_common(top)],
    }
