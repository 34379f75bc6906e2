"""`unlearnd bench`: latency and throughput of unlearnd against plain vLLM."""

from __future__ import annotations

from pathlib import Path

import typer

from unlearnd.config import DEFAULT_DETECTOR

app = typer.Typer(help="Benchmarks.", no_args_is_help=True)


@app.command("serve")
def serve(
    out: Path = typer.Option(Path("reports/latency"), help="Report path stem (.md, .json, .png)."),
    data: Path = typer.Option(None, "--data", help="TOFU folder (default: unlearnd.config.tofu_dir())."),
    concurrency: str = typer.Option("1,4,16"),
    requests: int = typer.Option(32, help="Requests per server per (route, concurrency) cell."),
    rounds: int = typer.Option(2, help="Alternating rounds per cell."),
    output_len: int = typer.Option(32),
    routes: str = typer.Option("refuse,prompt", help="Flagged routes to measure."),
    sweep: str = typer.Option("1,10,100", help="Active forget request counts for the detector sweep."),
    sweep_requests: int = typer.Option(16),
    active: int = typer.Option(0, help="Refuse requests active during the cells (default: one per route)."),
    output_guard: str = typer.Option("strict", help="The unlearnd server's output-guard release rule."),
    detector: str = typer.Option(DEFAULT_DETECTOR),
    plain_url: str = typer.Option(None, help="Reuse a running plain vLLM server."),
    unlearnd_url: str = typer.Option(None, help="Reuse a running unlearnd server."),
    admin_key: str = typer.Option(None, envvar="UNLEARND_ADMIN_KEY"),
    timeout_s: float = typer.Option(600, help="Upper bound per driver run."),
    profile: bool = typer.Option(
        True,
        help="py-spy the unlearnd server during the non-flagged cells "
        "(when it is started here and py-spy is installed).",
    ),
) -> None:
    """Latency and throughput of unlearnd against plain vLLM on the same model."""
    from unlearnd.bench.latency import BenchConfig, bench_serve
    from unlearnd.config import tofu_dir

    def ints(text: str) -> tuple[int, ...]:
        return tuple(int(x) for x in text.split(",") if x)

    cfg = BenchConfig(
        concurrency=ints(concurrency),
        requests=requests,
        rounds=rounds,
        output_len=output_len,
        routes=tuple(r for r in routes.split(",") if r),
        sweep=ints(sweep),
        sweep_requests=sweep_requests,
        timeout_s=timeout_s,
        active=active,
        output_guard=output_guard,
    )
    md = bench_serve(out, data or tofu_dir(), cfg, plain_url, unlearnd_url, admin_key, detector, profile=profile)
    typer.echo(str(md))
