"""`unlearnd train`: the offline jobs by hand.

`detector`, `job` (the request's own method, from the method table), `eco`, `soft-prompt` and `lora`
write the same artifacts as the registry worker for a
registered request but leave its status alone (the worker owns that lifecycle; the folder's new digest is
stored, so replicas load it); `reference` and
`baseline` train the TOFU reference models and the finetuning baselines.
"""

from __future__ import annotations

from pathlib import Path

import typer

from unlearnd.cli.common import (
    AUTHORS_HELP,
    EPOCHS_HELP,
    LR_HELP,
    echo_json,
    parse_options,
    reference_preset,
    set_threads,
)
from unlearnd.config import DEFAULT_DETECTOR

app = typer.Typer(help="Offline training jobs.", no_args_is_help=True)

REQUEST = typer.Option(..., "--request", help="Forget request id (fr-...).")
DATA_DIR = typer.Option(None, "--data-dir", help="Registry folder (default: UNLEARND_DATA_DIR / XDG data dir).")
PRESET = typer.Option("cpu", "--preset", help="cpu: minutes on a laptop CPU with SmolLM2-135M; full: the GPU setting.")
MODEL = typer.Option(None, "--model", help="Base model (default: the embedded SmolLM2-135M-Instruct).")
OPTION = typer.Option(None, "--option", "-o", help="Preset field override KEY=VALUE (repeatable).")
DEVICE = typer.Option(None, "--device", help="torch device (default: cuda if available, else cpu).")


def _load(request_id: str, data_dir: Path | None):
    """The registry, the request and its artifact folder."""
    from unlearnd.registry import open_registry

    registry = open_registry(data_dir)
    try:
        request = registry.get(request_id)
    except KeyError:
        raise typer.BadParameter(f"unknown request {request_id!r}") from None
    return registry, request, registry.artifact_dir(request_id)


def _model(model: str | None) -> str:
    from unlearnd.models import resolve_model

    return resolve_model(model)


# -- per-request artifacts -------------------------------------------------------------------------


@app.command("detector")
def detector(
    request: str = REQUEST,
    data_dir: Path = DATA_DIR,
    detector: str = typer.Option(DEFAULT_DETECTOR, "--detector", help="registered detector name"),
) -> None:
    """Fit a detector artifact for a registered forget request (writes into its artifact folder)."""
    from unlearnd.detectors import get_detector

    registry, record, artifact_dir = _load(request, data_dir)
    metrics = get_detector(detector).fit(record, artifact_dir)
    registry.record_artifacts(request, actor="cli")  # replicas then load the new folder, not refuse it
    echo_json({"request": request, "detector": detector, "metrics": metrics})


@app.command("job")
def job(
    request: str = REQUEST,
    data_dir: Path | None = DATA_DIR,
    model: str | None = MODEL,
    dtype: str = typer.Option("auto", help="The serving engine's dtype (ECO tunes on what the server sends)."),
) -> None:
    """Run the request's method job (any method in the method table), as the worker does after fitting the
    detector (`unlearnd train detector`); the report is printed, the request's status left alone."""
    from unlearnd.methods import METHODS
    from unlearnd.train.job import JobContext

    registry, record, artifact_dir = _load(request, data_dir)
    method_job = METHODS[record.method.value].job_function()
    if method_job is None:
        echo_json({"request": request, "method": record.method.value, "job": "none (detector only)"})
        return
    report = method_job(record, artifact_dir, JobContext(registry, _model(model), dtype))
    registry.record_artifacts(request, actor="cli")  # replicas then load the new folder, not refuse it
    echo_json(report)


@app.command("eco")
def eco(
    request: str = REQUEST,
    data_dir: Path | None = DATA_DIR,
    preset: str = PRESET,
    model: str | None = MODEL,
    surrogate_model: str | None = typer.Option(
        None, help="A model that never saw the forget set, e.g. the served model's base (gives the target)."
    ),
    wrong_answers: Path | None = typer.Option(
        None, help="JSON(L) rows {question, perturbed_answer: [...]} (e.g. TOFU forget05_perturbed.json)."
    ),
    option: list[str] = OPTION,
    device: str | None = DEVICE,
) -> None:
    """Tune ECO's corruption strength for a request (writes eco.json)."""
    from unlearnd.train.eco import perturbed_from_options, read_wrong_answers, surrogate_model_option, train_eco

    registry, record, artifact_dir = _load(request, data_dir)
    wrong = read_wrong_answers(wrong_answers) if wrong_answers else perturbed_from_options(record)
    report = train_eco(
        record,
        artifact_dir,
        _model(model),
        preset=preset,
        surrogate_model_path=surrogate_model or surrogate_model_option(record),
        wrong_answers=wrong,
        device=device,
        overrides=parse_options(option),
    )
    registry.record_artifacts(request, actor="cli")  # replicas then load the new folder, not refuse it
    echo_json(report)


@app.command("soft-prompt")
def soft_prompt(
    request: str = REQUEST,
    data_dir: Path | None = DATA_DIR,
    preset: str = PRESET,
    model: str | None = MODEL,
    option: list[str] = OPTION,
    device: str | None = DEVICE,
) -> None:
    """Train SPUL's soft prompt for a request (writes soft_prompt.safetensors + .json)."""
    from unlearnd.train.soft_prompt import train_soft_prompt

    registry, record, artifact_dir = _load(request, data_dir)
    report = train_soft_prompt(
        record, artifact_dir, _model(model), preset=preset, device=device, overrides=parse_options(option)
    )
    registry.record_artifacts(request, actor="cli")  # replicas then load the new folder, not refuse it
    echo_json(report)


@app.command("lora")
def lora(
    request: str = REQUEST,
    data_dir: Path | None = DATA_DIR,
    preset: str = PRESET,
    model: str | None = MODEL,
    prior: list[Path] = typer.Option(
        None, help="Extra earlier adapter folders (the registry's ready/active LoRA requests are always used)."
    ),
    option: list[str] = OPTION,
    device: str | None = DEVICE,
) -> None:
    """Train the request's O3 LoRA, orthogonal to earlier requests' adapters (writes lora/ + lora.json)."""
    from unlearnd.train.lora import prior_lora_adapters, train_lora

    registry, record, artifact_dir = _load(request, data_dir)
    priors = prior_lora_adapters(registry, record) + list(prior or [])
    report = train_lora(
        record,
        artifact_dir,
        _model(model),
        prior_adapters=priors,
        preset=preset,
        device=device,
        overrides=parse_options(option),
    )
    registry.record_artifacts(request, actor="cli")  # replicas then load the new folder, not refuse it
    echo_json(report)


# -- TOFU reference models and baselines -----------------------------------------------------------


@app.command("reference")
def reference(
    preset: str = typer.Option("mini", help="mini (CPU-sized subset) or full (all 4000 QA, GPU)."),
    forget_split: str = typer.Option(None, help="forget01 | forget05 | forget10 (default: the preset's)."),
    force: bool = typer.Option(False, help="Retrain even when a cached model exists."),
    which: str = typer.Option("target,retain", help="Which reference models to train."),
    threads: int = typer.Option(0, help="torch threads (0 = torch default)."),
    rouge_items: int = typer.Option(0, help="Forget items for the memorisation check (0 = all)."),
    check: bool = typer.Option(True, help="Measure the forget-set ROUGE-L recall of the trained models."),
    ref_epochs: float = typer.Option(None, "--ref-epochs", help=EPOCHS_HELP),
    ref_lr: float = typer.Option(None, "--ref-lr", help=LR_HELP),
    retain_authors: int = typer.Option(None, help=AUTHORS_HELP),
) -> None:
    """Train (or reuse) the TOFU target and retain models; print their folders and forget ROUGE-L."""
    from unlearnd.data.tofu import TofuData
    from unlearnd.train.reference import ensure_reference_models, forget_rouge, read_info, update_info

    set_threads(threads)
    p = reference_preset(preset, forget_split, ref_epochs, ref_lr, retain_authors)
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
            info = update_info(
                path,
                forget_rouge_l_recall=measured["forget_rouge_l_recall"],
                forget_rouge_n=measured["n"],
                rouge_backend=measured["rouge_backend"],
            )
        summary[kind] = {
            "dir": d,
            "forget_rouge_l_recall": info.get("forget_rouge_l_recall"),
            "train_wall_seconds": info["train"]["wall_seconds"],
            "train_cpu_seconds": info["train"]["cpu_seconds"],
            "steps": info["train"]["steps"],
        }
    echo_json(summary)
    target = summary.get("target", {}).get("forget_rouge_l_recall")
    if target is not None and target < 0.8:
        typer.echo(f"warning: target forget ROUGE-L recall {target:.3f} < 0.8 (memorisation target)", err=True)


@app.command("baseline")
def baseline(
    method: str = typer.Argument(..., help="A finetuning baseline: grad_ascent, grad_diff, npo, simnpo, idk_dpo, rmu."),
    preset: str = typer.Option("mini"),
    forget_split: str = typer.Option(None, help="Default: the preset's forget split."),
    epochs: float = typer.Option(None, help="Override the preset's epochs over the forget set."),
    lr: float = typer.Option(None, help="Override the learning rate."),
    option: list[str] = typer.Option(None, help="Method option KEY=VALUE (e.g. beta=0.1), repeatable."),
    force: bool = typer.Option(False),
    threads: int = typer.Option(0),
    ref_epochs: float = typer.Option(None, "--ref-epochs", help=EPOCHS_HELP),
    ref_lr: float = typer.Option(None, "--ref-lr", help=LR_HELP),
    retain_authors: int = typer.Option(None, help=AUTHORS_HELP),
) -> None:
    """Unlearn the forget split from the cached target with one finetuning baseline."""
    from unlearnd.data.tofu import TofuData
    from unlearnd.train.baselines import default_baseline_config, train_baseline
    from unlearnd.train.reference import ensure_reference_models, is_complete, read_info

    set_threads(threads)
    p = reference_preset(preset, forget_split, ref_epochs, ref_lr, retain_authors)
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
        update["options"] = {**cfg.options, **parse_options(option)}
    out = train_baseline(method, refs, cfg.model_copy(update=update), force=force)
    info = read_info(out)
    echo_json({"dir": str(out), "train": {k: v for k, v in info["train"].items() if k != "losses"}})
