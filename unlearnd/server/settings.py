"""Server settings: one pydantic model filled from CLI flags and `UNLEARND_*` environment variables."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from unlearnd.config import DEFAULT_DETECTOR, DEFAULT_MODEL, data_dir


class ServerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="UNLEARND_", extra="ignore")

    model: str = DEFAULT_MODEL  # default name, local HF dir, or hub id
    served_model_name: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    data_dir: Path = Field(default_factory=data_dir)
    engine: Literal["local", "remote"] = "local"
    remote_url: str | None = None  # base URL of a vLLM OpenAI server, for engine=remote
    admin_key: str | None = None  # None: generated once and kept in <data_dir>/admin_key (0600)
    api_key: str | None = None
    max_header_bytes: int = 64 * 1024  # all request headers together (431 above)
    body_timeout_s: float = 30.0  # the whole request body must arrive within this (408 after)
    exit_on_engine_death: bool = True  # exit (status 3) when the engine dies, for a supervisor to restart
    public_metrics: bool = False  # /metrics for everyone (else the admin key: it counts forget requests)
    public_score: bool = False  # /v1/unlearning/score for everyone (else admin-only: it returns log-probs)
    expose_request_ids: bool = False  # x-unlearnd-request-id / -matched-ids headers (who is being forgotten)
    detector: str = DEFAULT_DETECTOR
    max_model_len: int = 2048
    kv_cache_gib: int = 1
    dtype: str = "auto"  # engine compute dtype; auto = bf16 on GPUs, float32 on CPUs
    max_loras: int = 4
    max_lora_rank: int = 16
    max_body_bytes: int = 4 * 1024 * 1024
    start_worker: bool = True
    sync_interval_s: float = 0.5
    log_level: str = "info"
