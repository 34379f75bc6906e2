"""The guardrail pipeline: detector -> router -> intervention -> engine, on one `GuardedCall`.

It also keeps the serving state in step with the registry: newly `ready` requests are loaded
into the detector and their intervention and become `active`; deactivated ones are unloaded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import replace

import httpx
import torch

from unlearnd.artifacts import ArtifactMismatch, verify_digest
from unlearnd.batching import MicroBatcher
from unlearnd.detectors.anchors import FLAG_SCORE, AnchorIndex, extract_anchors
from unlearnd.detectors.base import Detection, Detector, RequestMatch
from unlearnd.domain import LOAD_FAILED, ForgetRequest, Status
from unlearnd.elicit import read_elicited
from unlearnd.engine.base import ChoiceDelta, Engine, EngineInput
from unlearnd.engine.remote import BackendFailure
from unlearnd.guardrail import composite, prometheus
from unlearnd.guardrail.call import GuardedCall
from unlearnd.guardrail.output_guard import OutputGuard
from unlearnd.guardrail.traffic import Traffic
from unlearnd.interventions.base import Intervention, PipelineContext
from unlearnd.methods import METHODS, Method
from unlearnd.prompting import detector_text, prompt_ids
from unlearnd.registry import Registry

log = logging.getLogger(__name__)


class ContextLengthError(ValueError):
    """The prompt plus the requested output does not fit the model's context."""


class Router:
    """Picks the route of a flagged prompt: the method of its best-matching forget request."""

    def choose(self, detection: Detection, active: dict[str, ForgetRequest]) -> tuple[str, object]:
        for match in detection.matches:  # sorted by score, best first
            request = active.get(match.request_id)
            if request is not None:
                return request.method.value, match
        return "none", None


LONG_PROMPT_CHARS = 20_000


async def _without_alternatives(deltas: AsyncIterator[ChoiceDelta]) -> AsyncIterator[ChoiceDelta]:
    async for delta in deltas:
        if delta.logprobs:
            delta = replace(delta, logprobs=[replace(t, top_logprobs={t.token: t.logprob}) for t in delta.logprobs])
        yield delta


class EngineUnavailable(Exception):
    """The engine could not be asked (a remote fleet restarting, a dead engine): not the artifact's fault,
    so the request is refused meanwhile and tried again at the next sync, not marked degraded."""


class StoreUnavailable(Exception):
    """The artifact store could not be read (unreachable, throttled): refused meanwhile, tried again."""


class LoadFailure(Exception):
    """A request's artifacts did not load; `detector_loaded`: its detector did (only the route's part failed)."""

    def __init__(self, cause: BaseException, detector_loaded: bool):
        super().__init__(str(cause))
        self.cause = cause
        self.detector_loaded = detector_loaded


def _load_failed(error: str | None) -> bool:
    """A load failure's error text (kept while the request is re-trained)."""
    return (error or "").startswith(LOAD_FAILED)


NOT_TRAINED = "not trained yet: refused by name until its artifacts load"
UNTRAINED = (Status.pending, Status.training, Status.failed)  # served refused by name: no artifact to load
_UNTRAINED_VALUES = frozenset(status.value for status in UNTRAINED)


class GuardrailPipeline:
    def __init__(
        self,
        engine: Engine,
        detector: Detector,
        registry: Registry,
        output_release: str = "strict",
        background_max_wait_s: float = 10.0,
    ):
        self.engine = engine
        self.traffic = Traffic(background_max_wait_s)
        self.detector = detector
        self.registry = registry
        self.router = Router()
        self.interventions: dict[str, Intervention] = {
            name: entry.intervention_class()() for name, entry in METHODS.items()
        }
        self.active: dict[str, ForgetRequest] = {}
        self._synced: dict[str, tuple[str, float]] = {}  # request id -> (status, updated_at) at its last sync
        self._fingerprint: tuple[int, float, float] | None = None  # the registry's, at the last full round
        # Fail closed: a request whose artifacts cannot be loaded is still matched by its names, titles
        # and dates (here, whatever the detector) and refused, until it is re-trained.
        self.degraded: dict[str, str] = {}  # request id -> why its artifacts could not be loaded
        # per forget request, on this replica since it last loaded it: prompts routed to it, outputs cut for it
        self.routed: Counter[str] = Counter()
        self.output_blocks: Counter[str] = Counter()
        self._fallback = AnchorIndex()
        self._fallback_lock = threading.Lock()  # found from request threads, changed by the sync
        self.context = PipelineContext(
            tokenizer=engine.tokenizer, embeddings=engine.embeddings, model_config=dict(engine.model_config)
        )
        for intervention in self.interventions.values():
            intervention.context = self.context
        # the output guard compares meaning with the detector's sentence encoder, where it has one
        has_encoder = isinstance(getattr(type(detector), "encoder", None), property)
        encoder = (lambda: detector.encoder) if has_encoder else None
        self.output_guard = OutputGuard(encoder=encoder, release=output_release)
        self._sync_lock = asyncio.Lock()
        # concurrent requests' prompts share detector calls (one encoder batch, not one call each)
        self._detect = MicroBatcher(lambda texts: self.detector.detect(texts))

    # -- classification --------------------------------------------------------------------------
    async def classify(self, texts: list[str], exempt: str | None = None) -> list[Detection]:
        """Each text's detection, its matches limited to the active requests (less `exempt`)."""
        if not self.active:
            return [Detection(0.0) for _ in texts]
        start = time.perf_counter()
        detections = await self._detect(texts)
        if self.degraded:
            await asyncio.to_thread(self._fallback_matches, texts, detections)
        prometheus.CLASSIFIER_LATENCY.observe((time.perf_counter() - start) / max(len(texts), 1))
        for detection in detections:
            detection.matches = [m for m in detection.matches if m.request_id in self.active and m.request_id != exempt]
        return detections

    def _fallback_matches(self, texts: list[str], detections: list[Detection]) -> None:
        """Degraded requests' anchors in each text become matches (ahead of the detector's own)."""
        for text, detection in zip(texts, detections, strict=True):
            with self._fallback_lock:
                hits = self._fallback.find(text)
            found = [
                RequestMatch(rid, hit.score, 1.0, hit.spans)
                for rid, hit in hits.items()
                if hit.score >= FLAG_SCORE and rid in self.degraded
            ]
            if found:
                detection.matches = found + [m for m in detection.matches if m.request_id not in self.degraded]
                detection.score = max([detection.score] + [m.score for m in found])

    def route_of(self, detection: Detection) -> str:
        return self.router.choose(detection, self.active)[0]

    # -- the request path ------------------------------------------------------------------------
    async def prepare(self, call: GuardedCall, count: bool = True) -> GuardedCall:
        """Classify, route and apply the intervention; leaves the call ready for `generate`.

        A flagged chat whose last message also asks ordinary things is answered in parts
        (`guardrail.composite`). Without a client `max_tokens`, the completion may use the rest of the context."""
        call.query_text = detector_text(call.messages, call.prompt, call.continuation)
        call.detection = (await self.classify([call.query_text], call.exempt))[0]
        route, match = self.router.choose(call.detection, self.active)
        call.route, call.match = route, match
        if match is not None and call.kind == "chat" and call.splittable:
            call.parts = await self._split(call)
        if match is not None and not call.parts:
            self.interventions[route].apply(call, match, self.context)
        if not call.prompt_token_ids:
            tokenize = (self.engine.tokenizer, call.messages, call.prompt)
            if len(call.query_text) > LONG_PROMPT_CHARS:  # a long prompt is tokenised off the event loop
                call.prompt_token_ids = await asyncio.to_thread(prompt_ids, *tokenize)
            else:
                call.prompt_token_ids = prompt_ids(*tokenize)
        prompt_len = call.prompt_length
        limit = self.engine.max_model_len
        call.sampling.max_tokens = call.max_tokens or max(1, limit - prompt_len)
        if call.fixed_response is None and prompt_len + call.sampling.max_tokens > limit:
            raise ContextLengthError(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{prompt_len + call.sampling.max_tokens} tokens ({prompt_len} in the prompt, "
                f"{call.sampling.max_tokens} for the completion). Reduce the prompt or max_tokens."
            )
        if count:
            prometheus.REQUESTS.labels(route=call.route, endpoint=call.kind).inc()
            if call.match is not None:
                self.routed[call.match.request_id] += 1
        return call

    async def _split(self, call: GuardedCall) -> list[GuardedCall]:
        """A flagged chat's sub-calls (ordinary parts, flagged parts), or [] where it is not split: one
        part, every part flagged or none alone, or ordinary parts that still route somewhere together."""
        last = call.messages[-1] if call.messages else {}
        if last.get("role") != "user" or not isinstance(last.get("content"), str) or call.sampling.stop:
            return []  # (a stop string met in one part could not end the whole reply)
        parts = composite.split_parts(last["content"])
        if len(parts) < 2:
            return []
        flagged = [self.route_of(d) != "none" for d in await self.classify(parts, call.exempt)]
        flagged = composite.with_references(parts, flagged)
        if not composite.worth_splitting(parts, flagged):
            return []
        subs = composite.part_calls(call, parts, flagged)
        for sub in subs:
            sub.background, sub.exempt = call.background, call.exempt
            await self.prepare(sub, count=False)
        ordinary, about = sorted(subs, key=lambda sub: sub.route != "none")
        if ordinary.route != "none" or about.route == "none":
            return []
        ordinary.guard_ids = about.guard_ids = call.matched_ids
        return subs

    async def generate(self, call: GuardedCall) -> AsyncIterator[ChoiceDelta]:
        if call.parts:
            async for delta in composite.joined(call, self.generate, self._encode):
                yield delta
            return
        if call.fixed_response is not None:
            text, token_ids, finish = self._fixed(call)
            for index in range(call.sampling.n):
                yield ChoiceDelta(index=index, text=text, token_ids=token_ids, finish_reason=finish)
            return
        engine_input = EngineInput(
            request_id=call.engine_id,
            prompt_token_ids=call.prompt_token_ids,
            sampling=call.sampling,
            prompt_embeds=call.prompt_embeds,
            lora=call.lora,
        )
        stream = self._counted(call, self._timed(call, self.engine.generate(engine_input)))
        if call.withhold_alternatives and call.sampling.logprobs:
            stream = _without_alternatives(stream)
        if not self.output_guard.request_ids:
            async for delta in stream:
                yield delta
            return

        def blocked(block, index: int) -> None:
            call.output_blocked[index] = block.request_id
            self.output_blocks[block.request_id] += 1
            prometheus.OUTPUT_BLOCKED.labels(route=call.route, reason=block.reason.split(":")[0]).inc()
            log.info(
                "output of %s (route %s) blocked for forget request %s (%s)",
                call.id,
                call.route,
                block.request_id,
                block.reason,
            )

        flagged = call.subject_ids  # on their subject one part of a name is enough
        guarded = self.output_guard.filter(stream, self._encode, blocked, call.sampling.n, flagged, call.exempt)
        async for delta in guarded:
            yield delta
        if len(call.output_blocked) == call.sampling.n:
            await self.engine.abort(call.engine_id)  # every choice was cut: stop generating

    def _encode(self, text: str) -> list[int]:
        return self.engine.tokenizer.encode(text, add_special_tokens=False)

    def _fixed(self, call: GuardedCall) -> tuple[str, list[int], str]:
        """The route's fixed answer as the client asked for it: cut before a stop sequence, at most
        `max_tokens` tokens ("length" when that cut it)."""
        text = call.fixed_response or ""
        cuts = [i for i in (text.find(s) for s in call.sampling.stop) if i >= 0]
        if cuts:
            text = text[: min(cuts)]
        tokenizer = self.engine.tokenizer
        token_ids = tokenizer.encode(text, add_special_tokens=False)
        if call.max_tokens and len(token_ids) > call.max_tokens:
            token_ids = token_ids[: call.max_tokens]
            return tokenizer.decode(token_ids), token_ids, "length"
        return text, token_ids, "stop"

    async def _counted(self, call: GuardedCall, deltas: AsyncIterator[ChoiceDelta]) -> AsyncIterator[ChoiceDelta]:
        """A user's generation is counted in flight while it runs (background calls wait for none)."""
        async with self.traffic.counted(call.background):
            async for delta in deltas:
                yield delta

    async def _timed(self, call: GuardedCall, deltas: AsyncIterator[ChoiceDelta]) -> AsyncIterator[ChoiceDelta]:
        start = time.perf_counter()
        first = True
        async for delta in deltas:
            if first:
                prometheus.ENGINE_TTFT.labels(route=call.route).observe(time.perf_counter() - start)
                first = False
            yield delta
        prometheus.ENGINE_LATENCY.labels(route=call.route).observe(time.perf_counter() - start)

    def uniform_score(self, continuation: str) -> tuple[list[str], list[float]]:
        """Every token of `continuation` at -log|V|: the numbers of a model that knows nothing."""
        tokenizer = self.engine.tokenizer
        ids = tokenizer.encode(continuation, add_special_tokens=False)
        return [tokenizer.decode([t]) for t in ids], [-math.log(len(tokenizer))] * len(ids)

    async def score(self, call: GuardedCall, continuation: str) -> tuple[list[str], list[float]]:
        """Log-probs of `continuation` after the prompt, under whatever the route does to the prompt.

        The refuse route never lets the model answer, so it scores every continuation token at the
        uniform log-probability -log|V|: what a model that knows nothing would give.
        """
        tokenizer = self.engine.tokenizer
        continuation_ids = tokenizer.encode(continuation, add_special_tokens=False)
        tokens = [tokenizer.decode([t]) for t in continuation_ids]
        if call.fixed_response is not None:
            return self.uniform_score(continuation)
        ids = call.prompt_token_ids + continuation_ids
        embeds = call.prompt_embeds
        if embeds is not None:
            tail = self.engine.embeddings.lookup(continuation_ids).to(embeds.dtype)
            embeds = torch.cat([embeds, tail])
            # Virtual tokens (soft prompts) have no id: pad in front so ids and rows line up.
            ids = [tokenizer.pad_token_id or 0] * (embeds.shape[0] - len(ids)) + ids
        if len(ids) > self.engine.max_model_len:
            raise ContextLengthError(
                f"prompt plus continuation is {len(ids)} tokens; the model's maximum "
                f"context length is {self.engine.max_model_len}"
            )
        engine_input = EngineInput(
            request_id=call.engine_id,
            prompt_token_ids=ids,
            sampling=call.sampling,
            prompt_embeds=embeds,
            lora=call.lora,
        )
        logprobs = await self.engine.prompt_logprobs(engine_input)
        return tokens, [float(lp) for lp in logprobs[len(ids) - len(continuation_ids) :]]

    # -- registry sync ----------------------------------------------------------------------------
    def _load(self, request: ForgetRequest) -> None:
        """Load a request's detector and intervention artifacts (not yet served: see `_engine_load`)."""
        artifact_dir = self.registry.artifact_dir(request.id)
        try:  # from the object store, where the artifacts live in one (the copy is checked there)
            checked = self.registry.fetch_artifacts(request)
        except ArtifactMismatch as exc:  # missing or changed there: fails closed like a changed folder
            raise LoadFailure(exc, detector_loaded=False) from exc
        except Exception as exc:  # the store unreachable is not the artifacts' fault: tried again next sync
            raise StoreUnavailable(f"{type(exc).__name__}: {exc}") from exc
        try:
            if not checked:
                verify_digest(artifact_dir, request.artifact_digest)  # a changed folder fails closed, whatever it holds
            self.detector.load(request, artifact_dir)
        except Exception as exc:
            raise LoadFailure(exc, detector_loaded=False) from exc
        try:
            self.interventions[request.method.value].load(request, artifact_dir)
            elicited = read_elicited(artifact_dir)
        except Exception as exc:
            raise LoadFailure(exc, detector_loaded=True) from exc
        self.output_guard.load(request, elicited)

    async def _engine_load(self, request: ForgetRequest) -> None:
        """Have the engine load the request's adapters before any prompt is routed to them: the engine
        reports a load it cannot do, where a broken adapter first met by a generation would kill it."""
        adapters = getattr(self.interventions[request.method.value], "adapters", None)
        try:
            for lora in adapters(request.id) if adapters is not None else []:
                await self.engine.load_adapter(lora)
        except Exception as exc:
            with contextlib.suppress(Exception):  # the scales that did load go too
                await self.engine.unload_adapters(request.id)
            if isinstance(exc, httpx.TransportError | BackendFailure) or self.engine.dead_reason() is not None:
                raise EngineUnavailable(f"{type(exc).__name__}: {exc}") from exc
            raise LoadFailure(exc, detector_loaded=True) from exc

    def _unload(self, request_id: str) -> None:
        request = self.active.pop(request_id, None)
        self.detector.unload(request_id)
        self.output_guard.unload(request_id)
        with self._fallback_lock:
            self._fallback.remove(request_id)
        self.degraded.pop(request_id, None)
        if request is not None:
            self.interventions[request.method.value].unload(request_id)
        for intervention in self.interventions.values():  # a degraded one was loaded as refuse
            intervention.unload(request_id)

    def _load_degraded(self, request: ForgetRequest, error: str, keep_detector: bool = False) -> None:
        """Serve `request` without its artifacts: matched by its anchors, refused, output guarded. The
        refusal is in place before what a failed load left half-done is taken out, so no prompt finds
        the request unserved in between."""
        refused = request.model_copy(update={"method": Method.refuse})
        with self._fallback_lock:
            self._fallback.add(request.id, extract_anchors(request.spec))
        self.interventions[Method.refuse.value].load(refused, self.registry.artifact_dir(request.id))
        self.output_guard.load(request)
        self.degraded[request.id] = error
        self.active[request.id] = refused
        if not keep_detector:  # a detector that loaded keeps flagging (topic requests have few anchors)
            self.detector.unload(request.id)
        if request.method != Method.refuse:
            self.interventions[request.method.value].unload(request.id)

    def _recovered(self, request: ForgetRequest) -> None:
        """A degraded request whose artifacts now load: drop its fallback (after `_load` replaced it)."""
        if self.degraded.pop(request.id, None) is not None:
            with self._fallback_lock:
                self._fallback.remove(request.id)
            if request.method != Method.refuse:
                self.interventions[Method.refuse.value].unload(request.id)

    def _prune_counts(self, wanted: set[str]) -> None:
        """A replica serving for months keeps counts only for requests still registered and served (a call in
        flight while its request was removed may count once more; the next round that changes anything drops
        it). `wanted`: the ids this round serves, refused by name until trained included."""
        for counts in (self.routed, self.output_blocks):
            for request_id in [rid for rid in counts if rid not in wanted]:
                del counts[request_id]

    async def sync(self) -> None:
        """Load `ready`/`active` requests not yet served; unload those no longer active. A round whose
        registry fingerprint is unchanged reads nothing more; otherwise it reads (id, status, updated_at) of
        every request and the full record of those that are new or changed: re-reading a thousand
        requests' QA every half second took 40% of the front-end's CPU."""
        async with self._sync_lock:
            fingerprint = await asyncio.to_thread(self.registry.fingerprint)
            if fingerprint == self._fingerprint and not self.degraded:
                return  # nothing registered, removed or changed, and no load to try again
            versions = await asyncio.to_thread(
                self.registry.versions,
                [Status.ready, Status.active, Status.degraded, Status.pending, Status.training, Status.failed],
            )
            # a registered request is enforced at once: until its own artifacts serve it (pending, training, a
            # training that failed, a re-training) it is matched by its names, titles and dates and refused
            wanted = {request_id for request_id, _, _ in versions}
            for request_id in list(self.active):
                if request_id not in wanted:
                    self._unload(request_id)
                    self._synced.pop(request_id, None)
                    await self.engine.unload_adapters(request_id)
                    await self.engine.delete_adapters(request_id)  # from a folder the servers resolve them from
                    await asyncio.to_thread(self.registry.drop_cache, request_id)  # a store's copy goes too
                    log.info("unloaded forget request %s", request_id)
            self._prune_counts(wanted)
            changed = [(rid, (status, at)) for rid, status, at in versions if self._needs_sync(rid, status, at)]
            changed.sort(key=lambda item: item[1][0] not in _UNTRAINED_VALUES)  # the cheap ones first
            settled = True  # every changed request synced: the next rounds may skip until the registry changes
            seen = fingerprint
            for request_id, version in changed:
                if version[0] not in _UNTRAINED_VALUES:  # an artifact load may take seconds:
                    seen = await self._refuse_new_registrations(seen)  # a request registered meanwhile won't wait
                settled = await self._sync_changed(request_id, version) and settled
            if changed:
                await asyncio.to_thread(self.output_guard.prepare)
            # read before the versions: a change in between is seen next round
            self._fingerprint = fingerprint if settled else None
            counts = self.counts()
            prometheus.ACTIVE_REQUESTS.set(counts["active"])
            prometheus.DEGRADED_REQUESTS.set(counts["degraded"])
            prometheus.UNTRAINED_REQUESTS.set(counts["untrained"])

    async def _refuse_new_registrations(self, seen: tuple) -> tuple:
        """Within a sync round, before each artifact load: a request registered since `seen` (the registry's
        fingerprint) is refused by name at once, not after the round's other loads (a LoRA into a remote
        engine can take seconds each). Returns the fingerprint now seen."""
        fingerprint = await asyncio.to_thread(self.registry.fingerprint)
        if fingerprint == seen:
            return seen
        for request_id, status, at in await asyncio.to_thread(self.registry.versions, list(UNTRAINED)):
            if request_id not in self.active:  # a failure is tried again next round: its fingerprint is older
                await self._sync_changed(request_id, (status, at))
        return fingerprint

    async def _sync_changed(self, request_id: str, version: tuple[str, float]) -> bool:
        """Read and serve one new or changed request; False when serving it failed (tried again at the next
        sync). One request that cannot even be refused by name does not stop the others."""
        try:
            request = await asyncio.to_thread(self.registry.get, request_id)
        except KeyError:  # removed since the versions were read: the next round unloads it
            return True
        try:
            await self._sync_one(request)
        except Exception:
            log.exception("serving forget request %s failed; tried again at the next sync", request_id)
            return False
        self._synced[request_id] = version
        return True

    def _needs_sync(self, request_id: str, status: str, updated_at: float) -> bool:
        """Whether a request must be read and synced: new or changed since its last sync, not served, or
        served degraded while its registry status says trained (a load to try again)."""
        if self._synced.get(request_id) != (status, updated_at) or request_id not in self.active:
            return True
        return request_id in self.degraded and status in (Status.ready.value, Status.active.value)

    async def _sync_one(self, request: ForgetRequest) -> None:
        if request.status in UNTRAINED:
            if request.id not in self.active:
                error = request.error if _load_failed(request.error) else NOT_TRAINED
                await asyncio.to_thread(self._load_degraded, request, error)
                if request.status == Status.failed and _load_failed(request.error):  # an older version's
                    self.registry.set_status(
                        request.id, Status.degraded, request.error, expect=Status.failed, actor="server"
                    )
            return
        retry = request.id in self.degraded and request.status in (Status.ready, Status.active)
        if request.id in self.active and not retry:
            return  # served (a degraded one is tried again once trained, here or by another server)
        try:
            await asyncio.to_thread(self._load, request)
            await self._engine_load(request)
        except LoadFailure as failure:  # a bad artifact: this request fails closed, the others go on
            cause = failure.cause
            error = f"{LOAD_FAILED}{type(cause).__name__}: {cause}"
            log.error("loading forget request %s failed (%s): serving it degraded, refused", request.id, error)
            await asyncio.to_thread(self._load_degraded, request, error, failure.detector_loaded)
            self.registry.set_status(request.id, Status.degraded, error, expect=request.status, actor="server")
            return
        except EngineUnavailable as unavailable:  # refused meanwhile, tried again at the next sync
            log.warning("forget request %s waits for the engine (%s): refused meanwhile", request.id, unavailable)
            await asyncio.to_thread(self._load_degraded, request, f"{LOAD_FAILED}{unavailable}", True)
            return
        except StoreUnavailable as unavailable:  # the same, for the artifact store
            log.warning(
                "forget request %s waits for the artifact store (%s): refused meanwhile", request.id, unavailable
            )
            await asyncio.to_thread(self._load_degraded, request, f"{LOAD_FAILED}{unavailable}", False)
            return
        self.active[request.id] = request
        self._recovered(request)
        if request.status in (Status.ready, Status.degraded):
            self.registry.set_status(request.id, Status.active, expect=request.status, actor="server")
        log.info("serving forget request %s (%s, route %s)", request.id, request.name, request.method.value)

    def counts(self) -> dict[str, int]:
        """Served requests: `active` (with artifacts that loaded, or refused after a load failure),
        `degraded` (a load failure: refused by name until re-trained), `untrained` (refused by name until
        first trained). Read from snapshots: the sync changes both maps from a worker thread."""
        active, degraded = set(self.active), dict(self.degraded)
        untrained = {rid for rid, error in degraded.items() if not _load_failed(error) and rid in active}
        failed = sum(1 for error in degraded.values() if _load_failed(error))
        return {"active": len(active - untrained), "degraded": failed, "untrained": len(untrained)}

    async def sync_forever(self, interval_s: float = 0.5) -> None:
        """Sync every `interval_s`, and at once when the registry says it changed (`notify_changed`)."""
        self._changed = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        while True:
            self._changed.clear()
            try:
                await self.sync()
            except Exception:
                log.exception("registry sync failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), interval_s)

    def notify_changed(self) -> None:
        """Another process changed the registry (called from the listener thread): sync now."""
        loop, changed = getattr(self, "_loop", None), getattr(self, "_changed", None)
        if loop is not None and changed is not None:
            loop.call_soon_threadsafe(changed.set)
