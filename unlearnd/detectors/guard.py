"""The default detector ("guard"): precise about WHO a prompt is about.

A forget request about a person (or a book) is matched by its anchors (`anchors`: the name in any
disguise, its titles, a birth date), not by the shape of the question: the same question about
somebody else shares every word but the name. So for such a request ("entity mode", chosen at fit
time because its own examples carry anchors):

* a prompt with an anchor (the whole name, two distinctive name parts, a title, a full date) is
  flagged; a look-alike name two letters off, or a name part next to another name, is not;
* a prompt naming only one part of the name ("What did Nakamura write?") is flagged only when it
  also asks what the request's questions ask: with the name masked on both sides ("What did this
  person write?"), its max cosine to the request's masked questions passes a threshold calibrated
  at fit time on near misses (a name part used without the person, "What does the surname ...
  mean?", `data/near_miss.txt`), and checked on the request's own questions (leave one out);
* a prompt with no anchor is flagged only when it holds two of the request's distinctive fact words
  (`facts`: "the author whose father was a florist, winner of the Goncourt"); its topic alone says
  nothing about who it is about.

A request whose examples mostly carry no anchor (a topic such as a hazardous technique: "topic
mode") is also flagged by the embedding detector, calibrated on built-in negatives and on its own
questions with the subject swapped. The match score is the anchor's (1.0 name, title or date;
0.95 one typo; 0.9 name parts; 0.8 confirmed part) or the embedding detector's normalised score;
the weight is the OOD detector's soft weight, never below the anchor score, for requests whose route
scales by it (the method table's `scales_by_weight`: O3's LoRA), else the score. The sentence
encoder runs only for prompts that need it (a name part to confirm, a weight a route uses,
topic-mode requests), so ordinary prompts, and most flagged ones, cost a string match.
"""

from __future__ import annotations

import logging
import threading
import time
from importlib import resources
from pathlib import Path

import numpy as np
from pydantic import BaseModel, Field

from unlearnd.artifacts import read_json, write_json_atomic, write_npz_atomic
from unlearnd.detectors.anchors import (
    FLAG_SCORE,
    AnchorHit,
    AnchorIndex,
    RequestAnchors,
    extract_anchors,
)
from unlearnd.detectors.base import Detection, Detector, RequestMatch, artifact_path, register_detector
from unlearnd.detectors.calibration import conformal_threshold
from unlearnd.detectors.embedding import EmbeddingConfig, EmbeddingDetector
from unlearnd.detectors.encoder import EncoderConfig
from unlearnd.detectors.facts import FACTS_SCORE, FactIndex
from unlearnd.detectors.normalize import views as decoded_views
from unlearnd.detectors.ood import OODConfig, OODDetector
from unlearnd.detectors.views import expand, max_by_owner
from unlearnd.domain import ForgetRequest, ForgetSpec
from unlearnd.elicit import read_elicited
from unlearnd.methods import METHODS

log = logging.getLogger(__name__)

CONFIRMED_PART_SCORE = 0.8
PERSON = "this person"  # what a name is replaced by for the topic check of a lone name part
PART_REFS = "part_refs.npz"


def mask(text: str, spans: list[tuple[int, int]]) -> str:
    """`text` with every span (a name, or one part of it) replaced by `PERSON`."""
    out, last = [], 0
    for start, end in sorted(spans):
        out += [text[last:start], PERSON]
        last = end
    return "".join(out) + text[last:]


class GuardConfig(BaseModel):
    encoder: EncoderConfig = Field(default_factory=EncoderConfig)
    target_fpr: float = Field(0.01, gt=0, lt=1)
    chat_part: str = "all"
    chat_limit: int = 0
    max_views: int = 12
    topic_below: float = Field(
        0.5,
        description="anchor coverage of the forget questions below which the "
        "request is a topic (the embedding detector flags too)",
    )
    part_fpr: float = Field(0.01, gt=0, lt=1, description="target FPR of the one-name-part check on its near misses")
    part_floor: float = Field(0.6, description="lowest cosine that confirms a lone name part")
    use_ood: bool = True
    embedding: dict = Field(default_factory=dict, description="extra EmbeddingConfig fields")
    ood: dict = Field(default_factory=dict, description="extra OODConfig fields")


def near_miss_templates() -> list[str]:
    text = resources.files("unlearnd.detectors").joinpath("data", "near_miss.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


@register_detector
class GuardDetector(Detector):
    name = "guard"

    def __init__(self, config: GuardConfig | dict | None = None, **overrides) -> None:
        cfg = config if isinstance(config, GuardConfig) else GuardConfig(**(config or {}))
        self.cfg = cfg.model_copy(update=overrides) if overrides else cfg
        shared = {
            "encoder": self.cfg.encoder,
            "target_fpr": self.cfg.target_fpr,
            "chat_part": self.cfg.chat_part,
            "chat_limit": self.cfg.chat_limit,
            "max_views": self.cfg.max_views,
        }
        self.embedding = EmbeddingDetector(EmbeddingConfig(**{**shared, **self.cfg.embedding}))
        self.ood = OODDetector(OODConfig(**{**shared, **self.cfg.ood}))
        self._anchors: AnchorIndex | None = None
        self._facts = FactIndex()  # two distinctive facts of a subject named nowhere in the prompt
        self._topic: set[str] = set()
        self._part_threshold: dict[str, float] = {}
        self._part_refs: dict[str, np.ndarray] = {}  # masked forget questions (topic check of a lone part)
        self._weighted: set[str] = set()  # requests whose route scales by the match weight (O3 LoRA)
        self._order: list[str] = []
        self._lock = threading.Lock()

    @property
    def encoder(self):
        return self.embedding.encoder

    @property
    def anchors(self) -> AnchorIndex:
        if self._anchors is None:
            self._anchors = AnchorIndex()
        return self._anchors

    @property
    def loaded_ids(self) -> set[str]:
        return set(self._order)

    # ---- offline -------------------------------------------------------------------------
    def fit(self, request: ForgetRequest, artifact_dir: Path) -> dict:
        start = time.perf_counter()
        elicited = read_elicited(artifact_dir)
        anchors = extract_anchors(request.spec, elicited)
        topic = (anchors.coverage or 0.0) < self.cfg.topic_below
        metrics: dict = {
            "anchors": {
                "names": anchors.names,
                "titles": len(anchors.titles),
                "dates": len(anchors.dates),
                "coverage": anchors.coverage,
                "facts": len(anchors.facts),
                "elicited_replies": len(elicited),
            },
            "mode": "topic" if topic else "entity",
        }
        parts = self.parts_needed(request, topic)
        if "embedding" in parts:
            metrics["embedding"] = self.embedding.fit(request, artifact_dir)
        if "ood" in parts:
            metrics["ood"] = self.ood.fit(request, artifact_dir)
        part, part_refs = self._calibrate_part_check(request.spec, anchors)
        metrics["part_check"] = {k: v for k, v in part.items() if k != "threshold"}
        write_npz_atomic(artifact_path(artifact_dir, self.name) / PART_REFS, refs=part_refs)
        metrics["fit_seconds"] = round(time.perf_counter() - start, 2)
        payload = {
            "detector": self.name,
            "version": 2,
            "request_id": request.id,
            "config": self.cfg.model_dump(),
            "anchors": anchors.model_dump(),
            "mode": metrics["mode"],
            "parts": parts,
            "part_threshold": part["threshold"],
            "metrics": metrics,
        }
        write_json_atomic(artifact_path(artifact_dir, self.name) / "config.json", payload)
        log.info("guard detector for %s: %s", request.id, metrics)
        return metrics

    def parts_needed(self, request: ForgetRequest, topic: bool) -> list[str]:
        """The encoder-based parts this request uses when serving: the embedding detector flags only
        for topic requests, the OOD weight only scales routes that read it (O3's LoRA). An entity
        request for any other route needs neither, so its activation costs a string index and the
        lone-part check (well under a second of CPU instead of ~1 s, or ~4 s in a fresh worker)."""
        entry = METHODS.get(request.method.value)
        parts = ["embedding"] if topic else []
        if self.cfg.use_ood and entry is not None and entry.scales_by_weight:
            parts.append("ood")
        return parts

    def _calibrate_part_check(self, spec: ForgetSpec, anchors: RequestAnchors) -> tuple[dict, np.ndarray]:
        """The topic check of a prompt naming one part of the name. Names are masked on both sides
        (`PERSON`), so the check compares what is asked, not whose name it is: the request's questions,
        masked, are the references; the threshold is a conformal cut on the near misses (that part used
        without the person, `data/near_miss.txt`), floored; its recall is measured on the request's own
        questions against the other questions (leave one out)."""
        questions = [x.question for x in ForgetSpec.as_qa(spec.forget)]
        index = AnchorIndex()
        index.add("self", anchors)
        hits = [index.find(q).get("self") for q in questions]
        refs = [mask(q, h.spans if h is not None else []) for q, h in zip(questions, hits, strict=True)]
        named = np.asarray([h is not None and h.kind in ("name", "name_typo") for h in hits])
        near = [t.format(part=PERSON) for t in near_miss_templates()]
        enc = self.encoder.encode(refs + near).emb
        ref_emb, near_emb = enc[: len(refs)], enc[len(refs) :]
        near_scores = (near_emb @ ref_emb.T).max(1)
        threshold = max(self.cfg.part_floor, conformal_threshold(near_scores, self.cfg.part_fpr))
        sims = ref_emb @ ref_emb.T
        np.fill_diagonal(sims, -1.0)  # leave its own question out
        pos_scores = sims.max(1)[named] if len(refs) > 1 else np.zeros(0)
        summary = {
            "threshold": float(threshold),
            "near_misses": len(near),
            "positives": int(len(pos_scores)),
            "fpr": float((near_scores > threshold).mean()),
            "tpr": float((pos_scores > threshold).mean()) if len(pos_scores) else None,
        }
        return summary, ref_emb.astype(np.float32)

    # ---- serving -------------------------------------------------------------------------
    def load(self, request: ForgetRequest, artifact_dir: Path) -> None:
        payload = read_json(artifact_path(artifact_dir, self.name) / "config.json")
        anchors = RequestAnchors(**payload["anchors"]) if "anchors" in payload else extract_anchors(request.spec)
        # Artifacts written before `parts` was recorded hold both parts.
        parts = payload.get("parts", ["embedding", "ood"])
        if "embedding" in parts:
            self.embedding.load(request, artifact_dir)
        else:
            self.embedding.unload(request.id)
        if self.cfg.use_ood and "ood" in parts:
            self.ood.load(request, artifact_dir)
        else:
            self.ood.unload(request.id)
        with self._lock:
            self.anchors.add(request.id, anchors)
            self._facts.add(request.id, anchors.facts)
            self._part_threshold[request.id] = float(payload.get("part_threshold", 1.0))
            refs_path = artifact_path(artifact_dir, self.name) / PART_REFS
            if refs_path.exists():
                self._part_refs[request.id] = np.load(refs_path)["refs"]
            else:  # an artifact of an older guard: no lone-part topic check
                self._part_refs.pop(request.id, None)
            entry = METHODS.get(request.method.value)
            if entry is not None and entry.scales_by_weight:
                self._weighted.add(request.id)
            else:
                self._weighted.discard(request.id)
            if payload.get("mode", "topic") == "topic":
                self._topic.add(request.id)
            else:
                self._topic.discard(request.id)
            if request.id not in self._order:
                self._order.append(request.id)

    def unload(self, request_id: str) -> None:
        self.embedding.unload(request_id)
        self.ood.unload(request_id)
        with self._lock:
            if self._anchors is not None:
                self._anchors.remove(request_id)
            self._facts.remove(request_id)
            self._topic.discard(request_id)
            self._weighted.discard(request_id)
            self._part_threshold.pop(request_id, None)
            self._part_refs.pop(request_id, None)
            if request_id in self._order:
                self._order.remove(request_id)

    def detect(self, texts: list[str]) -> list[Detection]:
        if not self._order:
            return [Detection(0.0) for _ in texts]
        hits = [self._find(text) for text in texts]
        topic = self._part_topic(texts, hits)
        # the encoder runs for an OOD weight a route uses, or for topic requests
        need = [i for i, h in enumerate(hits) if self._topic or any(rid in self._weighted for rid in h)]
        encoded = self._encode([texts[i] for i in need]) if need else None
        rows = {i: r for r, i in enumerate(need)}
        results = []
        for i, text_hits in enumerate(hits):
            row = rows.get(i)
            matches = []
            best = 0.0
            for request_id, hit in text_hits.items():
                score = hit.score
                if score < FLAG_SCORE:  # one name part: on the request's topic?
                    if topic.get((i, request_id), -1.0) <= self._part_threshold.get(request_id, 1.0):
                        best = max(best, hit.score)
                        continue
                    score = CONFIRMED_PART_SCORE
                weight = self._weight(encoded, row, request_id, score)
                matches.append(RequestMatch(request_id, score, weight=weight, spans=list(hit.spans)))
            if row is not None and self._topic:
                for request_id in self._topic:
                    if any(m.request_id == request_id for m in matches):
                        continue
                    raw, thr, norm = (encoded[k].get(request_id) for k in ("raw", "thr", "norm"))
                    if raw is not None and raw[row] > thr:
                        score = float(norm[row])
                        matches.append(RequestMatch(request_id, score, self._weight(encoded, row, request_id, score)))
            for m in matches:
                best = max(best, m.score)
            matches.sort(key=lambda m: -m.score)
            results.append(Detection(best, matches))
        return results

    def _find(self, text: str) -> dict[str, AnchorHit]:
        """The anchors' hits in `text`, with a fact-pair hit for each request whose anchors found less (the
        text's decoded views made once for both)."""
        text_views = decoded_views(text)
        hits = self.anchors.find(text, text_views)
        for request_id, held in self._facts.find(text, text_views).items():
            if request_id not in hits or hits[request_id].score < FACTS_SCORE:
                hits[request_id] = AnchorHit(FACTS_SCORE, "facts", entity=" + ".join(held))
        return hits

    def _part_topic(self, texts: list[str], hits: list[dict]) -> dict[tuple[int, str], float]:
        """(text, request) -> max cosine of the text, its name part masked, to the request's masked
        questions; for each lone name part found as written (a part found only in a decoded view is no
        evidence of the person)."""
        todo = [
            (i, rid, mask(texts[i], hit.spans))
            for i, text_hits in enumerate(hits)
            for rid, hit in text_hits.items()
            if hit.score < FLAG_SCORE and hit.spans and rid in self._part_refs
        ]
        if not todo:
            return {}
        flat, owner = expand([m for _, _, m in todo], self.cfg.max_views)
        emb = self.encoder.encode(flat).emb
        out = {}
        for k, (i, rid, _) in enumerate(todo):
            views = emb[owner == k]
            out[(i, rid)] = float((views @ self._part_refs[rid].T).max())
        return out

    def _weight(self, encoded: dict | None, row: int | None, request_id: str, score: float) -> float:
        if request_id not in self._weighted or encoded is None or row is None:
            return float(score)
        weights = encoded["weight"].get(request_id)
        return float(max(weights[row], score)) if weights is not None else float(score)

    def _encode(self, texts: list[str]) -> dict:
        """Per request (by id), arrays over `texts`: OOD weight, and for topic
        requests the embedding detector's raw score, threshold and normalised score."""
        flat, owner = expand(texts, self.cfg.max_views)
        enc = self.encoder.encode(flat)
        out: dict = {
            "weight": {},
            "raw": {},
            "thr": {},
            "norm": {},
        }
        if self.cfg.use_ood:
            ood_order, ood_views = self.ood.score_views(enc.layers)
            weights = self.ood.weights(max_by_owner(ood_views, owner, len(texts)))
            out["weight"] = {rid: weights[:, j] for j, rid in enumerate(ood_order)}
        if self._topic:
            order, raw_views = self.embedding.score_views(enc.emb)
            raw = max_by_owner(raw_views, owner, len(texts))
            thr, _ = self.embedding.thresholds(strict=True)
            norm = self.embedding.normalise(raw, np.tile(thr, (len(texts), 1)))
            for j, rid in enumerate(order):
                if rid in self._topic:
                    out["raw"][rid], out["thr"][rid], out["norm"][rid] = raw[:, j], float(thr[j]), norm[:, j]
        return out
