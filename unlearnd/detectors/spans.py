"""Fuzzy entity spans: where a prompt names the forget target, tolerant to case, typos, diacritics
and partial names ("Vasquez" for "Jaime Vasquez").

ECO corrupts exactly these character spans, and the guard treats a confident span as evidence on
its own. A lone name part is discounted when it sits next to a capitalised word that is not part
of the entity ("Maria Vasquez" is another person than "Jaime Vasquez"), a part that is also a
common lower-case word only counts when capitalised, so common surnames do not fire on prose, and a
lone part matched through a typo does not count when the prompt's word is a known word itself.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

_TOKEN = re.compile(r"[^\W_]+(?:['’][^\W_]+)?", re.UNICODE)
STOPWORDS = {
    "the",
    "and",
    "of",
    "von",
    "van",
    "de",
    "der",
    "la",
    "le",
    "del",
    "al",
    "bin",
    "ibn",
    "da",
    "di",
    "du",
    "el",
    "mr",
    "mrs",
    "ms",
    "dr",
    "jr",
    "sr",
    "st",
}

# capitalised only because they start a sentence: never evidence of another person's name
FUNCTION_WORDS = {
    "what",
    "who",
    "whom",
    "whose",
    "where",
    "when",
    "why",
    "how",
    "which",
    "is",
    "are",
    "was",
    "were",
    "do",
    "does",
    "did",
    "can",
    "could",
    "would",
    "should",
    "will",
    "has",
    "have",
    "had",
    "tell",
    "describe",
    "explain",
    "give",
    "list",
    "name",
    "please",
    "about",
    "and",
    "but",
    "or",
    "so",
    "if",
    "in",
    "on",
    "at",
    "for",
    "from",
    "with",
    "by",
    "to",
    "as",
    "a",
    "an",
    "i",
    "we",
    "you",
    "he",
    "she",
    "they",
    "it",
    "my",
    "your",
    "his",
    "her",
    "their",
    "its",
    "our",
    "this",
    "that",
    "these",
    "those",
    "author",
    "writer",
    "novelist",
    "poet",
    "book",
    "books",
    "mr",
    "mrs",
    "ms",
    "dr",
    "professor",
    "prof",
    "sir",
    "madam",
    "ignore",
    "now",
    "then",
    "also",
    "hi",
    "hello",
    "hey",
    "dear",
    "yes",
    "no",
    "ok",
    "okay",
}

FULL_SCORE = 1.0  # every part of the name, in order
MULTI_SCORE = 0.9  # two or more consecutive parts
PART_SCORE = 0.75  # one distinctive part (surname or first name alone)
CONFLICT_SCORE = 0.4  # one part, next to a different capitalised name


def fold(text: str) -> str:
    """Lower-case and strip diacritics ("Müller" -> "muller")."""
    norm = unicodedata.normalize("NFKD", text)
    return "".join(c for c in norm if not unicodedata.combining(c)).lower()


def tokens(text: str) -> list[tuple[str, int, int]]:
    """Word tokens with character offsets; hyphens split words, apostrophe-s stays attached."""
    out = []
    for m in _TOKEN.finditer(text):
        word, start = m.group(0), m.start()
        if re.search(r"['’](s|S)$", word):  # possessive: "Vasquez's"
            word = word[:-2]
        out.append((word, start, start + len(word)))
    return out


def edit_distance(a: str, b: str, limit: int = 2) -> int:
    """Damerau-Levenshtein (optimal string alignment) distance, cut off above `limit`."""
    if abs(len(a) - len(b)) > limit:
        return limit + 1
    prev2: list[int] | None = None
    prev = list(range(len(b) + 1))
    for i in range(1, len(a) + 1):
        cur = [i] + [0] * len(b)
        for j in range(1, len(b) + 1):
            cost = 0 if a[i - 1] == b[j - 1] else 1
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + cost)
            if prev2 is not None and i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                cur[j] = min(cur[j], prev2[j - 2] + 1)
        if min(cur) > limit:
            return limit + 1
        prev2, prev = prev, cur
    return prev[-1]


def allowed_typos(term: str) -> int:
    return 0 if len(term) <= 4 else 1 if len(term) <= 7 else 2


def similar(word: str, term: str) -> bool:
    """Does a (folded) prompt word spell the (folded) name part, up to the typos its length allows?"""
    if word == term:
        return True
    k = allowed_typos(term)
    return k > 0 and len(word) >= 3 and edit_distance(word, term, k) <= k


@dataclass
class EntityPattern:
    """One entity name, split into folded parts; `distinctive` parts may match alone."""

    entity: str
    parts: list[str]
    distinctive: list[bool]


_LIST_SEP = re.compile(r"\s*[,;/&]\s*|\s+and\s+")


def compile_entities(entities: list[str], common_words: set[str] | frozenset = frozenset()) -> list[EntityPattern]:
    """Entity strings -> patterns. A list in one string ("A B, C D and E F", e.g. a request named
    after several people, whose entities default to its name) is split into its names."""
    patterns = []
    for entity in (part for e in entities for part in _LIST_SEP.split(e) if part.strip()):
        parts = [fold(w) for w, _, _ in tokens(entity)]
        if not parts:
            continue
        distinctive = [len(p) >= 4 and p not in STOPWORDS and not p.isdigit() for p in parts]
        patterns.append(EntityPattern(entity, parts, distinctive))
    return patterns


def find_spans(
    text: str, patterns: list[EntityPattern], common_words: set[str] | frozenset = frozenset()
) -> tuple[float, list[tuple[int, int]]]:
    """Best match score and the merged character spans naming any of the entities."""
    toks = tokens(text)
    folded = [fold(w) for w, _, _ in toks]
    best, spans = 0.0, []
    for pat in patterns:
        matched = [[similar(folded[i], part) for part in pat.parts] for i in range(len(toks))]
        i = 0
        while i < len(toks):
            # longest run of consecutive prompt tokens matching consecutive name parts
            run_best, run_len = 0, 0
            for p0 in range(len(pat.parts)):
                n = 0
                while i + n < len(toks) and p0 + n < len(pat.parts) and matched[i + n][p0 + n]:
                    n += 1
                if n > run_len:
                    run_len, run_best = n, p0
            if run_len == 0:
                i += 1
                continue
            if run_len == len(pat.parts):
                score = FULL_SCORE
            else:
                score = _partial_score(text, toks, i, run_len, pat, run_best, common_words)
            if score > 0:
                best = max(best, score)
                if score >= PART_SCORE:
                    spans.append((toks[i][1], toks[i + run_len - 1][2]))
            i += run_len
    return best, merge_spans(spans)


def _partial_score(
    text: str,
    toks: list[tuple[str, int, int]],
    i: int,
    run_len: int,
    pat: EntityPattern,
    part: int,
    common_words: set[str] | frozenset,
) -> float:
    """Score of a run naming only some parts of the entity ("Vasquez", "Ji-Yeon")."""
    if run_len == 1:
        if not pat.distinctive[part] and len(pat.parts) > 1:
            return 0.0
        if pat.parts[part] in common_words and not toks[i][0][:1].isupper():
            return 0.0  # "young", "rivers" as ordinary words
        word = fold(toks[i][0])
        if word != pat.parts[part] and word in common_words:
            return 0.0  # a typo away, but a word of its own: "Brasil" is not a misspelt "Basil"
    for j in (i - 1, i + run_len):  # neighbouring capitalised word that is not this entity: another person
        if not 0 <= j < len(toks):
            continue
        neighbour = toks[j][0]
        lo, hi = (toks[j][2], toks[i][1]) if j < i else (toks[i + run_len - 1][2], toks[j][1])
        between = text[lo:hi]
        folded_n = fold(neighbour)
        if (
            neighbour[:1].isupper()
            and between.strip() in ("", "-")
            and len(between) <= 1
            and folded_n not in STOPWORDS
            and folded_n not in FUNCTION_WORDS
            and not any(similar(folded_n, p) for p in pat.parts)
            and not (j < i and _starts_sentence(text, toks, j) and folded_n in common_words)
        ):
            return CONFLICT_SCORE
    return MULTI_SCORE if run_len >= 2 else PART_SCORE


def _starts_sentence(text: str, toks: list[tuple[str, int, int]], j: int) -> bool:
    if j == 0:
        return True
    gap = text[toks[j - 1][2] : toks[j][1]]
    return any(c in gap for c in ".!?\n:")


def merge_spans(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[list[int]] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(s, e) for s, e in merged]


def _deletes(word: str, depth: int) -> set[str]:
    out, frontier = {word}, {word}
    for _ in range(depth):
        frontier = {w[:i] + w[i + 1 :] for w in frontier for i in range(len(w))}
        out |= frontier
    return out


class SpanIndex:
    """All loaded requests' entity names behind one deletion-neighbourhood lookup (SymSpell idea):
    a prompt word finds the name parts within its typo budget without comparing it to every part
    of every request, so span finding stays flat in the number of requests."""

    def __init__(self, common_words: set[str] | frozenset = frozenset()):
        self.common_words = common_words
        self._patterns: dict[str, list[EntityPattern]] = {}
        self._lookup: dict[str, set[tuple[str, str]]] = {}

    def add(self, request_id: str, entities: list[str]) -> None:
        self.remove(request_id)
        patterns = compile_entities(entities)
        self._patterns[request_id] = patterns
        for pat in patterns:
            for part in pat.parts:
                for key in _deletes(part, allowed_typos(part)):
                    self._lookup.setdefault(key, set()).add((request_id, part))

    def remove(self, request_id: str) -> None:
        if self._patterns.pop(request_id, None) is None:
            return
        for key in list(self._lookup):
            self._lookup[key] = {x for x in self._lookup[key] if x[0] != request_id}
            if not self._lookup[key]:
                del self._lookup[key]

    @property
    def request_ids(self) -> set[str]:
        return set(self._patterns)

    def candidates(self, text: str) -> set[str]:
        """Requests one of whose name parts a prompt word may spell."""
        found: set[str] = set()
        for word, _, _ in tokens(text):
            w = fold(word)
            if len(w) < 2:
                continue
            for key in _deletes(w, 2 if len(w) >= 7 else 1 if len(w) >= 4 else 0):
                for request_id, part in self._lookup.get(key, ()):
                    if request_id not in found and similar(w, part):
                        found.add(request_id)
        return found

    def find(self, text: str) -> dict[str, tuple[float, list[tuple[int, int]]]]:
        """Per candidate request: (best match score, merged spans)."""
        return {rid: find_spans(text, self._patterns[rid], self.common_words) for rid in self.candidates(text)}
