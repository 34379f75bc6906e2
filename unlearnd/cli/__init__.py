"""The `unlearnd` command line: one module per command group, each parsing flags and calling one function.

`serve` (cli/serve.py), `backend` (cli/backend.py), `models` (cli/models.py), `requests` (cli/requests.py), `audit`
(cli/audit.py), `train` (cli/train.py), `eval` (cli/evaluate.py) and `bench` (cli/bench.py).
"""

from __future__ import annotations

import typer

from unlearnd.cli import audit, backend, bench, evaluate, models, requests, serve, train
from unlearnd.logs import setup_logging
from unlearnd.provenance import DirtyTreeError

app = typer.Typer(help="unlearnd: inference-time guardrail unlearning server on vLLM.", no_args_is_help=True)


@app.callback()
def _options(log_level: str = typer.Option("info", "--log-level", help="Logging level of every command.")) -> None:
    setup_logging(log_level)


app.command("serve")(serve.serve)
app.command("backend")(backend.backend)
app.add_typer(models.app, name="models")
app.add_typer(requests.app, name="requests")
app.add_typer(audit.app, name="audit")
app.add_typer(train.app, name="train")
app.add_typer(evaluate.app, name="eval")
app.add_typer(bench.app, name="bench")


def main() -> None:
    try:
        app()
    except DirtyTreeError as exc:  # a report command in a tree that is not a commit: a message, not a traceback
        typer.echo(str(exc), err=True)
        raise SystemExit(2) from None
