"""CLI commands of the classifiers package (`unlearnd train classifier`, `unlearnd eval classifier`)."""

from __future__ import annotations

import logging
from pathlib import Path

import typer

from unlearnd.config import DEFAULT_DETECTOR

log = logging.getLogger(__name__)


def train_classifier(
    request: str = typer.Option(..., "--request", help="id of a registered forget request"),
    data_dir: Path = typer.Option(None, "--data-dir", help="registry folder (default: unlearnd.config.data_dir())"),
    detector: str = typer.Option(DEFAULT_DETECTOR, "--detector", help="registered detector name"),
) -> None:
    """Fit a detector artifact for a registered forget request (writes into its artifact folder)."""
    import json

    from unlearnd import config
    from unlearnd.detectors import get_detector
    from unlearnd.registry import Registry

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    registry = Registry(data_dir or config.data_dir())
    record = registry.get(request)
    metrics = get_detector(detector).fit(record, Path(record.artifact_dir))
    typer.echo(json.dumps({"request": request, "detector": detector, "metrics": metrics}, indent=1, default=str))


def eval_classifier(
    data: Path = typer.Option(None, "--data", help="TOFU folder (default: unlearnd.config.tofu_dir())"),
    split: str = typer.Option("forget10", "--split"),
    out: Path = typer.Option(Path("reports/classifier"), "--out", help="writes OUT.json and OUT.md"),
    detector: str = typer.Option(DEFAULT_DETECTOR, "--detector"),
    with_retain: bool = typer.Option(False, "--with-retain/--no-retain",
                                     help="give the request the first half of retain90 as retain data"),
    latency_prompts: int = typer.Option(200, "--latency-prompts"),
    robustness_n: int = typer.Option(100, "--robustness-n"),
    limit: int = typer.Option(0, "--limit", help="cap every evaluation set (smoke runs); 0 = all"),
) -> None:
    """Evaluate forget-query detection on TOFU: AUROC, TPR at FPR<=1%, FPR per split, latency,
    scaling with 1/10/100 loaded requests, robustness to typos / wrappers / languages / context."""
    from unlearnd import config
    from unlearnd.evaluation.detector import EvalOptions, run_eval

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    opts = EvalOptions(data=str(data or config.tofu_dir()), split=split, out=str(out), detector=detector,
                       with_retain=with_retain, latency_prompts=latency_prompts, robustness_n=robustness_n,
                       limit=limit)
    report = run_eval(opts)
    typer.echo(f"wrote {out}.json and {out}.md: {report['headline']}")


def register(train_app: typer.Typer, eval_app: typer.Typer) -> None:
    """Attach this package's commands to the `train` and `eval` command groups."""
    train_app.command("classifier")(train_classifier)
    eval_app.command("classifier")(eval_classifier)
