"""CLI commands of the offline package (`unlearnd train reference`, `unlearnd eval tofu`, ...)."""

from __future__ import annotations

import typer


def register(train_app: typer.Typer, eval_app: typer.Typer, bench_app: typer.Typer) -> None:
    """Attach this package's commands to the `train`, `eval` and `bench` command groups."""
