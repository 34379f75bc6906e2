"""Provenance of a report: the command, machine, engine dtype and commit that made it, taken when the run
starts; a report is refused from code that is not a commit unless the user allows it (then marked)."""

from __future__ import annotations

import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

PACKAGE_ROOT = Path(__file__).resolve().parents[1]  # the checkout the running code comes from


def git_commit(repo: Path | None = None) -> str | None:
    """HEAD's short hash of the checkout the running code comes from (`repo`: another one), with `+dirty`
    when files outside reports/ differ from it or are new (then the code that ran is not that commit);
    None outside a git checkout."""
    repo = repo or PACKAGE_ROOT
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=repo,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        changed = subprocess.run(  # tracked changes and untracked files (not ignored) outside reports/
            ["git", "status", "--porcelain", "--untracked-files=normal", "--", ":(top)", ":(top,exclude)reports"],
            cwd=repo,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        dirty = changed.returncode != 0 or bool(changed.stdout.strip())  # a tree git cannot read is not clean
    except (OSError, subprocess.SubprocessError):
        return None
    head = out.stdout.strip()
    return (head + ("+dirty" if dirty else "")) if head else None


def machine_description() -> str:
    try:
        import torch

        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:
        gpu = None
    cores = os.cpu_count()
    return f"{cores}-core CPU, " + (f"GPU {gpu}" if gpu else "no GPU") + f" ({platform.machine()})"


SECRET_OPTIONS = ("--admin-key", "--api-key")


def command_line(argv: list[str] | None = None) -> str:
    """How this process was started, as a `unlearnd ...` command, with key values masked."""
    args = list(sys.argv[1:] if argv is None else argv)
    for i, arg in enumerate(args):
        option = arg.split("=", 1)[0]
        if option in SECRET_OPTIONS and "=" in arg:
            args[i] = f"{option}=***"
        elif arg in SECRET_OPTIONS and i + 1 < len(args):
            args[i + 1] = "***"
    return "unlearnd " + shlex.join(args)


ALLOW_DIRTY_ENV = "UNLEARND_ALLOW_DIRTY"


class DirtyTreeError(RuntimeError):
    """A report was asked for from code that is not a commit (its numbers could not be reproduced)."""


def allow_dirty_default() -> bool:
    return os.environ.get(ALLOW_DIRTY_ENV, "").strip().lower() in ("1", "true", "yes")


def run_stamp(command: str | None = None, dtype: str | None = None, allow_dirty: bool | None = None) -> dict[str, Any]:
    """Command, machine, engine dtype, commit and time: taken when a run starts (later commits are not
    what ran). `dtype` is the engine's compute dtype where the run measured an engine.

    A tree with changes outside reports/ is refused (DirtyTreeError) unless `allow_dirty` (default: the
    UNLEARND_ALLOW_DIRTY environment variable; `--allow-dirty` on the CLI); such a stamp is marked."""
    commit = git_commit()
    dirty = commit is None or commit.endswith("+dirty")
    if dirty and not (allow_dirty_default() if allow_dirty is None else allow_dirty):
        where = (
            f"the working tree differs from commit {commit.removesuffix('+dirty')} outside reports/"
            if commit
            else f"no git commit can be read for the code that runs ({PACKAGE_ROOT})"
        )
        raise DirtyTreeError(
            f"{where}: commit first (a report must come from a recorded clean commit), or pass --allow-dirty "
            f"(or set {ALLOW_DIRTY_ENV}=1) and the report is marked"
        )
    return {
        "command": command or command_line(),
        "machine": machine_description(),
        "dtype": dtype,
        "git_commit": commit,
        "dirty": dirty,
        "created": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def stamp_lines(stamp: dict[str, Any]) -> list[str]:
    """The report header: the command, then one line with machine, dtype, commit and time."""
    lines = [
        f"Command: `{stamp.get('command', 'n/a')}`",
        "",
        (
            f"Machine: {stamp.get('machine') or 'n/a'}; engine dtype {stamp.get('dtype') or 'n/a'}; "
            f"commit {stamp.get('git_commit') or 'n/a'}; created {stamp.get('created') or 'n/a'}."
        ),
        "",
    ]
    if stamp.get("dirty"):
        lines += ["**Made from a dirty tree (--allow-dirty): the code that ran is not the commit above.**", ""]
    return lines
