"""Start and stop servers on loopback (plain vLLM, unlearnd) for benchmarks and integration tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """A server subprocess in its own process group, ready once /health and /v1/models answer."""

    def __init__(self, cmd: list[str], port: int, log_path: Path, env: dict | None = None):
        self.cmd, self.port, self.log_path = cmd, port, Path(log_path)
        self.url = f"http://127.0.0.1:{port}"
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc: subprocess.Popen | None = None
        self._log = None

    def start(self, timeout_s: float = 900) -> ServerProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            self.cmd, stdout=self._log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
        )
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; log:\n{self.tail()}")
            try:
                if (
                    httpx.get(self.url + "/health", timeout=2).status_code == 200
                    and httpx.get(self.url + "/v1/models", timeout=5).status_code == 200
                ):
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(1)
        self.stop()
        raise RuntimeError(f"server did not come up in {timeout_s}s; log:\n{self.tail()}")

    def tail(self, n: int = 60) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if self._log is not None:
            self._log.close()

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def unlearnd_command(port: int, data_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "unlearnd.cli", "serve", "--port", str(port), "--data-dir", str(data_dir), *extra]
