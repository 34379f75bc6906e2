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
import threading
from pathlib import Path

from unlearnd.artifacts import ArtifactMismatch
from unlearnd.domain import ForgetRequest, Method, Status
from unlearnd.engine.adapter_dir import place_adapter, remove_adapters
from unlearnd.interventions.lora import LoRAArtifact, adapter_name, check_adapter
from unlearnd.registry import Registry

log = logging.getLogger(__name__)

SERVED = (Status.ready, Status.active)  # ready: a replica's activation checks that the server resolves it


class AdapterMirror:
    """Keeps `lora_dir` equal to the adapters of the registry's served LoRA requests."""

    def __init__(self, registry: Registry, lora_dir: str | Path, base_model: str):
        if registry.store is None:
            raise ValueError(
                "an adapter mirror needs --artifacts URL (an object store): a mounted folder is read in place"
            )
        self.registry = registry
        self.lora_dir = Path(lora_dir)
        self.lora_dir.mkdir(parents=True, exist_ok=True)
        self.base_model = base_model
        self.placed: dict[str, str] = {}  # request id -> digest whose adapters are in the folder
        self.seen: dict[str, float] = {}  # request id -> updated_at of the row last handled

    def sync_once(self) -> None:
        """One pass: place what is new or changed, remove what left. A request is read again only when its
        row changed; a store that cannot be reached leaves the folder as it is (tried again next pass); the
        registry unreachable raises to the caller."""
        listed = {rid: updated for rid, _, updated in self.registry.versions(list(SERVED))}
        for request_id in [rid for rid in self.seen if rid not in listed]:
            del self.seen[request_id]
            if request_id in self.placed:
                self._remove(request_id, "it left the registry or is no longer served")
        for request_id, updated in listed.items():
            if self.seen.get(request_id) == updated:
                continue
            try:
                request = self.registry.get(request_id)
            except KeyError:
                continue  # removed since the listing
            if request.method != Method.lora or request.artifact_digest is None or self._place(request):
                self.seen[request_id] = updated

    def _place(self, request: ForgetRequest) -> bool:
        """Fetch, check and place one request's adapters; False when the store could not be reached."""
        if self.placed.get(request.id) == request.artifact_digest:
            return True
        try:
            self.registry.fetch_artifacts(request)
            folder = self.registry.artifact_dir(request.id)
            artifact = LoRAArtifact.read(folder)
            for sub in artifact.folders.values():
                check_adapter(folder / sub)
        except ArtifactMismatch as exc:  # fail closed: nothing of this request is served from here
            log.error("adapters of %s not placed: its copy does not match the registry (%s)", request.id, exc)
            self._remove(request.id, "its copy does not match the registry")
            return True  # not tried again until the registry names another version
        except Exception as exc:  # the store unreachable: the folder stays as it was, tried again next pass
            log.warning("adapters of %s not fetched (%s: %s); tried again", request.id, type(exc).__name__, exc)
            return False
        for scale, sub in artifact.folders.items():
            name = adapter_name(request.id, artifact.version, float(scale))
            place_adapter(folder / sub, self.lora_dir, name, self.base_model)
        self.placed[request.id] = request.artifact_digest
        log.info("adapters of %s (version %d) placed in %s", request.id, artifact.version, self.lora_dir)
        return True

    def _remove(self, request_id: str, why: str) -> None:
        removed = remove_adapters(self.lora_dir, request_id)  # every version's names
        self.placed.pop(request_id, None)
        self.registry.drop_cache(request_id)
        if removed:
            log.info("adapters of %s removed from %s: %s", request_id, self.lora_dir, why)

    def run(self, stop: threading.Event, interval_s: float = 0.5) -> None:
        """Sync until `stop`; a failed pass (the registry unreachable) keeps the folder and tries again."""
        while not stop.is_set():
            try:
                self.sync_once()
            except Exception as exc:
                log.warning("adapter mirror pass failed (%s: %s); the folder is kept", type(exc).__name__, exc)
            stop.wait(interval_s)
