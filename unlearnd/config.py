"""Where unlearnd keeps things on disk, and the defaults every entry point shares."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEFAULT_DETECTOR = "guard"  # see unlearnd/detectors/guard.py


def _xdg(var: str, fallback: str) -> Path:
    value = os.environ.get(var)
    return Path(value) if value else Path.home() / fallback


def cache_dir() -> Path:
    """Converted models live here; `UNLEARND_CACHE_DIR` overrides the XDG cache."""
    override = os.environ.get("UNLEARND_CACHE_DIR")
    return Path(override) if override else _xdg("XDG_CACHE_HOME", ".cache") / "unlearnd"


def data_dir() -> Path:
    """Registry database and per-request artifacts; `UNLEARND_DATA_DIR` overrides the XDG data dir."""
    override = os.environ.get("UNLEARND_DATA_DIR")
    return Path(override) if override else _xdg("XDG_DATA_HOME", ".local/share") / "unlearnd"


def tofu_dir() -> Path:
    """Local TOFU JSON-lines folder (tests and benchmarks read it; never copied into the repo)."""
    override = os.environ.get("UNLEARND_TOFU_DIR")
    if override:
        return Path(override)
    return Path(__file__).resolve().parents[2] / "shared" / "data" / "tofu"


def local_url(host: str, port: int) -> str:
    """The URL a process on this machine reaches a server listening on `host`:`port` by (a wildcard
    address is reached on loopback; an IPv6 address is bracketed)."""
    host = host if host not in ("0.0.0.0", "::", "") else "127.0.0.1"
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{port}"
