"""LoRA adapters that the vLLM servers load themselves, by name, from a folder they all mount.

Behind a router (vLLM's router, production-stack, llm-d, KServe) unlearnd does not choose the server a
request reaches: an adapter loaded through `/v1/load_lora_adapter` is loaded on whichever server that
call reached, and a generation routed to another one fails (404). vLLM's filesystem LoRA resolver
avoids that: a server started with `VLLM_ALLOW_RUNTIME_LORA_UPDATING=True` and
`VLLM_LORA_RESOLVER_CACHE_DIR=DIR` loads, on the first request for a model name it does not know, the
adapter in `DIR/<name>/`, provided its `adapter_config.json` names the server's own base model (its
`--model`). With `--remote-lora-dir DIR`, unlearnd places every adapter there under its name (unique per
request, version and scale) before first use, in the base model the servers report, and deletes a
request's adapters when the request leaves the registry (not when one replica fails to activate it: the
others may be serving from the folder).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from unlearnd.engine.base import adapter_of

log = logging.getLogger(__name__)

CONFIG = "adapter_config.json"


def weights_digest(folder: Path) -> str:
    """sha256 over the adapter's files other than its config (whose base model a placement rewrites)."""
    total = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != CONFIG):
        total.update(path.relative_to(folder).as_posix().encode() + b"\0")
        total.update(hashlib.sha256(path.read_bytes()).digest())
    return total.hexdigest()


def _config(folder: Path, base_model: str | None) -> dict:
    config = json.loads((folder / CONFIG).read_text())
    return {**config, "base_model_name_or_path": base_model} if base_model else config


def _placed(dest: Path, source: Path, base_model: str | None) -> bool:
    """Whether `dest` already holds `source`'s adapter for `base_model`: the whole config (the pre-scaled
    copies differ only in `lora_alpha`) and the weights. A name is never reused for another adapter, but
    the folder is shared: what is there is checked, not trusted."""
    try:
        if json.loads((dest / CONFIG).read_text()) != _config(source, base_model):
            return False
    except (OSError, ValueError):
        return False
    return weights_digest(dest) == weights_digest(source)


def place_adapter(source: str | Path, folder: str | Path, name: str, base_model: str | None) -> Path:
    """Put the adapter folder `source` at `folder/name`, its config naming `base_model` (None: as it is),
    in one rename: a server resolving the name meanwhile finds nothing or the complete adapter."""
    source, folder = Path(source), Path(folder)
    dest = folder / name
    if _placed(dest, source, base_model):
        return dest
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=folder))
    try:
        shutil.copytree(source, staging, dirs_exist_ok=True)
        (staging / CONFIG).write_text(json.dumps(_config(source, base_model), indent=2))
        staging.chmod(0o755)
        if _placed(dest, source, base_model):  # another replica placed it meanwhile (all load it at once)
            return dest
        if dest.exists():  # other files under this name: replaced, not served
            log.warning("replacing the adapter at %s: it was not %s's", dest, source)
            aside = Path(tempfile.mkdtemp(prefix=f".{name}.old.", dir=folder))
            os.replace(dest, aside / name)
            shutil.rmtree(aside, ignore_errors=True)
        try:
            os.rename(staging, dest)
        except OSError:
            if not _placed(dest, source, base_model):  # another replica placed it first: fine if the same
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return dest


def remove_adapters(folder: str | Path, request_id: str) -> list[str]:
    """Delete every adapter of `request_id` from the folder (its names: the id, or the id and a suffix),
    and staging folders a crash left of them; returns the names removed. No server resolves them again;
    one that had loaded one keeps it in memory (vLLM keeps a resolved name), but unlearnd never sends it."""
    removed = []
    for path in Path(folder).glob(f"*{request_id}*"):
        staged = path.name.startswith(".") and adapter_of(path.name[1:].split(".")[0], request_id)
        if path.is_dir() and (adapter_of(path.name, request_id) or staged):
            shutil.rmtree(path, ignore_errors=True)
            if not staged:
                removed.append(path.name)
    return removed
