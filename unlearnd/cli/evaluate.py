"""`unlearnd eval`: the detector on TOFU, methods on TOFU, merged reports, continual requests."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from unlearnd.cli.common import (
    AUTHORS_HELP,
    EPOCHS_HELP,
    LR_HELP,
    echo_json,
    parse_limits,
    parse_options,
    reference_preset,
    set_threads,
)
from unlearnd.config import DEFAULT_DETECTOR
from unlearnd.methods import METHODS

app = typer.Typer(help="Offline evaluation.", no_args_is_help=True)

ADMIN_KEY = typer.Option(None, envvar="UNLEARND_ADMIN_KEY", help="Admin key for forget requests.")
API_KEY = typer.Option(None, envvar="UNLEARND_API_KEY", help="API key for chat/score calls.")
SERVED_MODEL = typer.Option(None, help="`model` field sent to the server.")


@app.command("detector")
def detector(
    data: Path = typer.Option(None, "--data", help="TOFU folder (default: unlearnd.config.tofu_dir())"),
    split: str = typer.Option("forget05", "--split", help="The forget split whose authors are registered."),
    out: Path = typer.Option(Path("reports/detector"), "--out", help="Writes OUT.json and OUT.md."),
    detectors: str = typer.Option(
        f"{DEFAULT_DETECTOR},keyword",
        help="Comma list of registered detectors; the first is the one the targets are checked for.",
    ),
    other_authors: int = typer.Option(10, help="Other TOFU authors the same-kind negatives are about."),
    per_kind: int = typer.Option(3, help="Probes per author and kind."),
    latency_prompts: int = typer.Option(200),
    server_url: str = typer.Option(
        None,
        help="Also time /v1/unlearning/classify over HTTP on this running server "
        "(the per-author requests are registered there, then purged).",
    ),
    admin_key: str = ADMIN_KEY,
    seed: int = typer.Option(0, help="Draws the typos, look-alikes and latency sample (another seed, other probes)."),
    exclude_authors: str = typer.Option("", help="Comma list of forget authors to leave out (seen in design)."),
) -> None:
    """Precision about WHO: per-kind TPR / FPR of detectors on held-out probes (TOFU authors, other
    authors, look-alike names, near misses, real people, chat), one request per author and one for all."""
    from unlearnd.config import tofu_dir
    from unlearnd.evaluation.detector import DetectorEvalOptions, run_detector_eval

    opts = DetectorEvalOptions(
        data=str(data or tofu_dir()),
        split=split,
        out=str(out),
        detectors=[d.strip() for d in detectors.split(",") if d.strip()],
        other_authors=other_authors,
        per_kind=per_kind,
        latency_prompts=latency_prompts,
        server_url=server_url,
        admin_key=admin_key,
        seed=seed,
        exclude_authors=_author_list(exclude_authors),
    )
    report = run_detector_eval(opts)
    first = report["setups"]["one request per author"][opts.detectors[0]]
    typer.echo(
        f"wrote {out}.json and {out}.md: TPR {first['tpr']:.3f}, FPR {first['fpr']:.3f} (one request per author)"
    )


@app.command("output-guard")
def output_guard(
    data: Path = typer.Option(None, "--data", help="TOFU folder (default: unlearnd.config.tofu_dir())"),
    split: str = typer.Option("forget05", "--split"),
    out: Path = typer.Option(Path("reports/output_guard"), "--out", help="Writes OUT.json and OUT.md."),
    chat_tokens: int = typer.Option(64, help="New tokens of the default model's ordinary answers."),
    meaning: bool = typer.Option(True, "--meaning/--no-meaning", help="The meaning check (sentence encoder)."),
    exclude_authors: str = typer.Option("", help="Comma list of forget authors to leave out (seen in design)."),
) -> None:
    """False-block rate of the output guard on other authors' answers and ordinary chat, its recall on
    paraphrased forget answers, and its cost per streamed word."""
    from unlearnd.config import tofu_dir
    from unlearnd.evaluation.output_guard import OutputGuardEvalOptions, run_output_guard_eval

    opts = OutputGuardEvalOptions(
        data=str(data or tofu_dir()),
        split=split,
        out=str(out),
        chat_tokens=chat_tokens,
        meaning=meaning,
        exclude_authors=_author_list(exclude_authors),
    )
    report = run_output_guard_eval(opts)
    typer.echo(f"wrote {out}.json and {out}.md: false blocks {report['false_block_rate']:.4f}")


def _served_target(
    server_url: str,
    admin_key: str | None,
    api_key: str | None,
    served_model: str | None,
    data_dir: Path | None,
    data: Path | None,
    preset: str,
    split: str | None,
    routes: str,
) -> dict:
    """The options every evaluation against a served TOFU target shares (the admin key from the data dir
    where none is given)."""
    from unlearnd.config import data_dir as default_data_dir
    from unlearnd.config import tofu_dir
    from unlearnd.server.auth import read_admin_key

    return {
        "server_url": server_url,
        "admin_key": admin_key or read_admin_key(data_dir or default_data_dir()),
        "api_key": api_key,
        "model": served_model,
        "data": str(data or tofu_dir()),
        "preset": preset,
        "split": split,
        "routes": [r.strip() for r in routes.split(",") if r.strip()],
    }


@app.command("attacks")
def attacks(
    server_url: str = typer.Option(..., help="A running unlearnd serving the TOFU target model."),
    admin_key: str = ADMIN_KEY,
    api_key: str = API_KEY,
    served_model: str = SERVED_MODEL,
    data_dir: Path = typer.Option(None, help="The server's data dir, for its admin_key file (no --admin-key)."),
    data: Path = typer.Option(None, "--data", help="TOFU folder (default: unlearnd.config.tofu_dir())"),
    preset: str = typer.Option("mini", help="Reference preset whose target model the server serves."),
    split: str = typer.Option(None, help="Forget split (default: the preset's)."),
    routes: str = typer.Option("none,refuse,eco,lora", help="Comma list; none = no forget request (unprotected)."),
    only: str = typer.Option(None, help="Comma list of attacks (default: all)."),
    max_new_tokens: int = typer.Option(64),
    concurrency: int = typer.Option(4),
    out: Path = typer.Option(Path("reports/attacks"), "--out", help="Writes OUT.json and OUT.md."),
) -> None:
    """Attack success rate per attack kind and route against a running server: jailbreaks, role-play,
    composite questions, multi-turn and non-user roles, obfuscation, other languages, indirect references,
    in-context relearning, log-prob probing. Probes are sent without the admin key."""
    from unlearnd.evaluation.attacks import ATTACKS, AttackEvalOptions, run_attack_eval

    opts = AttackEvalOptions(
        **_served_target(server_url, admin_key, api_key, served_model, data_dir, data, preset, split, routes),
        attacks=[a.strip() for a in only.split(",") if a.strip()] if only else list(ATTACKS),
        max_new_tokens=max_new_tokens,
        concurrency=concurrency,
        out=str(out),
    )
    report = run_attack_eval(opts)
    typer.echo(f"wrote {out}.json and {out}.md ({len(report['routes'])} routes)")


@app.command("leaks")
def leaks(
    server_url: str = typer.Option(..., help="A running unlearnd serving the TOFU target model."),
    admin_key: str = typer.Option(None, envvar="UNLEARND_ADMIN_KEY", help="Admin key for forget requests."),
    api_key: str = typer.Option(None, envvar="UNLEARND_API_KEY", help="API key for chat calls."),
    served_model: str = typer.Option(None, help="`model` field sent to the server."),
    data_dir: Path = typer.Option(None, help="The server's data dir, for its admin_key file (no --admin-key)."),
    data: Path = typer.Option(None, help="TOFU folder (default: unlearnd.config.tofu_dir())"),
    preset: str = typer.Option("mini", help="Reference preset whose target model the server serves."),
    split: str = typer.Option(None, help="Forget split (default: the preset's)."),
    routes: str = typer.Option("none,refuse,eco,lora", help="Comma list; none = no forget request (unprotected)."),
    control_items: int = typer.Option(4, help="Items per control author."),
    fold: int = typer.Option(
        0, min=0, max=1, help="Requests fit on this fold (0: even positions), probes from the other."
    ),
    max_new_tokens: int = typer.Option(64),
    concurrency: int = typer.Option(4),
    chance: bool = typer.Option(True, help="Send each forget probe's chance twin (a control author's cue)."),
    exclude_authors: str = typer.Option("", help="Comma list of forget authors to leave out (seen in design)."),
    evidence_timeout: float = typer.Option(900.0, help="Seconds to wait for each request's evidence (0: skip)."),
    out: Path = typer.Option(Path("reports/leaks"), "--out", help="Writes OUT.json, OUT.md, OUT.items.jsonl.gz."),
) -> None:
    """What leaks when a forgotten author is described instead of named: probes from facts no request saw
    (descriptions, titles, initials, other scripts, misspellings, composite, JSON, completion, multi-turn),
    leaks per route as a share of the unprotected target's, with controls that must stay untouched."""
    from unlearnd.evaluation.leaks import LeakEvalOptions, run_leak_eval

    opts = LeakEvalOptions(
        **_served_target(server_url, admin_key, api_key, served_model, data_dir, data, preset, split, routes),
        control_items=control_items,
        fold=fold,
        max_new_tokens=max_new_tokens,
        concurrency=concurrency,
        chance=chance,
        evidence_timeout_s=evidence_timeout,
        exclude_authors=_author_list(exclude_authors),
        out=str(out),
    )
    report = run_leak_eval(opts)
    typer.echo(f"wrote {out}.json, {out}.md and {out}.items.jsonl.gz ({len(report['results']['families'])} families)")


def _author_list(text: str) -> list[int]:
    try:
        return [int(a) for a in text.split(",") if a.strip()]
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated author numbers, got {text!r}") from None


@app.command("leaks-summary")
def leaks_summary(
    base: Path = typer.Argument(..., help="A leak report's path without suffix (reads BASE.json and its records)."),
    data: Path = typer.Option(None, help="TOFU folder (default: unlearnd.config.tofu_dir())"),
) -> None:
    """Recompute a leak report's figures from its committed per-item records with this code (no probe is
    sent; the records stay as they are) and rewrite BASE.json and BASE.md."""
    from unlearnd.evaluation.leaks import resummarise_leaks

    report = resummarise_leaks(str(base), str(data) if data else None)
    typer.echo(f"rewrote {base}.json and {base}.md from the records of commit {report['records_from']['git_commit']}")


@app.command("tofu")
def tofu(
    preset: str = typer.Option("mini"),
    forget_split: str = typer.Option(None, help="Default: the preset's forget split."),
    methods: str = typer.Option(
        "target,retain",
        help="Comma list: target, retain, the finetuning baselines "
        "(grad_ascent, grad_diff, npo, simnpo, idk_dpo, rmu), the served methods ("
        + ", ".join(METHODS)
        + ") and served_target (the server with no request).",
    ),
    server_url: str = typer.Option(
        None, help="Base URL of a running server (for served methods); it must serve the TOFU target model."
    ),
    admin_key: str = ADMIN_KEY,
    api_key: str = API_KEY,
    served_model: str = SERVED_MODEL,
    out: Path = typer.Option(Path("reports"), help="Report folder."),
    name: str = typer.Option(None, help="Report file stem (default tofu_<preset>_<forget_split>)."),
    limit: list[str] = typer.Option(
        None, help="SPLIT=N items (forget, retain, real_authors, world_facts, holdout), repeatable; for smoke runs."
    ),
    max_new_tokens: int = typer.Option(None),
    robustness: bool = typer.Option(True, help="Run the robustness probes."),
    robustness_items: int = typer.Option(20, help="Forget (and retain control) items per robustness probe."),
    relearn_epochs: float = typer.Option(1.0, help="Epochs of the relearning attack over half the forget set."),
    baseline_epochs: float = typer.Option(None, help="Override every baseline's epochs over the forget set."),
    baseline_grid: str = typer.Option(
        None,
        help="A budget grid (mini, cpu, full): each baseline's config per fold is the grid cell a fixed rule picks "
        "on the fold's fit items (see unlearnd/evaluation/baseline_grid.py).",
    ),
    train_missing: bool = typer.Option(True, help="Train missing reference models (else fail)."),
    use_cache: bool = typer.Option(True, help="Reuse cached per-model evaluation records."),
    threads: int = typer.Option(0),
    ref_epochs: float = typer.Option(None, "--ref-epochs", help=EPOCHS_HELP),
    ref_lr: float = typer.Option(None, "--ref-lr", help=LR_HELP),
    retain_authors: int = typer.Option(None, help=AUTHORS_HELP),
    request_option: list[str] = typer.Option(
        None,
        help="METHOD:KEY=VALUE option of a served method's forget request (e.g. soft_prompt:steps=80), repeatable.",
    ),
    folds: int = typer.Option(2, min=2, help="Cross-fitting folds: each method is fit on one, measured on the next."),
    seeds: str = typer.Option(
        "0",
        help="Comma list of seeds for the methods that train with one (baselines, "
        "eco, soft_prompt, lora); each extra seed is its own row, method@seedK.",
    ),
    bootstrap: int = typer.Option(1000, min=0, help="Bootstrap resamples for the 95% intervals (0: none)."),
    concurrency: int = typer.Option(8, min=1, help="Requests in flight to the server for served methods."),
    score_route_from: str = typer.Option(
        "prompt",
        help="What routes a served method's scored items: prompt (the question alone, what a user sends) or "
        "prompt+continuation (the gold answer too, as the public score endpoint does).",
    ),
    allow_dirty: bool = typer.Option(
        False, help="Run from a tree with uncommitted changes (the report is marked); refused otherwise."
    ),
) -> None:
    """Evaluate methods on TOFU, each fit on one fold and measured on held-out items; write JSON +
    markdown + PNG plots under --out."""
    from unlearnd.evaluation.tofu import TofuEvalConfig, evaluate_and_report, methods_list
    from unlearnd.train.baselines import BASELINES

    set_threads(threads)
    from unlearnd.evaluation.baseline_grid import GRIDS

    if baseline_grid is not None and baseline_grid not in GRIDS:
        raise typer.BadParameter(f"one of {sorted(GRIDS)}", param_hint="--baseline-grid")
    if baseline_grid is not None and baseline_epochs is not None:
        raise typer.BadParameter("the grid sets the epochs; drop --baseline-epochs", param_hint="--baseline-grid")
    if score_route_from not in ("prompt", "prompt+continuation"):
        raise typer.BadParameter("prompt or prompt+continuation", param_hint="--score-route-from")
    try:
        seed_list = [int(x) for x in seeds.split(",") if x.strip()] or [0]
    except ValueError:
        raise typer.BadParameter(f"--seeds is a comma list of integers, got {seeds!r}") from None
    p = reference_preset(preset, forget_split, ref_epochs, ref_lr, retain_authors)
    request_options: dict[str, dict] = {}
    for item in request_option or []:
        method, sep, pair = item.partition(":")
        if not sep or not method.strip():
            raise typer.BadParameter(f"--request-option is METHOD:KEY=VALUE, got {item!r}")
        request_options.setdefault(method.strip(), {}).update(parse_options([pair]))
    cfg = TofuEvalConfig(
        preset=preset,
        forget_split=p.forget_split,
        methods=methods_list(methods),
        request_options=request_options,
        server_url=server_url,
        admin_key=admin_key,
        api_key=api_key,
        served_model=served_model,
        max_new_tokens=max_new_tokens,
        limits=parse_limits(limit),
        robustness=robustness,
        robustness_items=robustness_items,
        relearn_epochs=relearn_epochs,
        use_cache=use_cache,
        baseline_overrides={m: {"epochs": baseline_epochs} for m in BASELINES} if baseline_epochs is not None else {},
        baseline_grid=baseline_grid,
        n_folds=folds,
        seeds=seed_list,
        bootstrap=bootstrap,
        served_concurrency=concurrency,
        score_route_from=score_route_from,
    )
    results, paths = evaluate_and_report(  # a dirty tree: DirtyTreeError, printed by `unlearnd`'s main
        cfg,
        p,
        out,
        name or f"tofu_{preset}_{p.forget_split}",
        train_missing_references=train_missing,
        allow_dirty=allow_dirty or None,  # without the flag: UNLEARND_ALLOW_DIRTY
    )
    echo_json({k: str(v) for k, v in paths.items()})
    failed = [m for m, e in results["methods"].items() if "error" in e]
    if failed:
        typer.echo(f"methods failed: {failed} (see the report)", err=True)
        raise typer.Exit(1)


@app.command("merge")
def merge(
    runs: list[Path] = typer.Argument(..., help="Result JSON files of `eval tofu` runs (same preset/splits)."),
    out: Path = typer.Option(Path("reports")),
    name: str = typer.Option(..., help="Report file stem."),
    note: list[str] = typer.Option(None, help="A line for the report's notes, repeatable."),
    rename: list[str] = typer.Option(
        None,
        help="N:OLD=NEW renames method OLD of the N-th run (1-based), e.g. "
        "to keep two runs of one method side by side; repeatable.",
    ),
    allow_dirty: bool = typer.Option(
        False, help="Merge from a tree with uncommitted changes (the report is marked); refused otherwise."
    ),
) -> None:
    """One report from several `eval tofu` runs (e.g. baselines and served methods run side by side).
    Runs measured with different metric code are refused; notes enter only through --note."""
    from unlearnd.evaluation.report import merge_results, run_stamp, write_report

    stamp = run_stamp(allow_dirty=allow_dirty or None)  # without the flag: UNLEARND_ALLOW_DIRTY

    renames: dict[int, dict[str, str]] = {}
    for spec in rename or []:
        index, sep, pair = spec.partition(":")
        old, eq, new = pair.partition("=")
        if not (sep and eq and index.isdigit() and 1 <= int(index) <= len(runs) and old and new):
            raise typer.BadParameter(f"--rename {spec!r}: expected N:OLD=NEW with 1 <= N <= {len(runs)}")
        renames.setdefault(int(index) - 1, {})[old] = new
    try:
        merged = merge_results(
            [json.loads(Path(r).read_text()) for r in runs], renames=[renames.get(i, {}) for i in range(len(runs))]
        )
    except (OSError, ValueError) as exc:
        raise typer.BadParameter(str(exc)) from None
    paths = write_report(merged, out, name, stamp, notes=list(note or []))
    echo_json({k: str(v) for k, v in paths.items()})


@app.command("continual")
def continual(
    server_url: str = typer.Option(..., help="Base URL of a running server serving the TOFU target model."),
    method: str = typer.Option("lora", help="Method of every request: " + ", ".join(METHODS) + "."),
    groups: str = typer.Option(
        "198/199/0",
        help="Author groups in request order: ids joined by ',' within a "
        "group and '/' between groups (mini target: 198,199 = forget01, 0-5 = retain).",
    ),
    untouched: str = typer.Option(
        None, help="Untouched author ids (default: the preset's retain authors that no group names)."
    ),
    preset: str = typer.Option("mini"),
    forget_split: str = typer.Option(None, help="Default: the preset's forget split."),
    items_per_group: int = typer.Option(10),
    untouched_items: int = typer.Option(20),
    max_new_tokens: int = typer.Option(48),
    option: list[str] = typer.Option(None, help="Request option KEY=VALUE (e.g. preset=cpu), repeatable."),
    admin_key: str = ADMIN_KEY,
    api_key: str = API_KEY,
    served_model: str = SERVED_MODEL,
    out: Path = typer.Option(Path("reports")),
    name: str = typer.Option(None, help="Report file stem (default continual_<method>)."),
) -> None:
    """Register TOFU author groups one after another; after each, measure every group and untouched authors."""
    from unlearnd.data.tofu import TofuData
    from unlearnd.evaluation.continual import ContinualConfig, run_and_report
    from unlearnd.evaluation.model_under_test import ServedModelUnderTest
    from unlearnd.train.reference import reference_data

    try:
        group_ids = [[int(a) for a in g.split(",") if a.strip()] for g in groups.split("/") if g.strip()]
        untouched_ids = [int(a) for a in untouched.split(",")] if untouched else None
    except ValueError as exc:
        raise typer.BadParameter(f"author ids must be integers: {exc}") from None
    data = TofuData()
    if untouched_ids is None:
        requested = {a for g in group_ids for a in g}
        p = reference_preset(preset, forget_split, None, None, None)
        untouched_ids = [a for a in reference_data(p, data).retain_authors if a not in requested]
    cfg = ContinualConfig(
        method=method,
        groups=group_ids,
        untouched_authors=untouched_ids,
        items_per_group=items_per_group,
        untouched_items=untouched_items,
        max_new_tokens=max_new_tokens,
        options=parse_options(option),
    )
    served = ServedModelUnderTest(
        server_url, name=f"continual-{method}", api_key=api_key, admin_key=admin_key, model=served_model
    )
    try:
        paths = run_and_report(cfg, served, out, name or f"continual_{method}", data)
    finally:
        served.close()
    echo_json({k: str(v) for k, v in paths.items()})
