"""The default detector ("guard"): embedding detector + OOD soft weight + fuzzy entity spans.

A prompt is flagged for a request when either
  * its embedding score (max over the prompt's views: whole prompt, sentences, windows) passes the
    request's calibrated threshold -- this catches paraphrases that never say the name, or
  * it names the request's target (fuzzy: case, typos, diacritics, surname alone) -- this catches
    the name in any wording, language or wrapper, where an English sentence encoder is weakest.
The match score is max(normalised embedding score, entity score): 0.5 is exactly the embedding
threshold, a full name scores 1.0 and a lone surname 0.75. The weight is the OOD detector's soft
weight w in [0, 1] (how typical of the forget examples the prompt is), raised to the entity score
when the target is named. One encoder pass per prompt view serves all three parts, and all
loaded requests are scored together.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
from pydantic import BaseModel, Field

from unlearnd.artifacts import write_json_atomic
from unlearnd.detectors.base import (
    Detection,
    Detector,
    RequestMatch,
    artifact_path,
    register_detector,
)
from unlearnd.detectors.embedding import EmbeddingConfig, EmbeddingDetector
from unlearnd.detectors.encoder import EncoderConfig
from unlearnd.detectors.ood import OODConfig, OODDetector
from unlearnd.detectors.spans import (
    FUNCTION_WORDS,
    PART_SCORE,
    STOPWORDS,
    SpanIndex,
    fold,
    tokens,
)
from unlearnd.detectors.views import expand, max_by_owner
from unlearnd.spec import ForgetRequest

log = logging.getLogger(__name__)

_CALENDAR = {
    "january",
    "february",
    "march",
    "april",
    "may",
    "june",
    "july",
    "august",
    "september",
    "october",
    "november",
    "december",
    "monday",
    "tuesday",
    "wednesday",
    "thursday",
    "friday",
    "saturday",
    "sunday",
}


def name_tokens(text: str, common_words: set[str]) -> list[tuple[str, int, int]]:
    """Capitalised words that name something (not a sentence-initial ordinary word, not a month)."""
    toks = tokens(text)
    out = []
    for i, (word, start, end) in enumerate(toks):
        if not word[:1].isupper():
            continue
        folded = fold(word)
        if folded in FUNCTION_WORDS or folded in STOPWORDS or folded in _CALENDAR or len(folded) < 2:
            continue
        sentence_start = i == 0 or any(c in text[toks[i - 1][2] : start] for c in ".!?\n:\"'")
        if sentence_start and folded in common_words:
            continue
        out.append((folded, start, end))
    return out


class GuardConfig(BaseModel):
    encoder: EncoderConfig = Field(default_factory=EncoderConfig)
    target_fpr: float = Field(0.01, gt=0, lt=1)
    chat_part: str = "all"
    chat_limit: int = 0
    max_views: int = 12
    entity_threshold: float = Field(PART_SCORE, description="entity score that flags on its own")
    use_entities: bool = True
    use_ood: bool = True
    strict_for_other_names: bool = Field(
        True,
        description="use the embedding threshold calibrated on questions about somebody else when the "
        "prompt names a person or thing that the request's forget data never mentions",
    )
    embedding: dict = Field(default_factory=dict, description="extra EmbeddingConfig fields")
    ood: dict = Field(default_factory=dict, description="extra OODConfig fields")


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
        self._spans: SpanIndex | None = None
        self._known_cache: dict[str, set[str]] = {}
        self._order: list[str] = []

    @property
    def encoder(self):
        return self.embedding.encoder

    @property
    def spans(self) -> SpanIndex:
        if self._spans is None:
            self._spans = SpanIndex(self.encoder.vocabulary())
        return self._spans

    @property
    def loaded_ids(self) -> set[str]:
        return set(self._order)

    def fit(self, request: ForgetRequest, artifact_dir: Path) -> dict:
        start = time.perf_counter()
        metrics = {"embedding": self.embedding.fit(request, artifact_dir)}
        if self.cfg.use_ood:
            metrics["ood"] = self.ood.fit(request, artifact_dir)
        metrics["fit_seconds"] = round(time.perf_counter() - start, 2)
        out = artifact_path(artifact_dir, self.name)
        payload = {
            "detector": self.name,
            "version": 1,
            "request_id": request.id,
            "config": self.cfg.model_dump(),
            "entities": request.spec.entities,
            "metrics": metrics,
        }
        write_json_atomic(out / "config.json", payload)
        return metrics

    def load(self, request: ForgetRequest, artifact_dir: Path) -> None:
        self._known_cache.pop(request.id, None)
        payload = json.loads((artifact_path(artifact_dir, self.name) / "config.json").read_text())
        self.embedding.load(request, artifact_dir)
        if self.cfg.use_ood:
            self.ood.load(request, artifact_dir)
        if self.cfg.use_entities:
            self.spans.add(request.id, request.spec.entities or payload.get("entities") or [])
        if request.id not in self._order:
            self._order.append(request.id)

    def unload(self, request_id: str) -> None:
        self._known_cache.pop(request_id, None)
        self.embedding.unload(request_id)
        self.ood.unload(request_id)
        if self._spans is not None:
            self._spans.remove(request_id)
        if request_id in self._order:
            self._order.remove(request_id)

    def _thresholds(self, texts: list[str], order: list[str], entities: list[dict]) -> np.ndarray:
        """(n, R) embedding thresholds: strict where the prompt names something the request's
        forget data never mentions (a question about somebody else), the ordinary one otherwise."""
        loose, _ = self.embedding.thresholds()
        out = np.tile(loose, (len(texts), 1))
        if not self.cfg.strict_for_other_names:
            return out
        strict, _ = self.embedding.thresholds(strict=True)
        common = self.spans.common_words
        for i, text in enumerate(texts):
            names = name_tokens(text, common)
            if not names:
                continue
            for j, rid in enumerate(order):
                known = self._known(rid)
                covered = entities[i].get(rid, (0.0, []))[1]
                if any(not self._is_known(w, known) and not any(s <= a < e for s, e in covered) for w, a, _ in names):
                    out[i, j] = strict[j]
        return out

    def _known(self, request_id: str) -> set[str]:
        """The request's known capitalised words plus their one-deletion variants (typo lookup)."""
        if request_id not in self._known_cache:
            words = self.embedding.known_words.get(request_id, set())
            self._known_cache[request_id] = words | {
                w[:k] + w[k + 1 :] for w in words if len(w) >= 5 for k in range(len(w))
            }
        return self._known_cache[request_id]

    @staticmethod
    def _is_known(word: str, known: set[str]) -> bool:
        """Known, or one typo away from a known word of 5+ letters ('Jararh' for 'Jarrah')."""
        if word in known:
            return True
        if len(word) < 5:
            return False
        return any(word[:k] + word[k + 1 :] in known for k in range(len(word)))

    def detect(self, texts: list[str]) -> list[Detection]:
        if not self._order:
            return [Detection(0.0) for _ in texts]
        flat, owner = expand(texts, self.cfg.max_views)
        enc = self.encoder.encode(flat)
        order, emb_views = self.embedding.score_views(enc.emb)
        raw = max_by_owner(emb_views, owner, len(texts))
        entities = [self.spans.find(t) if self.cfg.use_entities else {} for t in texts]
        thr = self._thresholds(texts, order, entities)
        emb_score = self.embedding.normalise(raw, thr)
        if self.cfg.use_ood:
            ood_order, ood_views = self.ood.score_views(enc.layers)
            assert ood_order == order, "embedding and OOD parts must hold the same requests"
            weight = self.ood.weights(max_by_owner(ood_views, owner, len(texts)))
        else:
            weight = np.ones_like(emb_score)
        column = {rid: j for j, rid in enumerate(order)}
        results = []
        for i, text in enumerate(texts):
            entity = entities[i]
            matches = []
            best = float(emb_score[i].max()) if len(order) else 0.0
            flagged = set(np.flatnonzero(raw[i] > thr[i]).tolist())
            named = {
                column[rid]: hit for rid, hit in entity.items() if rid in column and hit[0] >= self.cfg.entity_threshold
            }
            for j in sorted(flagged | set(named)):
                ent_score, spans = named.get(j, (0.0, []))
                if j not in named and order[j] in entity:  # spans below the flag level still help ECO
                    spans = entity[order[j]][1]
                score = max(float(emb_score[i, j]), ent_score)
                matches.append(
                    RequestMatch(order[j], score, weight=float(max(weight[i, j], ent_score)), spans=list(spans))
                )
                best = max(best, score)
            matches.sort(key=lambda m: -m.score)
            results.append(Detection(best, matches))
        return results
