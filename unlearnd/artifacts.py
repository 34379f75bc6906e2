"""Artifacts on disk: one config base with a fixed file name, and the atomic writes every file uses.

As in peft, an artifact is a JSON config plus (optionally) weights under fixed file names, so other
tools can load it. Every write goes to a temporary sibling, is fsynced and renamed into place, and
the folder is fsynced: a crash leaves the old file or the new one, never half of one. Folders
(adapters, models) are staged the same way and swapped in whole.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, ClassVar, Self

from pydantic import BaseModel


def fsync_dir(folder: Path) -> None:
    """Make a rename inside `folder` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    return write_bytes_atomic(path, text.encode("utf-8"))


def _jsonable(value: Any) -> Any:
    """numpy scalars as Python numbers; anything else JSON cannot hold (paths, ...) as text."""
    item = getattr(value, "item", None)
    if callable(item):
        try:
            return item()
        except (TypeError, ValueError):  # an array of more than one element: kept as text, as before
            pass
    return str(value)


def write_json_atomic(path: str | Path, payload: Any, indent: int | None = 1) -> Path:
    return write_text_atomic(path, json.dumps(payload, indent=indent, default=_jsonable))


def write_npz_atomic(path: str | Path, **arrays: Any) -> Path:
    """numpy arrays as one .npz file, written atomically."""
    import io

    import numpy as np

    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return write_bytes_atomic(path, buffer.getvalue())


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def fsync_tree(folder: Path) -> None:
    """fsync every file and folder under `folder` (what `save_pretrained` wrote without)."""
    for path in sorted(Path(folder).rglob("*"), key=lambda p: len(p.parts), reverse=True):
        if path.is_file() and not path.is_symlink():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        elif path.is_dir():
            fsync_dir(path)
    fsync_dir(Path(folder))


def tree_digest(folder: str | Path) -> str:
    """sha256 over every file of `folder` (relative path and contents, in path order), hidden files and
    folders (temporary files, staging folders) left out: what a replica compares before it loads."""
    folder = Path(folder)
    total = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        relative = path.relative_to(folder)
        if any(part.startswith(".") for part in relative.parts):
            continue
        total.update(relative.as_posix().encode() + b"\0")
        total.update(hashlib.sha256(path.read_bytes()).digest())
    return "sha256:" + total.hexdigest()


class ArtifactMismatch(ValueError):
    """An artifact folder is not what the worker made ready (changed, truncated, or another version)."""


def verify_digest(folder: str | Path, expected: str | None) -> None:
    """Raise `ArtifactMismatch` unless `folder` has the digest the registry holds (None: nothing to check)."""
    if expected is None:
        return
    found = tree_digest(folder)
    if found != expected:
        raise ArtifactMismatch(
            f"artifacts of {Path(folder).name} changed since training ({found[:19]}..., registry {expected[:19]}...)"
        )


def staging_dir(target: Path) -> Path:
    """A fresh empty sibling of `target` to build a folder in before `install_dir`."""
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def exchange_paths(a: Path, b: Path) -> bool:
    """Swap two existing paths in one step (Linux renameat2 RENAME_EXCHANGE): whoever opens either
    path sees the old folder or the new one, never none. False where the system cannot."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    if renameat2(_AT_FDCWD, os.fsencode(str(a)), _AT_FDCWD, os.fsencode(str(b)), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def install_dir(staging: Path, target: Path) -> Path:
    """Put the complete folder `staging` at `target`. An existing `target` is swapped with it in one
    step where the system can (else moved aside first and removed only once the new folder is in
    place), so `target` never loses its contents."""
    staging.chmod(0o755)
    fsync_tree(staging)  # the files' contents are on disk before the folder becomes visible
    if target.exists() and exchange_paths(staging, target):
        fsync_dir(target.parent)
        shutil.rmtree(staging, ignore_errors=True)  # now the old folder
        return target
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
    os.replace(staging, target)
    fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return target


class ArtifactConfig(BaseModel):
    """An artifact's JSON config under its fixed `file_name` in the request's artifact folder."""

    file_name: ClassVar[str]

    @classmethod
    def path(cls, artifact_dir: str | Path) -> Path:
        return Path(artifact_dir) / cls.file_name

    @classmethod
    def read(cls, artifact_dir: str | Path) -> Self:
        return cls.model_validate_json(cls.path(artifact_dir).read_text(encoding="utf-8"))

    def write(self, artifact_dir: str | Path) -> Path:
        return write_json_atomic(self.path(artifact_dir), self.model_dump(mode="json"))
