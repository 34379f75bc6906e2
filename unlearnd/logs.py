"""One logging setup for every entry point (server, worker, CLI commands, scripts)."""

from __future__ import annotations

import logging


def setup_logging(level: str = "info", process: str | None = None) -> None:
    """Timestamped lines on stderr; `process` names a child process (e.g. the worker) in each line."""
    name = f"{process} " if process else ""
    logging.basicConfig(level=level.upper(), format=f"%(asctime)s {name}%(name)s %(levelname)s %(message)s", force=True)
