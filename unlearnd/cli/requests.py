"""`unlearnd requests`: manage forget requests, over HTTP with --url or directly on a local registry."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from unlearnd.cli.common import echo_json
from unlearnd.methods import methods_help

app = typer.Typer(help="Manage forget requests.", no_args_is_help=True)

URL = typer.Option(None, "--url", envvar="UNLEARND_URL", help="Server URL (default: local registry).")
ADMIN_KEY = typer.Option(
    None, "--admin-key", envvar="UNLEARND_ADMIN_KEY", help="Default: the key a server wrote to <data dir>/admin_key."
)
DATA_DIR = typer.Option(None, "--data-dir", help="Registry dir (the local registry without --url; its admin key with).")


def _client(url: str, admin_key: str | None, data_dir: Path | None):
    """A client of the server at `url`, with the given admin key or the one a server generated in the data dir."""
    from unlearnd.client import UnlearndClient
    from unlearnd.config import data_dir as default_data_dir
    from unlearnd.server.auth import read_admin_key

    key = admin_key or read_admin_key(data_dir or default_data_dir())
    return UnlearndClient(url, admin_key=key, timeout_s=30, retries=0)


def _registry(data_dir: Path | None):
    from unlearnd.registry import open_registry

    return open_registry(data_dir)


def _over_http(call):
    """Run `call()` against the server; a server error exits 1 with its message."""
    from unlearnd.client import ServerError

    try:
        return call()
    except ServerError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None


def _not_found(request_id: str) -> typer.Exit:
    typer.echo(f"error: forget request {request_id!r} not found", err=True)
    return typer.Exit(1)


def _read_examples(path: Path) -> list:
    """JSON lines of {question, answer} or {text}."""
    items = []
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            items.append(row if "question" in row else row["text"])
    return items


@app.command("add")
def add(
    name: str = typer.Option(..., help="What to forget (also the default entity name)."),
    forget_file: Path = typer.Option(..., "--forget", help="JSONL of {question, answer} or {text} lines."),
    retain_file: Path | None = typer.Option(None, "--retain"),
    method: str = typer.Option("refuse", help=methods_help()),
    entity: list[str] = typer.Option([], "--entity", help="Entity names (repeatable)."),
    url: str | None = URL,
    admin_key: str | None = ADMIN_KEY,
    data_dir: Path | None = DATA_DIR,
) -> None:
    """Register a forget request."""
    from pydantic import ValidationError

    from unlearnd.domain import ForgetSpec

    payload = {
        "name": name,
        "method": method,
        "forget": _read_examples(forget_file),
        "retain": _read_examples(retain_file) if retain_file else [],
        "entities": entity,
    }
    if url:
        with _client(url, admin_key, data_dir) as client:
            echo_json(_over_http(lambda: client.add_request(payload)))
        return
    try:
        spec = ForgetSpec.model_validate(payload)
    except ValidationError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    echo_json(_registry(data_dir).add(spec).model_dump(mode="json", exclude={"spec"}))


@app.command("list")
def list_(url: str | None = URL, admin_key: str | None = ADMIN_KEY, data_dir: Path | None = DATA_DIR) -> None:
    """List forget requests."""
    if url:
        with _client(url, admin_key, data_dir) as client:
            rows = _over_http(client.list_requests)
    else:
        rows = [r.model_dump(mode="json", exclude={"spec"}) for r in _registry(data_dir).list()]
    for row in rows:
        typer.echo(
            f"{row['id']}  {row['status']:<9} {row['method']:<11} {row['name']}"
            + (f"  ({row['error']})" if row.get("error") else "")
        )


@app.command("show")
def show(
    request_id: str, url: str | None = URL, admin_key: str | None = ADMIN_KEY, data_dir: Path | None = DATA_DIR
) -> None:
    """Show one forget request."""
    if url:
        with _client(url, admin_key, data_dir) as client:
            echo_json(_over_http(lambda: client.get_request(request_id)))
        return
    try:
        echo_json(_registry(data_dir).get(request_id).model_dump(mode="json"))
    except KeyError:
        raise _not_found(request_id) from None


@app.command("retrain")
def retrain(
    request_id: str,
    url: str | None = URL,
    admin_key: str | None = ADMIN_KEY,
    data_dir: Path | None = DATA_DIR,
) -> None:
    """Send a degraded or failed forget request back to training (a degraded one stays refused meanwhile)."""
    if url:
        with _client(url, admin_key, data_dir) as client:
            echo_json(_over_http(lambda: client.retrain_request(request_id)))
        return
    try:
        record = _registry(data_dir).retrain(request_id)
    except KeyError:
        raise _not_found(request_id) from None
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    echo_json(record.model_dump(mode="json", exclude={"spec"}))


@app.command("remove")
def remove(
    request_id: str,
    purge: bool = typer.Option(False, help="Also delete artifacts."),
    url: str | None = URL,
    admin_key: str | None = ADMIN_KEY,
    data_dir: Path | None = DATA_DIR,
) -> None:
    """Deactivate a forget request (artifacts kept unless --purge)."""
    if url:
        with _client(url, admin_key, data_dir) as client:
            echo_json(_over_http(lambda: client.remove_request(request_id, purge)))
        return
    try:
        record = _registry(data_dir).deactivate(request_id, purge=purge)
    except KeyError:
        raise _not_found(request_id) from None
    echo_json(record.model_dump(mode="json", exclude={"spec"}))


@app.command("evidence")
def evidence(
    request_id: str,
    rerun: bool = typer.Option(False, help="Queue the probe battery again (the worker runs it)."),
    format: str = typer.Option("markdown", help="markdown, json, or png (the plot's bytes to --out)."),
    out: Path | None = typer.Option(None, help="Write to this file instead of standard output."),
    url: str | None = URL,
    admin_key: str | None = ADMIN_KEY,
    data_dir: Path | None = DATA_DIR,
) -> None:
    """Show a forget request's evidence: the probe battery run against the served model once it was active."""
    if format not in ("markdown", "json", "png"):
        raise typer.BadParameter("format: markdown, json or png")
    if url:
        with _client(url, admin_key, data_dir) as client:
            if rerun:
                echo_json(_over_http(lambda: client.rerun_evidence(request_id)))
                return
            found = _over_http(lambda: client.evidence(request_id, format))
    else:
        found = _local_evidence(request_id, rerun, format, data_dir)
        if found is None:
            return
    if isinstance(found, dict):
        found = json.dumps(found, indent=1)
    if out is not None:
        out.write_bytes(found) if isinstance(found, bytes) else out.write_text(found)
    elif isinstance(found, bytes):
        raise typer.BadParameter("png needs --out")
    else:
        typer.echo(found)


def _local_evidence(request_id: str, rerun: bool, format: str, data_dir: Path | None):
    registry = _registry(data_dir)
    try:
        if rerun:
            registry.request_evidence(request_id, actor="cli")
            echo_json({"request_id": request_id, "status": "pending"})
            return None
        registry.get(request_id)
    except KeyError:
        raise _not_found(request_id) from None
    row = registry.evidence(request_id)
    if row is None or row["verdict"] is None:
        typer.echo(f"error: no evidence for {request_id!r} yet", err=True)
        raise typer.Exit(1)
    if format == "json":
        return {k: v for k, v in row.items() if k != "png"} | {"report": json.loads(row["report"] or "{}")}
    return row["png"] if format == "png" else row["markdown"]
