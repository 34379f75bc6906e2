"""`unlearnd backend`: a plain vLLM OpenAI server as `serve --engine remote` needs it.

The remote engine sends prompt embeddings (ECO, soft prompts) and loads each request's LoRA at run
time, so its vLLM servers need flags and an environment variable that vLLM leaves off by default. This
command starts one with exactly those (the same command line the tests and benchmarks start): a
container's entrypoint, a systemd unit, or a fleet member behind a router. With `--registry` and
`--artifacts URL` (an object store) it also keeps the server's LoRA resolver folder filled from the store
(engine/adapter_mirror.py), for replicas started with `--remote-lora-by-name`."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
from pathlib import Path

import typer

from unlearnd.config import DEFAULT_MODEL, local_url
from unlearnd.config import data_dir as default_data_dir


def backend(
    model: str = typer.Option(DEFAULT_MODEL, help="Default name, a local HF model dir, or a hub id."),
    served_model_name: str | None = typer.Option(None, help="Name clients use (default: --model)."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on."),
    port: int = typer.Option(8100, help="Port to listen on."),
    max_model_len: int = typer.Option(2048, help="Context length (as `serve --max-model-len`)."),
    max_loras: int = typer.Option(4, help="LoRA adapters held at once (least recently used one evicted)."),
    max_lora_rank: int = typer.Option(16, help="Largest LoRA rank accepted (as `serve --max-lora-rank`)."),
    dtype: str = typer.Option("auto", help="auto, bfloat16, float16 or float32 (as `serve --dtype`)."),
    registry: str | None = typer.Option(None, help="The replicas' registry database (with --artifacts URL)."),
    artifacts: str | None = typer.Option(
        None,
        help="The replicas' object store (s3://bucket/prefix or any fsspec URL): this server then fetches "
        "the LoRA adapters of the registry's requests from it itself, checked against the registry's digests.",
    ),
    lora_dir: Path | None = typer.Option(
        None, help="The server's LoRA resolver folder (default with --artifacts URL: <data dir>/loras)."
    ),
    data_dir: Path | None = typer.Option(
        None,
        envvar="UNLEARND_BACKEND_DATA_DIR",
        help="Cache of fetched artifacts (default: <XDG data>/unlearnd/backend).",
    ),
) -> None:
    """Run a plain vLLM OpenAI server with the flags unlearnd's remote engine needs."""
    from unlearnd.artifact_store import is_store_url
    from unlearnd.engine.remote import plain_vllm_command
    from unlearnd.models import resolve_model

    path = resolve_model(model)
    command = plain_vllm_command(
        path, port, served_model_name or model, max_model_len, host, max_loras, max_lora_rank, dtype
    )
    os.environ["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"  # the remote engine loads adapters at run time
    os.environ["VLLM_SKIP_MODEL_NAME_VALIDATION"] = "0"  # an unknown adapter name must be a 404, not the base model
    mirrored = is_store_url(artifacts)
    if artifacts is not None and not mirrored:
        raise typer.BadParameter("--artifacts here takes an object store URL; a mounted folder needs no mirror")
    if mirrored and not registry:
        raise typer.BadParameter("--artifacts URL needs --registry: the database that names each version")
    data_dir = data_dir or default_data_dir() / "backend"
    if mirrored:
        lora_dir = lora_dir or data_dir / "loras"
    if lora_dir is not None:
        os.environ["VLLM_LORA_RESOLVER_CACHE_DIR"] = str(Path(lora_dir).resolve())
    if not mirrored:
        os.execv(command[0], command)
    mirror = (Path(lora_dir), data_dir, local_url(host, port))
    raise typer.Exit(_serve_with_mirror(command, path, registry, artifacts, *mirror))


def _serve_with_mirror(
    command: list[str], base_model: str, registry: str, artifacts: str, lora_dir: Path, data_dir: Path, url: str
) -> int:
    """The vLLM server as a child, the mirror in this process until the child exits (its status is ours;
    128 + the signal that ended it). SIGTERM is passed on; SIGINT reaches the child from the terminal by
    itself; the child dies with this process (a server nobody mirrors for would keep purged adapters)."""
    from unlearnd.engine.adapter_mirror import AdapterMirror
    from unlearnd.registry import Registry

    mirror = AdapterMirror(Registry(data_dir, registry, artifacts), lora_dir, base_model, server_url=url)
    stop = threading.Event()
    child: subprocess.Popen | None = None
    terminated = threading.Event()

    def on_term(signum, _frame) -> None:
        terminated.set()
        if child is not None:
            child.send_signal(signum)

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    child = subprocess.Popen(command, preexec_fn=_child_setup)
    if terminated.is_set():  # SIGTERM came before the child existed
        child.terminate()
    thread = threading.Thread(target=mirror.run, args=(stop,), name="adapter-mirror", daemon=True)
    thread.start()
    try:
        code = child.wait()
    finally:
        stop.set()
        thread.join(timeout=10)
    return 128 - code if code < 0 else code


def _child_setup() -> None:
    """In the vLLM child before exec: SIGINT as usual, and SIGKILL when this process dies (Linux)."""
    import ctypes

    signal.signal(signal.SIGINT, signal.SIG_DFL)
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
