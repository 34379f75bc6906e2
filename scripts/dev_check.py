"""What the dev checks on a committed leak run share: their options, logging, stamp and the run they read."""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from unlearnd.data.tofu import TofuData
from unlearnd.domain import ForgetSpec
from unlearnd.evaluation.continual import request_spec
from unlearnd.evaluation.leaks import LeakContext, leak_context
from unlearnd.evaluation.report import write_records, write_report_files
from unlearnd.provenance import command_line, run_stamp
from unlearnd.train.reference import ensure_reference_models, preset


def start(doc: str, script: str, out: str) -> tuple[argparse.Namespace, dict[str, Any], dict[str, Any]]:
    """Parse the shared options (`--records` a leak report's base path, `--preset`, `--split` (the run's by
    default), `--out`, `--threads`), set up logging and torch's threads; returns the options, the run stamp
    and the leak run."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--records", default="reports/leaks", help="a leak report's base path")
    parser.add_argument("--preset", default="mini")
    parser.add_argument("--split", default=None)
    parser.add_argument("--out", default=out)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    run = json.loads(Path(args.records + ".json").read_text())
    if args.split is None:  # the run's split picks the target: another one would read a different model
        args.split = run.get("split")
    elif run.get("split") not in (None, args.split):
        parser.error(f"--split {args.split} but {args.records} ran on {run['split']}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    stamp = run_stamp(command_line().replace("unlearnd", f"python scripts/{script}", 1))
    torch.set_num_threads(args.threads)
    return args, stamp, run


def target_dir(args: argparse.Namespace) -> Path:
    """The TOFU target of the preset and split the options name (trained first where not cached)."""
    return Path(ensure_reference_models(preset(args.preset, args.split), which=("target",), progress=False).target_dir)


def run_context(tofu: TofuData, run: dict[str, Any], split: str | None = None) -> LeakContext:
    """The leak run's folds: what its requests were fit on (`fit`) and what its probes were built from."""
    folds = (run.get("fit_fold", 0), tuple(run.get("excluded_authors") or ()))
    return leak_context(tofu, split or run["split"], [], 0, *folds)


def rebuilt_request(run: dict[str, Any], args: Any) -> ForgetSpec:
    """The forget request the leak run registered: its fit fold, its retain authors and the names."""
    tofu = TofuData(allow_hub=False)
    refs = ensure_reference_models(preset(args.preset, args.split), tofu=tofu, which=())
    ctx = run_context(tofu, run, refs.preset.forget_split)
    retain = [it for it in refs.data.retain_items if it.author in run["request_retain_authors"]]
    return ForgetSpec.model_validate(request_spec("dev", "refuse", ctx.fit, retain, None, ctx.names))


def finish(
    args: argparse.Namespace,
    stamp: dict[str, Any],
    run: dict[str, Any],
    items: list[dict[str, Any]],
    fields: dict[str, Any],
    markdown: Callable[[dict[str, Any]], str],
) -> None:
    """Write a dev check's per-item records and its report: the stamp, the leak run it read, `fields`."""
    report = {
        **stamp,
        "name": Path(args.out).name,
        "records": args.records,
        "records_commit": run.get("git_commit"),
        **fields,
    }
    write_records(args.out, items)
    write_report_files(args.out, report, markdown(report))
    logging.getLogger("dev_check").info("wrote %s", args.out)
