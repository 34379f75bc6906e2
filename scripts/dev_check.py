"""What the dev checks on a committed leak run share: their options, logging, stamp and the run they read."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import torch

from unlearnd.provenance import command_line, run_stamp


def start(doc: str, script: str, out: str) -> tuple[argparse.Namespace, dict[str, Any], dict[str, Any]]:
    """Parse the shared options (`--records` a leak report's base path, `--preset`, `--split`, `--out`,
    `--threads`), set up logging and torch's threads; returns the options, the run stamp and the leak run."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--records", default="reports/leaks", help="a leak report's base path")
    parser.add_argument("--preset", default="mini")
    parser.add_argument("--split", default=None)
    parser.add_argument("--out", default=out)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    stamp = run_stamp(command_line().replace("unlearnd", f"python scripts/{script}", 1))
    torch.set_num_threads(args.threads)
    return args, stamp, json.loads(Path(args.records + ".json").read_text())
