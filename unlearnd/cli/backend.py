"""`unlearnd backend`: a plain vLLM OpenAI server as `serve --engine remote` needs it.

The remote engine sends prompt embeddings (ECO, soft prompts) and loads each request's LoRA at run
time, so its vLLM servers need flags and an environment variable that vLLM leaves off by default. This
command starts one with exactly those (the same command line the tests and benchmarks start), in this
process: a container's entrypoint, a systemd unit, or a fleet member behind a router."""

from __future__ import annotations

import os

import typer

from unlearnd.config import DEFAULT_MODEL


def backend(
    model: str = typer.Option(DEFAULT_MODEL, help="Default name, a local HF model dir, or a hub id."),
    served_model_name: str | None = typer.Option(None, help="Name clients use (default: --model)."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on."),
    port: int = typer.Option(8100, help="Port to listen on."),
    max_model_len: int = typer.Option(2048, help="Context length (as `serve --max-model-len`)."),
    max_loras: int = typer.Option(4, help="LoRA adapters held at once (least recently used one evicted)."),
    max_lora_rank: int = typer.Option(16, help="Largest LoRA rank accepted (as `serve --max-lora-rank`)."),
    dtype: str = typer.Option("auto", help="auto, bfloat16, float16 or float32 (as `serve --dtype`)."),
) -> None:
    """Run a plain vLLM OpenAI server with the flags unlearnd's remote engine needs."""
    from unlearnd.engine.remote import plain_vllm_command
    from unlearnd.models import resolve_model

    path = resolve_model(model)
    command = plain_vllm_command(
        path, port, served_model_name or model, max_model_len, host, max_loras, max_lora_rank, dtype
    )
    os.environ["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"  # the remote engine loads adapters at run time
    os.execv(command[0], command)
