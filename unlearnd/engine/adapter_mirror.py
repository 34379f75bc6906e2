"""A vLLM server that fetches the LoRA adapters it serves from the artifact store itself.

With `--artifacts URL` the replicas and the worker share no folder, and a vLLM server loads adapters only
from its own file system. `unlearnd backend --registry DB --artifacts URL` runs this mirror beside its vLLM
server: it reads the registry, fetches every LoRA request's version from the store into its own cache,
checks it against the digest the registry holds (as a replica does), and places each adapter in the
server's resolver folder under the name the replicas send (`adapter_name`: request, version, scale),
its config naming the server's own base model. A request that leaves the registry, or whose copy does
not match, loses its adapters there (an older version's stay until then, as in a shared folder: a replica
may still send its name until it has synced). The replicas then need no shared folder: `--remote-lora-by-name`
has them send the adapter's name only, and check at activation that the server resolves it.
"""

from __future__ import annotations

import logging
import re
import threading
from pathlib import Path

import httpx

from unlearnd.artifacts import ArtifactMismatch
from unlearnd.domain import ForgetRequest, Method, Status
from unlearnd.engine.adapter_dir import place_adapter, remove_adapters
from unlearnd.interventions.lora import LoRAArtifact, adapter_name, check_adapter
from unlearnd.registry import Registry

log = logging.getLogger(__name__)

SERVED = (Status.ready, Status.active)  # ready: a replica's activation checks that the server resolves it


ADAPTER_NAME = re.compile(r"^(?P<request>.+?)-v\d+(?:-s[^/]+)?$")  # adapter_name's form: id, version, scale


def request_of(folder_name: str) -> str | None:
    """The request an adapter folder serves (None: not an adapter's name, e.g. a staging folder)."""
    found = ADAPTER_NAME.match(folder_name)
    return found["request"] if found and not folder_name.startswith(".") else None


class AdapterMirror:
    """Keeps `lora_dir` equal to the adapters of the registry's served LoRA requests; `server_url` (its own
    vLLM server) is told to drop an adapter it may hold in memory whenever its folder goes or changes."""

    def __init__(self, registry: Registry, lora_dir: str | Path, base_model: str, server_url: str | None = None):
        if registry.store is None:
            raise ValueError(
                "an adapter mirror needs --artifacts URL (an object store): a mounted folder is read in place"
            )
        self.registry = registry
        self.lora_dir = Path(lora_dir)
        self.lora_dir.mkdir(parents=True, exist_ok=True)
        self.base_model = base_model
        self.server_url = server_url
        self.placed: dict[str, str] = {}  # request id -> digest whose adapters are in the folder
        self.seen: dict[str, float] = {}  # request id -> updated_at of the row last handled

    def sync_once(self) -> None:
        """One pass: place what is new or changed, remove what is not served (also what an earlier run left).
        A request is read again only when its row changed; a store that cannot be reached leaves its folder
        as it is (tried again next pass); the registry unreachable raises to the caller."""
        listed = {rid: updated for rid, _, updated in self.registry.versions(list(SERVED))}
        self._sweep(set(listed))
        for request_id in [rid for rid in self.seen if rid not in listed]:
            del self.seen[request_id]
        for request_id, updated in listed.items():
            if self.seen.get(request_id) == updated:
                continue
            try:
                request = self.registry.get(request_id)
            except KeyError:
                continue  # removed since the listing
            if request.status not in SERVED:  # changed since the listing
                self._remove(request_id, "it is no longer served")
                continue
            if request.method != Method.lora or request.artifact_digest is None or self._place(request):
                self.seen[request_id] = updated

    def _sweep(self, served: set[str]) -> None:
        """Remove the adapters and cached copies of every request not served, wherever they came from."""
        gone = {request_of(p.name) for p in self.lora_dir.iterdir() if p.is_dir()} - {None} - served
        gone |= {p.name for p in self.registry.artifacts_root.iterdir() if p.is_dir()} - served
        gone |= set(self.placed) - served
        for request_id in sorted(gone):
            self._remove(request_id, "it left the registry or is no longer served")

    def _place(self, request: ForgetRequest) -> bool:
        """Fetch, check and place one request's adapters; False when that failed for now (tried again)."""
        if self.placed.get(request.id) == request.artifact_digest:
            return True
        try:
            self.registry.fetch_artifacts(request)
        except ArtifactMismatch as exc:  # missing or changed in the store: nothing of it is served from here
            return self._refuse(request.id, exc)
        except Exception as exc:  # the store unreachable: the folder stays as it was
            log.warning("adapters of %s not fetched (%s: %s); tried again", request.id, type(exc).__name__, exc)
            return False
        folder = self.registry.artifact_dir(request.id)
        try:
            artifact = LoRAArtifact.read(folder)
            for sub in artifact.folders.values():
                check_adapter(folder / sub)
        except Exception as exc:  # verified, yet no LoRA vLLM may load: the same
            return self._refuse(request.id, exc)
        names = [adapter_name(request.id, artifact.version, float(scale)) for scale in artifact.folders]
        try:
            for name, sub in zip(names, artifact.folders.values(), strict=True):
                place_adapter(folder / sub, self.lora_dir, name, self.base_model)
        except OSError as exc:
            log.warning("adapters of %s not placed (%s); tried again", request.id, exc)
            self._remove(request.id, "placing them failed")
            return False
        if request.id in self.placed:  # another version: a name it shares may still be held with old weights
            self._unload(names)
        self.placed[request.id] = request.artifact_digest
        log.info("adapters of %s (version %d) placed in %s", request.id, artifact.version, self.lora_dir)
        return True

    def _refuse(self, request_id: str, exc: Exception) -> bool:
        log.error("adapters of %s not placed: %s: %s", request_id, type(exc).__name__, exc)
        self._remove(request_id, "its artifacts do not match the registry or are no LoRA vLLM may load")
        return True  # not tried again until the registry names another version

    def _remove(self, request_id: str, why: str) -> None:
        removed = remove_adapters(self.lora_dir, request_id)  # every version's names
        self.placed.pop(request_id, None)
        self.registry.drop_cache(request_id)
        self._unload(removed)
        if removed:
            log.info("adapters of %s removed from %s: %s", request_id, self.lora_dir, why)

    def _unload(self, names: list[str]) -> None:
        """vLLM keeps an adapter it resolved in memory: its folder going is not enough."""
        if self.server_url is None:
            return
        for name in names:
            try:
                httpx.post(f"{self.server_url}/v1/unload_lora_adapter", json={"lora_name": name}, timeout=30)
            except httpx.HTTPError as exc:  # a server not up yet holds nothing
                log.debug("unloading %s: %s", name, exc)

    def run(self, stop: threading.Event, interval_s: float = 0.5) -> None:
        """Sync until `stop`; a failed pass (the registry unreachable) keeps the folder and tries again."""
        while not stop.is_set():
            try:
                self.sync_once()
            except Exception as exc:
                log.warning("adapter mirror pass failed (%s: %s); the folder is kept", type(exc).__name__, exc)
            stop.wait(interval_s)
