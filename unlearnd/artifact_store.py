"""Artifact folders in an object store (`--artifacts s3://bucket/prefix`, or any fsspec URL).

A plain path needs nothing of this module: every replica mounts the folder and reads it in place. A URL
is a store the replicas do not mount: the worker publishes a finished folder under its digest
(`ROOT/<request id>/<digest hex>/...`), so a version is never changed in place and a replica that reads
while a retrain uploads sees the old complete version or the new complete one. Each replica keeps a
local copy (its cache), fetched again only when the registry names another digest, and verified against
that digest before it is installed: a copy that does not match fails closed like a changed folder.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from unlearnd.artifacts import ArtifactMismatch, install_dir, staging_dir, tree_digest, verify_digest

log = logging.getLogger(__name__)


def redact(url: str) -> str:
    """`url` without a user or password (s3://KEY:SECRET@bucket/... must not reach a log)."""
    scheme, _, rest = url.partition("://")
    authority, slash, path = rest.partition("/")
    return f"{scheme}://{authority.rpartition('@')[2]}{slash}{path}"


def is_store_url(location: str | Path | None) -> bool:
    """Whether `--artifacts` names an object store (a URL with a scheme) rather than a mounted folder."""
    return location is not None and "://" in str(location)


def _inside(root: Path, key: str) -> Path | None:
    """Where an object's key (relative to its version) goes under `root`; None for a hidden file. A key that
    would leave `root` (an absolute path, a `..` part) raises: the store is not trusted to write elsewhere."""
    parts = [part for part in key.split("/") if part]
    if not parts or any(part in ("..", ".") or "\\" in part for part in parts):
        raise ArtifactMismatch(f"artifact store object {key!r} is not a plain relative path")
    if any(part.startswith(".") for part in parts):
        return None
    local = root.joinpath(*parts)
    if not local.resolve().is_relative_to(root.resolve()):
        raise ArtifactMismatch(f"artifact store object {key!r} leaves its folder")
    return local


class ArtifactStore:
    """One fsspec file system and a root URL; the local cache folder is the registry's artifact root."""

    def __init__(self, url: str):
        import fsspec

        self.url = url.rstrip("/")
        self.public_url = redact(self.url)  # for logs and errors: no credentials
        self.fs, self.root = fsspec.core.url_to_fs(self.url)
        self.root = self.root.rstrip("/")

    def _version(self, request_id: str, digest: str) -> str:
        return f"{self.root}/{request_id}/{digest.removeprefix('sha256:')}"

    def publish(self, request_id: str, folder: Path) -> str:
        """Upload `folder` as a new version; returns its digest. The older versions stay until `prune` (after
        the registry names the new one: a replica starting meanwhile still finds the version it is told)."""
        digest = tree_digest(folder)
        target = self._version(request_id, digest)
        for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
            relative = path.relative_to(folder)
            if any(part.startswith(".") for part in relative.parts):
                continue  # what tree_digest leaves out (temporary files) is not part of the version
            destination = f"{target}/{relative.as_posix()}"
            self.fs.makedirs(destination.rsplit("/", 1)[0], exist_ok=True)  # object stores have no folders
            self.fs.put_file(str(path), destination)
        return digest

    def prune(self, request_id: str, keep: str) -> None:
        """Delete the request's versions other than `keep` (a digest)."""
        target = self._version(request_id, keep)
        for old in self._versions(request_id):
            if old.rstrip("/") != target:
                self.fs.rm(old, recursive=True)

    def _versions(self, request_id: str) -> list[str]:
        try:
            return [entry for entry in self.fs.ls(f"{self.root}/{request_id}", detail=False)]
        except FileNotFoundError:
            return []

    def fetch(self, request_id: str, digest: str, target: Path) -> bool:
        """Make `target` the version `digest` (no download when the cached copy already is); False when
        the store does not hold that version. A download that does not match `digest` raises."""
        if target.is_dir() and tree_digest(target) == digest:
            return True
        source = self._version(request_id, digest)
        self.fs.invalidate_cache()  # a listing cached before the upload (s3fs keeps them) would miss files
        if not self.fs.exists(source):
            return False
        staging = staging_dir(target)
        try:
            for remote in self.fs.find(source):
                local = _inside(staging, remote[len(source) :])
                if local is None:
                    continue  # a hidden file is no part of a version (tree_digest leaves it out too)
                local.parent.mkdir(parents=True, exist_ok=True)
                self.fs.get_file(remote, str(local))
            verify_digest(staging, digest)
            install_dir(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        log.info("artifacts of %s fetched from %s", request_id, self.public_url)
        return True

    def remove(self, request_id: str) -> None:
        """Delete every version of a request (purge)."""
        try:
            self.fs.rm(f"{self.root}/{request_id}", recursive=True)
        except FileNotFoundError:
            pass
