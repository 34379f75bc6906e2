"""What several command groups share: option parsing, the reference preset flags, JSON output."""

from __future__ import annotations

import json
from typing import Any

import typer

EPOCHS_HELP = "Override the preset's reference epochs (pass the same to `eval tofu`)."
LR_HELP = "Override the preset's reference learning rate (pass the same to `eval tofu`)."
AUTHORS_HELP = "Override the number of retain authors (mini; pass the same to `eval tofu`)."


def parse_options(pairs: list[str] | None) -> dict[str, Any]:
    """KEY=VALUE pairs; a value is JSON when it parses as JSON (numbers, lists, true/false/null), else a string."""
    out: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise typer.BadParameter(f"expected KEY=VALUE, got {pair!r}")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def parse_limits(limits: list[str] | None) -> dict[str, int | None]:
    """SPLIT=N items per split (`all` / `none` = every item)."""
    out: dict[str, int | None] = {}
    for item in limits or []:
        split, _, value = item.partition("=")
        if not value:
            raise typer.BadParameter(f"--limit wants SPLIT=N, got {item!r}")
        out[split.strip()] = None if value.strip().lower() in ("all", "none") else int(value)
    return out


def set_threads(n: int | None) -> None:
    if n:
        import torch

        torch.set_num_threads(n)


def reference_preset(
    name: str, forget_split: str | None, epochs: float | None, lr: float | None, retain_authors: int | None
):
    """The reference preset with CLI overrides (train and eval must agree to find the same cached models)."""
    from unlearnd.train.reference import preset

    overrides: dict[str, Any] = {}
    if epochs is not None:
        overrides["epochs"] = epochs
    if lr is not None:
        overrides["learning_rate"] = lr
    if retain_authors is not None:
        overrides["n_retain_authors"] = retain_authors
    return preset(name, forget_split, **overrides)


def echo_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=1, default=str))
