"""CLI commands of the offline package (`unlearnd train reference`, `unlearnd train baseline`, `unlearnd eval tofu`)."""

from __future__ import annotations

import json
import logging
import os
import shlex
import sys
from pathlib import Path

import typer

log = logging.getLogger(__name__)


def _command_line() -> str:
    return "unlearnd " + shlex.join(sys.argv[1:])


def _threads(n: int | None) -> None:
    if n:
        import torch

        torch.set_num_threads(n)


def _parse_limits(limits: list[str] | None) -> dict[str, int | None]:
    out: dict[str, int | None] = {}
    for item in limits or []:
        split, _, value = item.partition("=")
        if not value:
            raise typer.BadParameter(f"--limit wants SPLIT=N, got {item!r}")
        out[split.strip()] = None if value.strip().lower() in ("all", "none") else int(value)
    return out


def _parse_options(items: list[str] | None) -> dict:
    """KEY=VALUE options; values that look like JSON (numbers, lists, true/false/null) are parsed as JSON."""
    out: dict = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise typer.BadParameter(f"options are KEY=VALUE, got {item!r}")
        out[key.strip()] = json.loads(value) if value[:1] in "-0123456789[{tfn" else value
    return out


def _preset(name: str, forget_split: str, epochs: float | None, lr: float | None, retain_authors: int | None):
    """The reference preset with CLI overrides (train and eval must agree to find the same cached models)."""
    from unlearnd.train.reference import preset as make_preset

    overrides: dict = {}
    if epochs is not None:
        overrides["epochs"] = epochs
    if lr is not None:
        overrides["learning_rate"] = lr
    if retain_authors is not None:
        overrides["n_retain_authors"] = retain_authors
    return make_preset(name, forget_split, **overrides)


_EPOCHS_HELP = "Override the preset's reference epochs (pass the same to `eval tofu`)."
_LR_HELP = "Override the preset's reference learning rate (pass the same to `eval tofu`)."
_AUTHORS_HELP = "Override the number of retain authors (mini; pass the same to `eval tofu`)."


def register(train_app: typer.Typer, eval_app: typer.Typer, bench_app: typer.Typer) -> None:
    """Attach this package's commands to the `train`, `eval` and `bench` command groups."""

    @train_app.command("reference")
    def train_reference(
        preset: str = typer.Option("mini", help="mini (CPU-sized subset) or full (all 4000 QA, GPU)."),
        forget_split: str = typer.Option(None, help="forget01 | forget05 | forget10 (default: the preset's)."),
        force: bool = typer.Option(False, help="Retrain even when a cached model exists."),
        which: str = typer.Option("target,retain", help="Which reference models to train."),
        threads: int = typer.Option(0, help="torch threads (0 = torch default)."),
        rouge_items: int = typer.Option(0, help="Forget items for the memorisation check (0 = all)."),
        check: bool = typer.Option(True, help="Measure the forget-set ROUGE-L recall of the trained models."),
        ref_epochs: float = typer.Option(None, "--ref-epochs", help=_EPOCHS_HELP),
        ref_lr: float = typer.Option(None, "--ref-lr", help=_LR_HELP),
        retain_authors: int = typer.Option(None, help=_AUTHORS_HELP),
    ) -> None:
        """Train (or reuse) the TOFU target and retain models; print their folders and forget ROUGE-L."""
        from unlearnd.train.data import TofuData
        from unlearnd.train.reference import (
            ensure_reference_models,
            forget_rouge,
            read_info,
            update_info,
        )

        _threads(threads)
        p = _preset(preset, forget_split, ref_epochs, ref_lr, retain_authors)
        tofu = TofuData()
        kinds = tuple(k.strip() for k in which.split(",") if k.strip())
        refs = ensure_reference_models(p, force=force, tofu=tofu, which=kinds)
        summary = {}
        for kind, d in (("target", refs.target_dir), ("retain", refs.retain_dir)):
            if kind not in kinds:
                continue
            path = Path(d)
            info = read_info(path)
            if check and ("forget_rouge_l_recall" not in info or force):
                measured = forget_rouge(path, tofu.split(p.forget_split), p.max_new_tokens, rouge_items or None)
                info = update_info(path, forget_rouge_l_recall=measured["forget_rouge_l_recall"],
                                   forget_rouge_n=measured["n"], rouge_backend=measured["rouge_backend"])
            summary[kind] = {"dir": d, "forget_rouge_l_recall": info.get("forget_rouge_l_recall"),
                             "train_wall_seconds": info["train"]["wall_seconds"],
                             "train_cpu_seconds": info["train"]["cpu_seconds"], "steps": info["train"]["steps"]}
        typer.echo(json.dumps(summary, indent=1))
        target = summary.get("target", {}).get("forget_rouge_l_recall")
        if target is not None and target < 0.8:
            typer.echo(f"warning: target forget ROUGE-L recall {target:.3f} < 0.8 (memorisation target)", err=True)

    @train_app.command("baseline")
    def train_baseline_cmd(
        method: str = typer.Argument(..., help="grad_ascent | grad_diff | npo | simnpo | idk_dpo | rmu"),
        preset: str = typer.Option("mini"),
        forget_split: str = typer.Option(None, help="Default: the preset's forget split."),
        epochs: float = typer.Option(None, help="Override the preset's epochs over the forget set."),
        lr: float = typer.Option(None, help="Override the learning rate."),
        option: list[str] = typer.Option(None, help="Method option KEY=VALUE (e.g. beta=0.1), repeatable."),
        force: bool = typer.Option(False),
        threads: int = typer.Option(0),
        ref_epochs: float = typer.Option(None, "--ref-epochs", help=_EPOCHS_HELP),
        ref_lr: float = typer.Option(None, "--ref-lr", help=_LR_HELP),
        retain_authors: int = typer.Option(None, help=_AUTHORS_HELP),
    ) -> None:
        """Unlearn the forget split from the cached target with one finetuning baseline."""
        from unlearnd.train.data import TofuData
        from unlearnd.evaluation.tofu import train_baseline
        from unlearnd.train.baselines import default_baseline_config
        from unlearnd.train.reference import (
            ensure_reference_models,
            is_complete,
            read_info,
        )

        _threads(threads)
        p = _preset(preset, forget_split, ref_epochs, ref_lr, retain_authors)
        refs = ensure_reference_models(p, tofu=TofuData(), which=())
        if not is_complete(Path(refs.target_dir)):
            raise typer.BadParameter(f"no target model: run `unlearnd train reference --preset {preset}` first")
        cfg = default_baseline_config(method, preset)
        update: dict = {}
        if epochs is not None:
            update["epochs"] = epochs
        if lr is not None:
            update["learning_rate"] = lr
        if option:
            update["options"] = {**cfg.options, **_parse_options(option)}
        cfg = cfg.model_copy(update=update)
        out = train_baseline(method, refs, cfg, force=force)
        info = read_info(out)
        typer.echo(json.dumps({"dir": str(out), "train": {k: v for k, v in info["train"].items() if k != "losses"}},
                              indent=1))

    @eval_app.command("tofu")
    def eval_tofu(
        preset: str = typer.Option("mini"),
        forget_split: str = typer.Option(None, help="Default: the preset's forget split."),
        methods: str = typer.Option("target,retain", help="Comma list: target, retain, grad_ascent, grad_diff, "
                                    "npo, simnpo, idk_dpo, rmu, and served: refuse, prompt, eco, soft_prompt, lora, "
                                    "served_target."),
        server_url: str = typer.Option(None, help="Base URL of a running server (for served methods); it must "
                                       "serve the TOFU target model."),
        admin_key: str = typer.Option(None, envvar="UNLEARND_ADMIN_KEY", help="Admin key for forget requests."),
        api_key: str = typer.Option(None, envvar="UNLEARND_API_KEY", help="API key for chat/score calls."),
        served_model: str = typer.Option(None, help="`model` field sent to the server."),
        out: Path = typer.Option(Path("reports"), help="Report folder."),
        name: str = typer.Option(None, help="Report file stem (default tofu_<preset>_<forget_split>)."),
        limit: list[str] = typer.Option(None, help="SPLIT=N items (forget, retain, real_authors, world_facts, "
                                        "holdout), repeatable; for smoke runs."),
        max_new_tokens: int = typer.Option(None),
        robustness: bool = typer.Option(True, help="Run the robustness probes."),
        robustness_items: int = typer.Option(20, help="Forget (and retain control) items per robustness probe."),
        relearn_epochs: float = typer.Option(1.0, help="Epochs of the relearning attack over half the forget set."),
        baseline_epochs: float = typer.Option(None, help="Override every baseline's epochs over the forget set."),
        train_missing: bool = typer.Option(True, help="Train missing reference models (else fail)."),
        use_cache: bool = typer.Option(True, help="Reuse cached per-model evaluation records."),
        threads: int = typer.Option(0),
        ref_epochs: float = typer.Option(None, "--ref-epochs", help=_EPOCHS_HELP),
        ref_lr: float = typer.Option(None, "--ref-lr", help=_LR_HELP),
        retain_authors: int = typer.Option(None, help=_AUTHORS_HELP),
        request_option: list[str] = typer.Option(None, help="METHOD:KEY=VALUE option of a served method's forget "
                                                 "request (e.g. soft_prompt:steps=80), repeatable."),
    ) -> None:
        """Evaluate methods on TOFU; write JSON + markdown + PNG plots under --out."""
        from unlearnd.evaluation.tofu import (
            TofuEvalConfig,
            methods_list,
            run_tofu_eval,
        )
        from unlearnd.train.baselines import BASELINES
        from unlearnd.evaluation.report import PARTIAL_NOTE, git_commit, write_report

        commit = git_commit()  # the code that runs is the code at the start, whatever is committed meanwhile
        _threads(threads)
        p = _preset(preset, forget_split, ref_epochs, ref_lr, retain_authors)
        request_options: dict[str, dict] = {}
        for item in request_option or []:
            method, sep, pair = item.partition(":")
            if not sep or not method.strip():
                raise typer.BadParameter(f"--request-option is METHOD:KEY=VALUE, got {item!r}")
            request_options.setdefault(method.strip(), {}).update(_parse_options([pair]))
        cfg = TofuEvalConfig(preset=preset, forget_split=p.forget_split, methods=methods_list(methods),
                             request_options=request_options,
                             server_url=server_url, admin_key=admin_key or os.environ.get("UNLEARND_ADMIN_KEY"),
                             api_key=api_key, served_model=served_model, max_new_tokens=max_new_tokens,
                             limits=_parse_limits(limit), robustness=robustness,
                             robustness_items=robustness_items, relearn_epochs=relearn_epochs, use_cache=use_cache,
                             baseline_overrides={m: {"epochs": baseline_epochs} for m in BASELINES}
                             if baseline_epochs is not None else {})
        stem = name or f"tofu_{preset}_{p.forget_split}"

        def partial(results: dict) -> None:
            done = len(results["methods"])
            write_report({**results, "git_commit": commit}, out, stem, _command_line(), notes=[
                f"{PARTIAL_NOTE} {done} of {len(cfg.methods)} methods done; the run is still going or was cut short."])

        results = run_tofu_eval(cfg, reference_preset=p, train_missing_references=train_missing,
                                on_method_done=partial)
        paths = write_report({**results, "git_commit": commit}, out, stem, _command_line())
        typer.echo(json.dumps({k: str(v) for k, v in paths.items()}, indent=1))
        failed = [m for m, e in results["methods"].items() if "error" in e]
        if failed:
            typer.echo(f"methods failed: {failed} (see the report)", err=True)
            raise typer.Exit(1)

    @eval_app.command("merge")
    def eval_merge(
        runs: list[Path] = typer.Argument(..., help="Result JSON files of `eval tofu` runs (same preset/splits)."),
        out: Path = typer.Option(Path("reports")),
        name: str = typer.Option(..., help="Report file stem."),
        note: list[str] = typer.Option(None, help="A line for the report's notes, repeatable."),
        rename: list[str] = typer.Option(None, help="N:OLD=NEW renames method OLD of the N-th run (1-based), e.g. "
                                         "to keep two runs of one method side by side; repeatable."),
    ) -> None:
        """One report from several `eval tofu` runs (e.g. baselines and served methods run side by side)."""
        from unlearnd.evaluation.report import merge_results, write_report

        renames: dict[int, dict[str, str]] = {}
        for spec in rename or []:
            index, sep, pair = spec.partition(":")
            old, eq, new = pair.partition("=")
            if not (sep and eq and index.isdigit() and 1 <= int(index) <= len(runs) and old and new):
                raise typer.BadParameter(f"--rename {spec!r}: expected N:OLD=NEW with 1 <= N <= {len(runs)}")
            renames.setdefault(int(index) - 1, {})[old] = new
        try:
            merged = merge_results([json.loads(Path(r).read_text()) for r in runs],
                                   renames=[renames.get(i, {}) for i in range(len(runs))])
        except (OSError, ValueError) as exc:
            raise typer.BadParameter(str(exc)) from None
        paths = write_report(merged, out, name, _command_line(), notes=list(note or []))
        typer.echo(json.dumps({k: str(v) for k, v in paths.items()}, indent=1))

    @eval_app.command("continual")
    def eval_continual(
        server_url: str = typer.Option(..., help="Base URL of a running server serving the TOFU target model."),
        method: str = typer.Option("lora", help="Method of every request (lora, eco, soft_prompt, refuse, prompt)."),
        groups: str = typer.Option("198/199/0", help="Author groups in request order: ids joined by ',' within a "
                                   "group and '/' between groups (mini target: 198,199 = forget01, 0-5 = retain)."),
        untouched: str = typer.Option(None, help="Untouched author ids (default: the preset's retain authors "
                                      "that no group names)."),
        preset: str = typer.Option("mini"),
        forget_split: str = typer.Option(None, help="Default: the preset's forget split."),
        items_per_group: int = typer.Option(10),
        untouched_items: int = typer.Option(20),
        max_new_tokens: int = typer.Option(48),
        option: list[str] = typer.Option(None, help="Request option KEY=VALUE (e.g. preset=cpu), repeatable."),
        admin_key: str = typer.Option(None, envvar="UNLEARND_ADMIN_KEY", help="Admin key for forget requests."),
        api_key: str = typer.Option(None, envvar="UNLEARND_API_KEY"),
        served_model: str = typer.Option(None, help="`model` field sent to the server."),
        out: Path = typer.Option(Path("reports")),
        name: str = typer.Option(None, help="Report file stem (default continual_<method>)."),
    ) -> None:
        """Register TOFU author groups one after another; after each, measure every group and untouched authors."""
        from unlearnd.evaluation.continual import ContinualConfig, run_continual
        from unlearnd.evaluation.continual import markdown as continual_markdown
        from unlearnd.train.data import TofuData
        from unlearnd.evaluation.model_under_test import ServedModelUnderTest
        from unlearnd.train.reference import reference_data
        from unlearnd.evaluation.report import PARTIAL_NOTE, git_commit, machine_description

        try:
            group_ids = [[int(a) for a in g.split(",") if a.strip()] for g in groups.split("/") if g.strip()]
            untouched_ids = [int(a) for a in untouched.split(",")] if untouched else None
        except ValueError as exc:
            raise typer.BadParameter(f"author ids must be integers: {exc}") from None
        tofu = TofuData()
        requested = {a for g in group_ids for a in g}
        if untouched_ids is None:
            p = _preset(preset, forget_split, None, None, None)
            untouched_ids = [a for a in reference_data(p, tofu).retain_authors if a not in requested]
        options = _parse_options(option)
        cfg = ContinualConfig(method=method, groups=group_ids, untouched_authors=untouched_ids,
                              items_per_group=items_per_group, untouched_items=untouched_items,
                              max_new_tokens=max_new_tokens, options=options)
        served = ServedModelUnderTest(server_url, name=f"continual-{method}", api_key=api_key,
                                      admin_key=admin_key or os.environ.get("UNLEARND_ADMIN_KEY"), model=served_model)
        stem = name or f"continual_{method}"
        out.mkdir(parents=True, exist_ok=True)
        commit = git_commit()  # at the start: later commits are not what ran

        def write(results: dict, final: bool) -> None:
            results = {**results, "command": _command_line(), "machine": machine_description(),
                       "git_commit": commit}
            (out / f"{stem}.json").write_text(json.dumps(results, indent=1))
            md = [f"# Continual forget requests: {method}", "", f"Command: `{results['command']}`", "",
                  f"Machine: {results['machine']}; commit {results['git_commit'] or 'n/a'}.", "",
                  *continual_markdown(results)]
            if not final:
                md.append(f"- {PARTIAL_NOTE} {len(results['stages']) - 1} of {len(group_ids)} requests done.")
            (out / f"{stem}.md").write_text("\n".join(md).rstrip() + "\n")

        try:
            write(run_continual(cfg, served, tofu, on_stage=lambda r: write(r, final=False)), final=True)
        finally:
            served.close()
        typer.echo(json.dumps({"json": str(out / f"{stem}.json"), "markdown": str(out / f"{stem}.md")}, indent=1))
