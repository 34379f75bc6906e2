"""CLI commands of the classifiers package (`unlearnd train classifier`, `unlearnd eval classifier`)."""

from __future__ import annotations

import typer


def register(train_app: typer.Typer, eval_app: typer.Typer) -> None:
    """Attach this package's commands to the `train` and `eval` command groups."""
