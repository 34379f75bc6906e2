"""Who may do what: the admin key (one documented header), the optional API key, and the key file.

There is always an admin key: without `--admin-key` the server generates one at start and writes it
to `<data dir>/admin_key` (mode 0600, readable by its owner only), where the CLI finds it. A
loopback-only admin API would be open to anything behind a same-host reverse proxy, and who is
being forgotten is itself sensitive (a right-to-be-forgotten request), so nothing about forget
requests is disclosed without the key.
"""

from __future__ import annotations

import hmac
import logging
import os
import secrets
import stat
import time
from pathlib import Path

from fastapi import Request

from unlearnd.artifacts import fsync_dir

log = logging.getLogger(__name__)

ADMIN_KEY_FILE = "admin_key"
ADMIN_HEADER = "Authorization"  # "Bearer <admin key>": the one header the admin key is accepted in


def admin_key_path(data_dir: str | Path) -> Path:
    return Path(data_dir) / ADMIN_KEY_FILE


def read_admin_key(data_dir: str | Path) -> str | None:
    """The key a server generated in this data dir, if any (what the CLI uses without --admin-key)."""
    try:
        return admin_key_path(data_dir).read_text(encoding="utf-8").strip() or None
    except OSError:
        return None


class AdminKeyFileError(RuntimeError):
    """The admin key file is not one this server can trust (another owner, open to others, a link)."""


def _check_key_file(path: Path) -> None:
    info = path.lstat()
    if not stat.S_ISREG(info.st_mode):
        raise AdminKeyFileError(f"{path} is not a regular file (a link?): remove it or pass --admin-key")
    if hasattr(os, "getuid") and info.st_uid != os.getuid():
        raise AdminKeyFileError(f"{path} belongs to another user: remove it or pass --admin-key")
    if info.st_mode & 0o077:
        raise AdminKeyFileError(f"{path} is readable or writable by others (mode {info.st_mode & 0o777:o}): chmod 600")


def ensure_admin_key(data_dir: str | Path, wait_s: float = 5.0) -> str:
    """The data dir's admin key, generated on first use. The file is created exclusively (no link
    followed, mode 0600 from the start), so two servers starting at once on one data dir end with the
    first one's key; an existing file is used only when it is a regular file of ours, closed to others."""
    path = admin_key_path(data_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_urlsafe(32)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    except FileExistsError:
        _check_key_file(path)
        deadline = time.monotonic() + wait_s
        while True:  # another server may be writing it right now
            existing = read_admin_key(data_dir)
            if existing or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        if not existing:
            raise AdminKeyFileError(f"{path} is empty: remove it or pass --admin-key") from None
        return existing
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(key + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    fsync_dir(path.parent)
    log.warning("no admin key given: generated one and wrote it to %s (mode 0600)", path)
    return key


def bearer_token(request: Request) -> str:
    header = request.headers.get(ADMIN_HEADER, "")
    return header[7:].strip() if header.lower().startswith("bearer ") else ""


def is_admin(request: Request, admin_key: str) -> bool:
    return hmac.compare_digest(bearer_token(request).encode(), admin_key.encode())


def api_key_matches(request: Request, api_key: str) -> bool:
    """The API key as OpenAI clients send it (Authorization: Bearer), or in `x-api-key`."""
    token = bearer_token(request) or request.headers.get("x-api-key", "")
    return hmac.compare_digest(token.encode(), api_key.encode())
