"""`unlearnd serve`: the OpenAI-compatible API with unlearning guardrails."""

from __future__ import annotations

from pathlib import Path

import typer

from unlearnd.config import DEFAULT_DETECTOR, DEFAULT_MODEL


def serve(
    model: str = typer.Option(DEFAULT_MODEL, help="Default name, a local HF model dir, or a hub id."),
    served_model_name: str | None = typer.Option(None, help="Model name clients use (default: --model)."),
    host: str = typer.Option("127.0.0.1"),
    port: int = typer.Option(8000),
    data_dir: Path = typer.Option(None, help="Registry + artifacts (default: XDG data dir)."),
    engine: str = typer.Option("local", help="local (vLLM in process) or remote (a vLLM OpenAI server)."),
    remote_url: str | None = typer.Option(None, help="Base URL of the remote vLLM server."),
    admin_key: str | None = typer.Option(None, envvar="UNLEARND_ADMIN_KEY", help="Key for the admin API."),
    api_key: str | None = typer.Option(None, envvar="UNLEARND_API_KEY", help="Optional key for completions."),
    detector: str = typer.Option(DEFAULT_DETECTOR, help="Registered detector name (unlearnd.detectors)."),
    max_model_len: int = typer.Option(2048),
    kv_cache_gib: int = typer.Option(1, help="vLLM CPU KV cache size (whole GiB; env VLLM_CPU_KVCACHE_SPACE wins)."),
    dtype: str = typer.Option(
        "auto",
        help="Engine dtype: auto (bfloat16 on GPUs, float32 on every CPU), bfloat16, float16, float32.",
    ),
    worker: bool = typer.Option(True, help="Run the training worker next to the server."),
    public_score: bool = typer.Option(False, help="Let everyone call /v1/unlearning/score (default: admin only)."),
    public_metrics: bool = typer.Option(False, help="Let everyone read /metrics (default: the admin key as bearer)."),
    expose_request_ids: bool = typer.Option(
        False, help="Name the deciding forget requests in response headers (who is forgotten is sensitive)."
    ),
    log_level: str = typer.Option("info"),
) -> None:
    """Serve the OpenAI-compatible API with unlearning guardrails."""
    from unlearnd.config import data_dir as default_data_dir
    from unlearnd.logs import setup_logging
    from unlearnd.server.app import serve as run_server
    from unlearnd.server.settings import ServerSettings

    setup_logging(log_level)
    settings = ServerSettings(
        model=model,
        served_model_name=served_model_name,
        host=host,
        port=port,
        data_dir=data_dir or default_data_dir(),
        engine=engine,
        remote_url=remote_url,
        admin_key=admin_key,
        api_key=api_key,
        detector=detector,
        max_model_len=max_model_len,
        kv_cache_gib=kv_cache_gib,
        dtype=dtype,
        start_worker=worker,
        public_score=public_score,
        public_metrics=public_metrics,
        expose_request_ids=expose_request_ids,
        log_level=log_level,
    )
    run_server(settings)
