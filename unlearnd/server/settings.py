"""Server settings: one pydantic model, the only place a serve option is declared.

`unlearnd serve` derives one flag per field from it (`unlearnd.cli.serve`), and every field is also
read from `UNLEARND_<FIELD>` (flags win over the environment, the environment over the defaults).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from unlearnd.config import DEFAULT_DETECTOR, DEFAULT_MODEL, data_dir


class ServerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="UNLEARND_", extra="ignore")

    model: str = Field(DEFAULT_MODEL, description="Default name, a local HF model dir, or a hub id.")
    served_model_name: str | None = Field(None, description="Model name clients use (default: --model).")
    host: str = Field("127.0.0.1", description="Address to listen on.")
    port: int = Field(8000, description="Port to listen on.")
    data_dir: Path = Field(default_factory=data_dir, description="Registry + artifacts (default: XDG data dir).")
    registry: str | None = Field(
        None,
        description="Registry database URL: postgresql://USER:PASSWORD@HOST/DB lets several replicas and workers "
        "share forget requests (default: SQLite in the data dir).",
    )
    artifacts: str | None = Field(
        None,
        description="Folder of the forget requests' artifacts, mounted by every replica that shares --registry, "
        "or an object-store URL (s3://bucket/prefix, any fsspec URL; each replica caches what it loads) "
        "(default: <data dir>/requests).",
    )
    engine: Literal["local", "remote"] = Field(
        "local", description="local (vLLM in process) or remote (a vLLM OpenAI server)."
    )
    remote_url: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Base URL of a remote vLLM server (engine=remote); repeat the flag, or separate URLs with "
        "commas, for several: requests go to the least busy, a failed one is taken out until healthy again.",
    )
    remote_lora_dir: str | None = Field(
        None,
        description="Folder every remote vLLM server resolves LoRA adapters from by name (each started with "
        "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True and VLLM_LORA_RESOLVER_CACHE_DIR set to it): unlearnd places an "
        "adapter there instead of loading it through /v1/load_lora_adapter, so LoRA routes work behind a router "
        "that may send a request to any server (engine=remote).",
    )
    remote_lora_by_name: bool = Field(
        False,
        description="The remote vLLM servers fetch the LoRA adapters themselves (`unlearnd backend --registry DB "
        "--artifacts URL`): unlearnd sends only an adapter's name; an activation asks one server for the name "
        "(the others, or those behind a router, are asked on first use: one that lags answers that request with "
        "an error, never the base model), and one that does not hold it yet leaves the request refused until the "
        "next sync (engine=remote; for --artifacts URL and no folder shared with the "
        "servers).",
    )
    admin_key: str | None = Field(
        None, description="Key for the admin API (default: generated once into <data dir>/admin_key, mode 0600)."
    )
    api_key: str | None = Field(None, description="Optional bearer key the completion endpoints require.")
    max_header_bytes: int = Field(64 * 1024, description="All request headers together (431 above).")
    body_timeout_s: float = Field(30.0, description="The whole request body must arrive within this (408 after).")
    exit_on_engine_death: bool = Field(
        True, description="Exit (status 3) when the engine dies, for a supervisor to restart the server."
    )
    public_metrics: bool = Field(False, description="Let everyone read /metrics (default: the admin key as bearer).")
    public_score: bool = Field(False, description="Let everyone call /v1/unlearning/score (default: admin only).")
    expose_request_ids: bool = Field(
        False, description="Name the deciding forget requests in response headers (who is forgotten is sensitive)."
    )
    detector: str = Field(DEFAULT_DETECTOR, description="Registered detector name (unlearnd.detectors).")
    output_guard: Literal["strict", "stream-first", "fixed"] = Field(
        "strict",
        description="strict: generated text leaves once it cannot be part of a forgotten name, title or answer "
        "still under way; stream-first: it leaves at once and a block only cuts the stream (what left is gone); "
        "fixed: it leaves 96 characters behind generation (the older rule, for comparison).",
    )
    background_max_wait_s: float = Field(
        10.0,
        ge=0,
        description="How long a background call (an evidence probe, header x-unlearnd-priority: background) "
        "keeps giving way to users' generations before it runs to its end regardless (0: never gives way).",
    )
    max_model_len: int = Field(2048, description="Context length the engine serves.")
    kv_cache_gib: int = Field(1, description="vLLM CPU KV cache size (whole GiB; env VLLM_CPU_KVCACHE_SPACE wins).")
    dtype: str = Field(
        "auto", description="Engine dtype: auto (bfloat16 on GPUs, float32 on every CPU), bfloat16, float16, float32."
    )
    max_loras: int = Field(4, description="LoRA adapters the engine holds at once.")
    max_lora_rank: int = Field(16, description="Largest LoRA rank the engine accepts.")
    max_body_bytes: int = Field(4 * 1024 * 1024, description="Largest request body (413 above).")
    start_worker: bool = Field(
        True, description="Run the training worker next to the server.", json_schema_extra={"cli": "worker"}
    )
    evidence: bool = Field(
        True,
        description="Have the server's own worker probe every request that becomes active (its evidence); off: "
        "evidence waits for a worker given --server-url (benchmarks of serving cost switch it off).",
    )
    elicit: bool = Field(
        False,
        description="Before fitting a request's detector, have the server's own worker ask the served model about "
        "the request's names (`unlearnd.elicit`): the fact terms it gives join the request's (they flag in pairs) "
        "(a request's options.elicit overrides it). Off by default: on the TOFU mini target the model mixed its "
        "authors' facts up (scripts/dev_elicitation.py).",
    )
    sync_interval_s: float = Field(0.5, description="How often the registry is polled for changed requests.")
    log_level: str = Field("info", description="Logging level.")

    @field_validator("remote_url", mode="before")
    @classmethod
    def _split_urls(cls, value: object) -> object:
        """`--remote-url A --remote-url B`, `A,B` (a flag or `UNLEARND_REMOTE_URL`), or one URL."""
        items = [value] if isinstance(value, str) else value if isinstance(value, list | tuple) else None
        if items is None:
            return value
        return [url.strip() for item in items for url in str(item).split(",") if url.strip()]
