"""`unlearnd bench`: latency and throughput of unlearnd against plain vLLM."""

from __future__ import annotations

from pathlib import Path

import typer

from unlearnd.config import DEFAULT_DETECTOR

app = typer.Typer(help="Benchmarks.", no_args_is_help=True)


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x)


@app.command("serve")
def serve(
    out: Path = typer.Option(Path("reports/latency"), help="Report path stem (.md, .json, .png)."),
    data: Path = typer.Option(None, "--data", help="TOFU folder (default: unlearnd.config.tofu_dir())."),
    concurrency: str = typer.Option("1,8", help="Concurrency of the non-flagged cells."),
    requests: int = typer.Option(32, help="Requests per server per cell."),
    rounds: int = typer.Option(4, help="Rounds per cell; the servers' order rotates between rounds."),
    output_len: int = typer.Option(64),
    routes: str = typer.Option("refuse,prompt", help="Flagged routes to measure (one request each)."),
    route_concurrency: str = typer.Option("8", help="Concurrency of the route cells."),
    levels: str = typer.Option("0,10,100,1000", help="Active forget requests the run steps through."),
    cell_levels: str = typer.Option("10,1000", help="Levels with non-flagged cells (route cells: the first)."),
    classify_prompts: int = typer.Option(64, help="Fresh prompts classified one by one at every level."),
    baselines: str = typer.Option("vllm,vllm-default", help="vllm (unlearnd's engine flags), vllm-default."),
    output_guard: str = typer.Option("strict", help="The unlearnd server's output-guard release rule."),
    detector: str = typer.Option(DEFAULT_DETECTOR),
    timeout_s: float = typer.Option(600, help="Upper bound per driver run."),
    seed: int = typer.Option(0, help="Seed of the generated look-alike names."),
    max_load: float = typer.Option(1.0, help="Refuse to start above this 1-minute load average."),
    force: bool = typer.Option(False, help="Run on a busy machine anyway (the report says so)."),
    settle_s: float = typer.Option(1.5, help="Pause before every server's round (vLLM polls 1 s after a burst)."),
    profile: bool = typer.Option(True, help="py-spy the unlearnd server during the last non-flagged cells."),
    plain_url: str = typer.Option(None, help="Reuse a running plain vLLM server (engine flags) as `vllm`."),
    unlearnd_url: str = typer.Option(None, help="Reuse a running unlearnd server (its forget requests stay)."),
    admin_key: str = typer.Option(None, envvar="UNLEARND_ADMIN_KEY", help="The reused unlearnd server's admin key."),
) -> None:
    """Latency and throughput of unlearnd against plain vLLM on the same model."""
    from unlearnd.bench.latency import BenchConfig, BusyMachine, bench_serve
    from unlearnd.config import tofu_dir

    names = tuple(b for b in baselines.split(",") if b)
    if "vllm" not in names or set(names) - {"vllm", "vllm-default"}:
        raise typer.BadParameter("baselines: vllm, optionally vllm-default", param_hint="--baselines")
    cfg = BenchConfig(
        concurrency=_ints(concurrency),
        requests=requests,
        rounds=rounds,
        output_len=output_len,
        routes=tuple(r for r in routes.split(",") if r),
        route_concurrency=_ints(route_concurrency),
        levels=_ints(levels),
        cell_levels=_ints(cell_levels),
        classify_prompts=classify_prompts,
        baselines=names,
        timeout_s=timeout_s,
        output_guard=output_guard,
        seed=seed,
        max_load=max_load,
        force=force,
        settle_s=settle_s,
    )
    if not set(cfg.cell_levels) <= set(cfg.levels):
        raise typer.BadParameter("every cell level must be one of --levels", param_hint="--cell-levels")
    if cfg.routes and min(cfg.cell_levels, default=0) < len(cfg.routes):
        raise typer.BadParameter("the first cell level must hold one request per route", param_hint="--cell-levels")
    try:
        reuse = {name: url for name, url in (("vllm", plain_url), ("unlearnd", unlearnd_url)) if url}
        md = bench_serve(out, data or tofu_dir(), cfg, detector, profile=profile, reuse=reuse, admin_key=admin_key)
    except BusyMachine as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(3) from exc
    typer.echo(str(md))


@app.command("propagation")
def propagation(
    trials: int = typer.Option(50, min=1, help="Requests registered one after another."),
    seed: int = typer.Option(0, help="Picks the invented names."),
    out: Path = typer.Option(Path("reports/propagation"), help="Report path stem (.md, .json, .items.jsonl.gz)."),
    logs_dir: Path = typer.Option(None, help="Where the servers' logs go (default: a temp dir)."),
) -> None:
    """Seconds from registering a request on one replica to its enforcement by another: starts a real
    PostgreSQL, a plain vLLM backend and two unlearnd replicas on them, then `trials` registrations."""
    from unlearnd.bench.propagation import PropagationOptions, run_propagation

    opts = PropagationOptions(trials=trials, seed=seed, out=str(out), logs_dir=str(logs_dir) if logs_dir else None)
    summary = run_propagation(opts)["summary"]
    typer.echo(f"wrote {out}.md: p99 {summary.get('p99')} s over {summary['enforced']}/{summary['n']} enforced")


@app.command("evidence")
def evidence(
    trials: int = typer.Option(5, min=1, help="Refuse requests registered one after another."),
    seed: int = typer.Option(0, help="Picks the invented names."),
    max_tokens: int = typer.Option(32, min=1, help="Tokens of the ordinary request sent meanwhile."),
    out: Path = typer.Option(Path("reports/evidence"), help="Report path stem (.md, .json, .items.jsonl.gz)."),
    logs_dir: Path = typer.Option(None, help="Where the server's log goes (default: a temp dir)."),
    concurrency: int = typer.Option(None, min=1, help="The battery's probes in flight (default: the worker's)."),
    rest: float = typer.Option(None, min=0, help="Rest after a probe, times its duration (default: the worker's)."),
    background: bool = typer.Option(
        None, "--background/--shared", help="Probes give way to users' generations (default: the worker's)."
    ),
    think_s: float = typer.Option(0.0, min=0, help="The user's pause after each answer (0: back to back)."),
) -> None:
    """Seconds from activation to a request's evidence, and the ordinary latency during and between batteries:
    starts an unlearnd server (its worker beside it) and registers `trials` refuse requests."""
    from unlearnd.bench.evidence import EvidenceBenchOptions, run_evidence_bench

    opts = EvidenceBenchOptions(
        trials=trials,
        seed=seed,
        max_tokens=max_tokens,
        out=str(out),
        logs_dir=str(logs_dir) if logs_dir else None,
        concurrency=concurrency,
        rest=rest,
        background=background,
        think_s=think_s,
    )
    report = run_evidence_bench(opts)
    typer.echo(f"wrote {out}.md: evidence p50 {report['evidence_ready_s']['p50']} s after activation")
