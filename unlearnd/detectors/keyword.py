"""Placeholder detector: the request's entity names, matched whole or in part, case-insensitively.

It is the simplest honest baseline (a keyword filter) and the default until the embedding
and OOD detectors are registered; it also provides the entity spans ECO corrupts.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from unlearnd.artifacts import write_json_atomic
from unlearnd.detectors.base import Detection, Detector, RequestMatch, register_detector
from unlearnd.detectors.spans import merge_spans
from unlearnd.domain import ForgetRequest

_STOPWORDS = {"the", "and", "of", "von", "van", "de", "der", "la", "le", "del", "al", "bin", "ibn"}


def _terms(entity: str) -> list[str]:
    """Distinctive parts of a name (e.g. the surname alone still flags)."""
    parts = re.findall(r"[\w'-]+", entity)
    return [p for p in parts if len(p) >= 4 and p.lower() not in _STOPWORDS]


def _pattern(term: str) -> re.Pattern:
    return re.compile(r"(?<!\w)" + re.escape(term) + r"(?!\w)", re.IGNORECASE)


@register_detector
class KeywordDetector(Detector):
    name = "keyword"
    FULL_SCORE = 1.0
    PART_SCORE = 0.75
    threshold = 0.5

    def __init__(self, config: dict | None = None) -> None:  # nothing to configure: names only
        self._requests: dict[str, list[tuple[re.Pattern, float]]] = {}

    def fit(self, request: ForgetRequest, artifact_dir: Path) -> dict:
        entities = request.spec.entities
        payload = {
            "detector": self.name,
            "entities": entities,
            "terms": sorted({t for e in entities for t in _terms(e)}),
        }
        write_json_atomic(Path(artifact_dir) / "detector.json", payload)
        return {"entities": len(entities), "terms": len(payload["terms"])}

    def load(self, request: ForgetRequest, artifact_dir: Path) -> None:
        payload = json.loads((artifact_dir / "detector.json").read_text())
        patterns = [(_pattern(e), self.FULL_SCORE) for e in payload["entities"]]
        patterns += [(_pattern(t), self.PART_SCORE) for t in payload["terms"]]
        self._requests[request.id] = patterns

    def unload(self, request_id: str) -> None:
        self._requests.pop(request_id, None)

    @property
    def loaded_ids(self) -> set[str]:
        return set(self._requests)

    def detect(self, texts: list[str]) -> list[Detection]:
        results = []
        for text in texts:
            matches = []
            for request_id, patterns in self._requests.items():
                score, spans = 0.0, []
                for pattern, weight in patterns:
                    for found in pattern.finditer(text):
                        score = max(score, weight)
                        spans.append(found.span())
                if score >= self.threshold:
                    matches.append(RequestMatch(request_id, score, 1.0, merge_spans(spans)))
            matches.sort(key=lambda m: -m.score)
            results.append(Detection(max((m.score for m in matches), default=0.0), matches))
        return results
