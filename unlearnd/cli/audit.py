"""`unlearnd audit`: read and check the audit trail, over HTTP with --url or on a local registry."""

from __future__ import annotations

from pathlib import Path

import typer

from unlearnd.cli.requests import ADMIN_KEY, DATA_DIR, URL, _client, _registry

app = typer.Typer(help="The audit trail of admin actions and status changes.", no_args_is_help=True)
PAGE = 10_000


def _chain(url: str | None, admin_key: str | None, data_dir: Path | None):
    """Every entry and the head, from the server at `url` (admin key) or the local registry."""
    from unlearnd.audit import AuditEntry

    if url is None:
        return _registry(data_dir).audit_log()
    client = _client(url, admin_key, data_dir)
    entries: list[AuditEntry] = []
    while True:
        page = client.json("GET", "/v1/unlearning/audit", admin=True, params={"after": len(entries), "limit": PAGE})
        entries += [AuditEntry(**e) for e in page["data"]]
        if len(page["data"]) < PAGE:
            return entries, page["head"]["seq"], page["head"]["hash"]


@app.command("verify")
def verify(url: str = URL, admin_key: str = ADMIN_KEY, data_dir: Path = DATA_DIR) -> None:
    """Check the hash chain; exit 1 on an edited, removed or cut entry. Prints the head hash: record it
    elsewhere to pin the log (a writer able to rewrite every entry could recompute the chain)."""
    from unlearnd.audit import verify as check

    entries, head_seq, head_hash = _chain(url, admin_key, data_dir)
    problems = check(entries, head_seq, head_hash)
    for problem in problems:
        typer.echo(problem, err=True)
    if problems:
        raise typer.Exit(1)
    typer.echo(f"audit log intact: {len(entries)} entries, head {head_seq} sha256 {head_hash}")


@app.command("export")
def export(
    url: str = URL,
    admin_key: str = ADMIN_KEY,
    data_dir: Path = DATA_DIR,
    out: Path = typer.Option(None, "--out", help="JSON lines file (default: standard output)."),
) -> None:
    """Every entry as JSON lines."""
    entries, _, _ = _chain(url, admin_key, data_dir)
    text = "".join(e.model_dump_json() + "\n" for e in entries)
    if out is None:
        typer.echo(text, nl=False)
    else:
        out.write_text(text, encoding="utf-8")
