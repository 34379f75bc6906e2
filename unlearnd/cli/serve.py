"""`unlearnd serve`: the OpenAI-compatible API with unlearning guardrails.

Its flags are derived from `ServerSettings`, one per field (`--max-model-len` for `max_model_len`, or
the field's `cli` name), so a new setting is declared once and works as a flag and as `UNLEARND_*`.
A flag left out is not passed at all: the environment, then the field's default, decides.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Annotated, Any, get_args, get_origin

import typer
from pydantic import ValidationError
from pydantic.fields import FieldInfo

from unlearnd.server.settings import ServerSettings


def flag_name(name: str, field: FieldInfo) -> str:
    extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
    return str(extra.get("cli", name)).replace("_", "-")


def _flag_type(annotation: Any) -> Any:
    """The type typer parses a flag as: bool, int, float, Path, str, or list[str] for a repeatable flag
    (pydantic validates the rest)."""
    if get_origin(annotation) is Annotated:
        annotation = get_args(annotation)[0]
    if get_origin(annotation) is list:
        return list[str]
    options = [a for a in get_args(annotation) if a is not type(None)] or [annotation]
    if get_origin(annotation) is not None and len(options) == 1:
        annotation = options[0]
    return annotation if annotation in (bool, int, float, Path) else str


def _parameter(name: str, field: FieldInfo) -> inspect.Parameter:
    flag = flag_name(name, field)
    kind = _flag_type(field.annotation)
    decls = [f"--{flag}/--no-{flag}"] if kind is bool else [f"--{flag}"]
    default = field.get_default(call_default_factory=False)
    shown = default if field.default_factory is None else None
    env = f"UNLEARND_{name.upper()}"
    help_text = f"{field.description or ''} (env {env}" + (f"; default {shown})" if shown is not None else ")")
    option = typer.Option(None, *decls, help=help_text, show_default=False)
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=kind | None)


def settings_from_flags(given: dict[str, Any]) -> ServerSettings:
    """Flags that were given win; the rest come from `UNLEARND_*` or the defaults."""
    try:
        return ServerSettings(**{name: value for name, value in given.items() if value not in (None, [], ())})
    except ValidationError as exc:  # a bad flag or environment value: a usage error, not a traceback
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise typer.BadParameter(problems) from None


def serve(**given: Any) -> None:
    """Serve the OpenAI-compatible API with unlearning guardrails."""
    from unlearnd.logs import setup_logging
    from unlearnd.server.app import serve as run_server

    settings = settings_from_flags(given)
    setup_logging(settings.log_level)
    run_server(settings)


serve.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
    [_parameter(name, field) for name, field in ServerSettings.model_fields.items()]
)
