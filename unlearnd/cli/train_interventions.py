"""`unlearnd train eco | soft-prompt | lora --request ID`: run one intervention's offline job by hand.

The commands write the same artifacts as the registry worker but leave the request's status
alone (the worker owns that lifecycle); they print the job's summary as JSON.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import typer

PRESET_HELP = "cpu: minutes on a laptop CPU with SmolLM2-135M; full: the GPU setting."


def _parse_options(pairs: list[str]) -> dict:
    """KEY=VALUE pairs; values parsed as JSON when they are JSON (numbers, lists), else strings."""
    out = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise typer.BadParameter(f"expected KEY=VALUE, got {pair!r}")
        key, value = pair.split("=", 1)
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _load(request_id: str, data_dir: Path | None):
    from unlearnd.config import data_dir as default_data_dir
    from unlearnd.registry import Registry

    registry = Registry(data_dir or default_data_dir())
    try:
        request = registry.get(request_id)
    except KeyError:
        raise typer.BadParameter(f"unknown request {request_id!r}") from None
    return registry, request, registry.artifact_dir(request_id)


def _model(model: str | None) -> str:
    from unlearnd.models import resolve_model

    return resolve_model(model)


def _echo(summary: dict) -> None:
    typer.echo(json.dumps(summary, indent=1, default=str))


REQUEST = typer.Option(..., "--request", help="Forget request id (fr-...).")
DATA_DIR = typer.Option(None, "--data-dir", help="Registry folder (default: UNLEARND_DATA_DIR / XDG data dir).")
PRESET = typer.Option("cpu", "--preset", help=PRESET_HELP)
MODEL = typer.Option(None, "--model", help="Base model (default: the embedded SmolLM2-135M-Instruct).")
OPTION = typer.Option(None, "--option", "-o", help="Preset field override KEY=VALUE (repeatable).")
DEVICE = typer.Option(None, "--device", help="torch device (default: cuda if available, else cpu).")
RETAIN_MODEL = typer.Option(None, help="A model that never saw the forget set (gives the target).")
WRONG_ANSWERS = typer.Option(
    None, help="JSON(L) rows {question, perturbed_answer: [...]} (e.g. TOFU forget05_perturbed.json).")
PRIOR = typer.Option(None, help="Extra earlier adapter folders (the registry's ready/active LoRA requests are always used).")


def register(train_app: typer.Typer) -> None:
    """Attach `eco`, `soft-prompt` and `lora` to the `train` command group."""

    @train_app.command("eco")
    def train_eco_cmd(
        request: str = REQUEST,
        data_dir: Path | None = DATA_DIR,
        preset: str = PRESET,
        model: str | None = MODEL,
        retain_model: str | None = RETAIN_MODEL,
        wrong_answers: Path | None = WRONG_ANSWERS,
        option: list[str] = OPTION,
        device: str | None = DEVICE,
    ) -> None:
        """Tune ECO's corruption strength for a request (writes eco.json)."""
        from unlearnd.train.eco import train_eco
        from unlearnd.train.jobs_tmp import perturbed_from_options, read_wrong_answers

        logging.basicConfig(level=logging.INFO)
        _, record, artifact_dir = _load(request, data_dir)
        wrong = read_wrong_answers(wrong_answers) if wrong_answers else perturbed_from_options(record)
        _echo(train_eco(record, artifact_dir, _model(model), preset=preset,
                        retain_model_path=retain_model or record.spec.options.get("retain_model"),
                        wrong_answers=wrong, device=device, overrides=_parse_options(option)))

    @train_app.command("soft-prompt")
    def train_soft_prompt_cmd(
        request: str = REQUEST,
        data_dir: Path | None = DATA_DIR,
        preset: str = PRESET,
        model: str | None = MODEL,
        option: list[str] = OPTION,
        device: str | None = DEVICE,
    ) -> None:
        """Train SPUL's soft prompt for a request (writes soft_prompt.safetensors + .json)."""
        from unlearnd.train.soft_prompt import train_soft_prompt

        logging.basicConfig(level=logging.INFO)
        _, record, artifact_dir = _load(request, data_dir)
        _echo(train_soft_prompt(record, artifact_dir, _model(model), preset=preset, device=device,
                                overrides=_parse_options(option)))

    @train_app.command("lora")
    def train_lora_cmd(
        request: str = REQUEST,
        data_dir: Path | None = DATA_DIR,
        preset: str = PRESET,
        model: str | None = MODEL,
        prior: list[Path] = PRIOR,
        option: list[str] = OPTION,
        device: str | None = DEVICE,
    ) -> None:
        """Train the request's O3 LoRA, orthogonal to earlier requests' adapters (writes lora/ + lora.json)."""
        from unlearnd.train.lora import prior_lora_adapters, train_lora

        logging.basicConfig(level=logging.INFO)
        registry, record, artifact_dir = _load(request, data_dir)
        priors = prior_lora_adapters(registry, record) + list(prior or [])
        _echo(train_lora(record, artifact_dir, _model(model), prior_adapters=priors, preset=preset, device=device,
                         overrides=_parse_options(option)))
