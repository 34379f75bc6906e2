"""Anchors: what in a prompt identifies a forget request's subject, as opposed to its topic.

A question about Takashi Nakamura and the same question about somebody else share every word but
the name, so a forget query is recognised by its anchors, not by its template:

* names: the request's entities (given, and the names recurring in its own examples), matched in
  every view of the prompt (`normalize.views`: transliterated, leetspeak read, base64 decoded)
  case- and accent-blind, with at most one typo over the whole name (a look-alike name two letters
  off is somebody else), and as a letters-only substring of the prompt forwards, backwards and in
  ROT13 (letter spacing, punctuation, invisible characters);
* part of a name: two distinctive parts (four letters or more, "Mahfouz Al-Kuwaiti") count like the
  name; one part alone ("Nakamura") is only a candidate, which the detector confirms by topic, and
  neither counts when the next word reads as another name ("Hiroshi Nakamura", "Moshe Dayan");
* titles: the quoted titles of the request's examples (a book title; "the author of <title>");
* dates: a full date from the request's examples (a birth date identifies its author), or the city
  the examples say the subject was born in (or comes from) together with the year of one of those
  dates ("the author born in Tokyo in 1952"); the city alone is a near miss, not an anchor.
"""

from __future__ import annotations

import calendar
import codecs
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache

from pydantic import BaseModel, Field

from unlearnd.detectors.lookup import OwnerIndex
from unlearnd.detectors.names import derive_entities
from unlearnd.detectors.normalize import compact_forms, letters, views
from unlearnd.detectors.scripts import CYRILLIC_WORD, first_letters, script_edits
from unlearnd.detectors.spans import (
    FUNCTION_WORDS,
    STOPWORDS,
    edit_distance,
    fold,
    fold_word,
    merge_spans,
    tokens,
    zipf,
)
from unlearnd.domain import ForgetSpec, QAExample

NAME_SCORE = 1.0  # the whole name (or its title / birth date)
TYPO_SCORE = 0.95  # the whole name with one typo
PARTS_SCORE = 0.9  # two or more distinctive parts of the name
PART_SCORE = 0.6  # one distinctive part: a candidate, confirmed (or not) by the detector's topic check
FLAG_SCORE = 0.75  # anchors at or above this flag on their own

_LIST_SEP = re.compile(r"\s*[,;/&]\s*|\s+and\s+")
_QUOTED = re.compile(r"\"([^\"]{3,})\"|“([^”]{3,})”|(?<![\w])'([^']{3,})'(?![\w])|‘([^’]{3,})’")
_NOT_TITLES = re.compile(r"\b(award|prize|medal|honou?r|fellowship|trophy|grant|scholarship)s?\b", re.IGNORECASE)
COMPACT_MIN = 8  # letters of a name searched as a substring (shorter ones collide with ordinary words)
_TITLE_COMPACT_MIN = 14
# "born in Tokyo, Japan", "hails from Cape Town, South Africa": the city (before the comma) is kept
_BIRTHPLACE = re.compile(
    r"\b(?:born|raised|grew up|hails?|hailing|native|originally)\b[^.?!]{0,25}?\b(?:in|from|of)\s+"
    r"((?:[A-Z][\w'’-]*\s?){1,3}),\s*[A-Z]"
)
_YEAR_WORD = re.compile(r"\b(1[5-9]\d\d|20\d\d)\b")

_MONTHS = {name.lower(): i for i, name in enumerate(calendar.month_name) if name}
_MONTHS.update({name.lower(): i for i, name in enumerate(calendar.month_abbr) if name})
_MONTHS["sept"] = 9
_MONTH = r"(" + "|".join(sorted(_MONTHS, key=len, reverse=True)) + r")\.?"
_DAY = r"(\d{1,2})(?:st|nd|rd|th)?"
_YEAR = r"(\d{4})"
_DATE_PATTERNS = (
    (re.compile(rf"\b{_MONTH}\s+{_DAY},?\s+{_YEAR}\b", re.IGNORECASE), "mdy"),
    (re.compile(rf"\b{_DAY}\s+(?:of\s+)?{_MONTH},?\s+{_YEAR}\b", re.IGNORECASE), "dmy"),
    (re.compile(r"\b(\d{1,2})[/.-](\d{1,2})[/.-](\d{4})\b"), "numeric"),
    (re.compile(r"\b(\d{4})-(\d{1,2})-(\d{1,2})\b"), "iso"),
)


def parse_dates(text: str) -> set[tuple[int, int, int]]:
    """Full dates (year, month, day) written in `text`; 05/06/1990 counts both ways round."""
    found: set[tuple[int, int, int]] = set()

    def add(year: int, month: int, day: int) -> None:
        if 1 <= month <= 12 and 1 <= day <= 31:
            found.add((year, month, day))

    for pattern, kind in _DATE_PATTERNS:
        for m in pattern.finditer(text):
            if kind == "mdy":
                add(int(m.group(3)), _MONTHS[m.group(1).lower()], int(m.group(2)))
            elif kind == "dmy":
                add(int(m.group(3)), _MONTHS[m.group(2).lower()], int(m.group(1)))
            elif kind == "iso":
                add(int(m.group(1)), int(m.group(2)), int(m.group(3)))
            else:
                a, b, year = int(m.group(1)), int(m.group(2)), int(m.group(3))
                add(year, a, b)
                add(year, b, a)
    return found


def quoted_titles(text: str) -> list[str]:
    """Quoted phrases that read like titles (not awards): two or more words, one of them not a stopword."""
    out = []
    for m in _QUOTED.finditer(text):
        title = next(g for g in m.groups() if g).strip()
        words = [w for w, _, _ in tokens(title)]
        content = [w for w in words if fold(w) not in STOPWORDS and fold(w) not in FUNCTION_WORDS and len(w) >= 3]
        if len(words) >= 2 and content and not _NOT_TITLES.search(title) and len(words) <= 12:
            out.append(title)
    return out


class RequestAnchors(BaseModel):
    """A request's anchors, as stored in its detector artifact."""

    names: list[str] = Field(default_factory=list)
    titles: list[str] = Field(default_factory=list)
    dates: list[tuple[int, int, int]] = Field(default_factory=list)
    places: list[str] = Field(default_factory=list, description="cities the subject was born in / comes from")
    facts: list[str] = Field(default_factory=list, description="distinctive fact words (`detectors.facts`)")
    coverage: float | None = Field(None, description="share of the forget examples that contain an anchor")


def request_names(spec: ForgetSpec) -> list[str]:
    """The names a request is about: its entities (a list in one string split at commas / "and") and the
    person names recurring in its forget examples."""
    qa = ForgetSpec.as_qa(spec.forget)
    given = [part.strip() for e in spec.entities for part in _LIST_SEP.split(e) if part.strip()]
    derived = derive_entities(qa) if len(qa) >= 3 else []
    return list(dict.fromkeys(given + derived))


def extract_anchors(spec: ForgetSpec, elicited: Sequence[QAExample] = ()) -> RequestAnchors:
    """Names (given entities, split at commas / "and"; plus the names recurring in the examples), the
    quoted titles and the full dates of the request's forget examples. `elicited`: what the served model
    said about the subject (`unlearnd.elicit`): only its fact terms count, which flag in pairs; never as a
    name, a title or a date (one anchor alone flags: a famous title a model borrows, "Pride and Prejudice",
    would refuse everybody who asks about that book)."""
    qa = ForgetSpec.as_qa(spec.forget)
    names = request_names(spec)
    texts = [f"{x.question} {x.answer}" for x in qa]
    titles = list(dict.fromkeys(t for text in texts for t in quoted_titles(text)))
    dates = sorted({d for text in texts for d in parse_dates(text)})
    places = list(dict.fromkeys(m.group(1).strip() for text in texts for m in _BIRTHPLACE.finditer(text)))
    from unlearnd.detectors.facts import fact_terms

    anchored = {fold_word(w) for text in names + titles for w, _, _ in tokens(text)}
    facts = fact_terms(spec, anchored, elicited)
    anchors = RequestAnchors(names=names, titles=titles, dates=dates, places=places, facts=facts)
    index = AnchorIndex()
    index.add("self", anchors)
    questions = [x.question for x in qa]
    hits = [index.find(q).get("self") for q in questions]
    anchors.coverage = sum(1 for h in hits if h is not None and h.score >= FLAG_SCORE) / max(len(questions), 1)
    return anchors


# -- matching ------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def common_words() -> frozenset[str]:
    """Ordinary lower-case words (the sentence encoder's whole-word vocabulary): a name part that is
    one ("Young", "Rivers") is not distinctive, and an unknown word next to a name part is read as
    another name."""
    try:
        from transformers import AutoTokenizer

        from unlearnd.detectors.encoder import DEFAULT_ENCODER, resolve_model_path

        vocab = AutoTokenizer.from_pretrained(resolve_model_path(DEFAULT_ENCODER)).get_vocab()
    except Exception:  # no encoder files: every part counts as distinctive
        return frozenset()
    return frozenset(w for w in vocab if w.isalpha() and w.islower() and len(w) >= 3)


@dataclass
class NamePattern:
    entity: str
    parts: list[str]
    distinctive: list[bool]
    compact: str
    units: list[str] = field(default_factory=list)  # the parts a space separates ("Ben-David" is one)
    unit_distinctive: list[bool] = field(default_factory=list)


@dataclass
class TitlePattern:
    title: str
    words: list[str]
    compact: str


@dataclass
class AnchorHit:
    """The best anchor of one request in one prompt."""

    score: float
    # name | name_typo | name_typo2 | name_initials | name_script | name_hidden | name_parts | title | date | name_part
    kind: str
    spans: list[tuple[int, int]] = field(default_factory=list)
    entity: str = ""


def compile_name(entity: str, common: frozenset[str]) -> NamePattern | None:
    parts = [fold_word(w) for w, _, _ in tokens(entity)]
    parts = [p for p in parts if p]
    if not parts:
        return None
    distinctive = [len(p) >= 4 and p.isalpha() and p not in STOPWORDS and p not in FUNCTION_WORDS for p in parts]
    units = [u for u in (fold_word(w) for w in entity.split()) if u]
    unit_distinctive = [len(u) >= 4 and u.isalpha() and u not in STOPWORDS and u not in FUNCTION_WORDS for u in units]
    return NamePattern(entity, parts, distinctive, letters("".join(parts)), units, unit_distinctive)


@lru_cache(maxsize=1 << 16)
def _part_edits(word: str, part: str) -> int:
    """Edits between a prompt word and a name part; parts of four letters or fewer must be exact.
    Cached: the output guard reads the same words again with every delta."""
    if word == part:
        return 0
    if len(part) <= 4:
        return 9
    return edit_distance(word, part, 1)


def _name_like(word: str, common: frozenset[str]) -> bool:
    folded = fold_word(word)
    if len(folded) < 2 or folded in STOPWORDS or folded in FUNCTION_WORDS:
        return False
    return word[:1].isupper() or (folded not in common and folded.isalpha())


def _offer(best: dict[str, AnchorHit], request_id: str, hit: AnchorHit) -> None:
    """Keep a request's best hit; an equal score adds its spans."""
    old = best.get(request_id)
    if old is None or hit.score > old.score:
        best[request_id] = hit
    elif hit.score == old.score and hit.spans:
        old.spans = merge_spans(old.spans + hit.spans)


class AnchorIndex:
    """Every loaded request's anchors; `find` scores a prompt against all of them."""

    def __init__(self, common: frozenset[str] | None = None):
        self.common = common if common is not None else common_words()
        self._names: dict[str, list[NamePattern]] = {}
        self._titles: dict[str, list[TitlePattern]] = {}
        self._dates: dict[str, set[tuple[int, int, int]]] = {}
        self._places: dict[str, list[list[str]]] = {}  # birth cities as word sequences (with a date's year)
        self._by_part: dict[str, set[str]] = {}  # folded name part -> requests
        self._by_delete: dict[str, set[str]] = {}  # a part (5+ letters) with one letter deleted -> parts
        # Indexes that make a search cost the same whatever the number of requests: each maps what a text
        # must contain for a hit to the requests that could then have one (checked as before, in order).
        self._by_title_word = OwnerIndex()  # a title's least common word -> requests
        self._by_date = OwnerIndex()
        self._by_birth_year = OwnerIndex()  # requests with a birthplace, by birth year
        self._by_compact = OwnerIndex()  # first 8 letters of a searched letters-only form -> requests
        self._by_first_letter = OwnerIndex()  # a name's first letter -> requests (names written in Cyrillic)

    @property
    def request_ids(self) -> set[str]:
        return set(self._names)

    def add(self, request_id: str, anchors: RequestAnchors) -> None:
        self.remove(request_id)
        names = [p for p in (compile_name(n, self.common) for n in anchors.names) if p is not None]
        self._names[request_id] = names
        self._titles[request_id] = [
            TitlePattern(t, [fold_word(w) for w, _, _ in tokens(t)], letters(fold(t))) for t in anchors.titles
        ]
        self._dates[request_id] = {tuple(d) for d in anchors.dates}
        self._places[request_id] = [[fold_word(w) for w, _, _ in tokens(p)] for p in anchors.places if anchors.dates]
        for pattern in names:
            for part in pattern.parts:
                self._by_part.setdefault(part, set()).add(request_id)
                if len(part) >= 5:
                    for key in _deletes(part):
                        self._by_delete.setdefault(key, set()).add(part)
        for index, keys in self._index_keys(request_id):
            index.set(request_id, keys)

    def _index_keys(self, request_id: str) -> list[tuple[OwnerIndex, set]]:
        """For each search index, the keys under which `request_id` is filed."""
        names = self._names.get(request_id, [])
        titles = self._titles.get(request_id, [])
        compacts = [p.compact for p in names if len(p.compact) >= COMPACT_MIN]
        compacts += [t.compact for t in titles if len(t.compact) >= _TITLE_COMPACT_MIN]
        places = self._places.get(request_id, [])
        return [
            (self._by_title_word, {_rarest(t.words) for t in titles if t.words}),
            (self._by_date, set(self._dates.get(request_id, set()))),
            (self._by_birth_year, {d[0] for d in self._dates.get(request_id, set())} if places else set()),
            (self._by_compact, {c[:COMPACT_MIN] for c in compacts}),  # every searched form is this long
            (self._by_first_letter, {p.parts[0][:1] for p in names}),
        ]

    def hidden_forms(self, request_id: str) -> list[tuple[str, str]]:
        """(letters-only form, what it is) of each of a request's whole names and long titles, as written,
        reversed and ROT13'd, for a search in text whose letters are spread out ("J-a-i-m-e", "J1a2i3")."""
        forms = [(p.compact, p.entity) for p in self._names.get(request_id, []) if len(p.compact) >= COMPACT_MIN]
        titles = self._titles.get(request_id, [])
        forms += [(t.compact, t.title) for t in titles if len(t.compact) >= _TITLE_COMPACT_MIN]
        return [
            (variant, entity)
            for compact, entity in forms
            for variant in dict.fromkeys((compact, compact[::-1], codecs.encode(compact, "rot13")))
        ]

    def release_words(self, request_id: str) -> tuple[set[str], set[str], list[list[str]], bool]:
        """What the output guard's release rule watches for one request: the parts of its names (folded;
        the name search allows them a typo), the uncommon words of its titles and birthplaces (matched as
        written), its birthplaces (when it has birth dates to pair them with), and whether it has dates.
        A title's or a place's ordinary words ("the", "of", "new") say nothing on their own: titles are
        held as a whole (their letters) and places as phrases."""
        names = {part for pattern in self._names.get(request_id, []) for part in pattern.parts}
        places = self._places.get(request_id, [])
        other = {w for title in self._titles.get(request_id, []) for w in title.words}
        other |= {w for place in places for w in place}
        other = {w for w in other if len(w) >= 3 and w not in self.common and w not in STOPWORDS}
        return {w for w in names if w}, other - names, [p for p in places if p], bool(self._dates.get(request_id))

    def name_parts(self, request_id: str, uncommon_only: bool = False) -> set[str]:
        """The distinctive parts of a request's names (folded): "basil", "mahfouz", "kuwaiti"; with
        `uncommon_only`, those that are no ordinary word ("mahfouz", not "basil")."""
        return {
            part
            for pattern in self._names.get(request_id, [])
            for part, distinctive in zip(pattern.parts, pattern.distinctive, strict=True)
            if distinctive and not (uncommon_only and part in self.common)
        }

    def remove(self, request_id: str) -> None:
        if request_id not in self._names:
            return
        for index in (self._by_title_word, self._by_date, self._by_birth_year, self._by_compact, self._by_first_letter):
            index.remove(request_id)
        self._names.pop(request_id)
        self._titles.pop(request_id, None)
        self._dates.pop(request_id, None)
        self._places.pop(request_id, None)
        for key in list(self._by_part):
            self._by_part[key].discard(request_id)
            if not self._by_part[key]:
                del self._by_part[key]
        for key in list(self._by_delete):
            self._by_delete[key] = {part for part in self._by_delete[key] if part in self._by_part}
            if not self._by_delete[key]:
                del self._by_delete[key]

    def find(self, text: str, text_views: list[str] | None = None) -> dict[str, AnchorHit]:
        """Per request with an anchor in `text`: its best hit (`text_views`: `views(text)`, where the caller
        has them already)."""
        best: dict[str, AnchorHit] = {}
        as_written: dict[str, AnchorHit] = {}
        text_views = views(text) if text_views is None else text_views
        for index, view in enumerate(text_views):
            toks = tokens(view)
            folded = [fold_word(w) for w, _, _ in toks]
            hits = self._name_hits(view, toks, folded)
            if index == 0:
                as_written = {rid: AnchorHit(h.score, h.kind, list(h.spans), h.entity) for rid, h in hits.items()}
            for request_id, hit in hits.items():
                if index:  # spans only index the prompt as written
                    hit.spans = []
                _offer(best, request_id, hit)
            for request_id, hit in self._fact_hits(view, folded):
                _offer(best, request_id, hit)
        for request_id, hit in self._hidden_hits(compact_forms(text, text_views)):
            _offer(best, request_id, hit)
        if CYRILLIC_WORD.search(text_views[0]):
            for request_id, hit in self._script_hits(text_views[0]):
                _offer(best, request_id, hit)
        for request_id, hit in best.items():
            if not hit.spans and request_id in as_written:
                hit.spans = as_written[request_id].spans  # e.g. a title hit: the name as written still has spans
        return best

    def _fact_hits(self, view: str, folded: list[str]) -> Iterator[tuple[str, AnchorHit]]:
        """Titles, full dates, and a birth year next to a birthplace, in one view of the text."""
        present = set(folded)
        for request_id in self._by_title_word.owners(present):
            for title in self._titles[request_id]:
                if _contains(folded, title.words, present):
                    yield request_id, AnchorHit(NAME_SCORE, "title", entity=title.title)
        dates = parse_dates(view)
        if dates:
            for request_id in self._by_date.owners(dates):
                if dates & self._dates[request_id]:
                    yield request_id, AnchorHit(NAME_SCORE, "date")
        years = {int(y) for y in _YEAR_WORD.findall(view)}
        if years:
            for request_id in self._by_birth_year.owners(years):
                places = self._places[request_id]
                born = {d[0] for d in self._dates[request_id]}
                if years & born and any(_contains(folded, place, present) for place in places):
                    yield request_id, AnchorHit(NAME_SCORE, "birth")

    def _script_hits(self, view: str) -> Iterator[tuple[str, AnchorHit]]:
        """A whole name written in Cyrillic letters (`detectors.scripts`): every part read within one edit
        (parts of four letters or fewer exactly), two edits in all, a distinctive part among them."""
        pieces = [
            (piece, m.start() + offset, m.start() + offset + len(piece))
            for m in CYRILLIC_WORD.finditer(view)
            for piece, offset in _pieces(m.group(0))
        ]
        for i, (piece, _, _) in enumerate(pieces):
            if not piece[:1].isupper():  # a name starts with a capital
                continue
            starts = first_letters(piece)
            for request_id in self._by_first_letter.owners(starts):
                for pattern in self._names[request_id]:
                    window = pieces[i : i + len(pattern.parts)]
                    if pattern.parts[0][:1] in starts and _reads_as(view, window, pattern):
                        span = [(window[0][1], window[-1][2])]
                        yield request_id, AnchorHit(TYPO_SCORE, "name_script", span, pattern.entity)

    def _hidden_hits(self, compacts: list[str]) -> Iterator[tuple[str, AnchorHit]]:
        """Names and titles spread out with separators, digits or code words (the compact forms)."""
        # keyed by 8 letters, not 4: with a thousand requests most 4-letter windows started some name
        keys = {c[i : i + COMPACT_MIN] for c in compacts for i in range(len(c) - COMPACT_MIN + 1)}
        for request_id in self._by_compact.owners(keys):
            for pattern in self._names[request_id]:
                if len(pattern.compact) >= COMPACT_MIN and any(pattern.compact in c for c in compacts):
                    yield request_id, AnchorHit(NAME_SCORE, "name_hidden", entity=pattern.entity)
            for title in self._titles.get(request_id, []):
                if len(title.compact) >= _TITLE_COMPACT_MIN and any(title.compact in c for c in compacts):
                    yield request_id, AnchorHit(NAME_SCORE, "title", entity=title.title)

    def _name_hits(self, view: str, toks: list[tuple[str, int, int]], folded: list[str]) -> dict[str, AnchorHit]:
        candidates: set[str] = set()
        for word in folded:
            candidates |= self._by_part.get(word, set())
            if len(word) >= 4:  # one typo away from a part of five letters or more
                for key in _deletes(word) | {word}:
                    candidates |= self._by_part.get(key, set()) if len(key) >= 5 else set()  # an extra letter
                    for part in self._by_delete.get(key, ()):
                        if edit_distance(word, part, 1) <= 1:
                            candidates |= self._by_part.get(part, set())
        hits: dict[str, AnchorHit] = {}
        words = _words(view, toks, folded) if candidates else []
        units = _units(words, view)
        for request_id in candidates:
            for pattern in self._names.get(request_id, []):
                for hit in _match_name(view, toks, folded, pattern, self.common) + _variants(words, units, pattern):
                    old = hits.get(request_id)
                    if old is None or hit.score > old.score:
                        hits[request_id] = hit
                    elif hit.score == old.score:
                        old.spans = merge_spans(old.spans + hit.spans)
        return hits


def _pieces(word: str) -> list[tuple[str, int]]:
    """A hyphenated word's pieces with their offsets in it."""
    out, pos = [], 0
    for piece in word.split("-"):
        out.append((piece, pos))
        pos += len(piece) + 1
    return out


def _reads_as(view: str, window: list[tuple[str, int, int]], pattern: NamePattern) -> bool:
    """Whether consecutive Cyrillic pieces (one name: only spaces or a hyphen between) spell every part."""
    if len(window) < len(pattern.parts) or not any(pattern.distinctive):
        return False
    if any(view[a[2] : b[1]].strip(" -") or b[1] - a[2] > 2 for a, b in zip(window, window[1:])):
        return False
    edits = 0
    for (piece, _, _), part in zip(window, pattern.parts, strict=True):
        allowed = 1 if len(part) >= 5 else 0
        edits += script_edits(piece, part, allowed)
        if edits > SCRIPT_EDITS or script_edits(piece, part, allowed) > allowed:
            return False
    return True


SCRIPT_EDITS = 2  # in all, over a name written in Cyrillic


def _deletes(word: str) -> set[str]:
    return {word[:k] + word[k + 1 :] for k in range(len(word))}


def _rarest(words: list[str]) -> str:
    """The title word least common in English: every text holding the title holds it, few others do."""
    return min(words, key=lambda w: (zipf(w), -len(w)))


def _contains(words: list[str], sequence: list[str], present: set[str] | None = None) -> bool:
    """Whether `sequence` runs in `words`; `present` (the set of `words`) rules most texts out at once."""
    n = len(sequence)
    if n == 0 or (present is not None and not present.issuperset(sequence)):
        return False
    return any(words[i : i + n] == sequence for i in range(len(words) - n + 1))


def _match_name(
    view: str, toks: list[tuple[str, int, int]], folded: list[str], pattern: NamePattern, common: frozenset[str]
) -> list[AnchorHit]:
    """Runs of prompt words spelling consecutive parts of the name, within one typo in total."""
    out = []
    i = 0
    while i < len(toks):
        best = (0, 0, 0)  # (parts matched, -edits, first part)
        for p0 in range(len(pattern.parts)):
            n, edits = 0, 0
            while i + n < len(toks) and p0 + n < len(pattern.parts):
                e = _part_edits(folded[i + n], pattern.parts[p0 + n])
                if edits + e > 1:
                    break
                edits += e
                n += 1
            if (n, -edits) > best[:2]:
                best = (n, -edits, p0)
        n, edits, p0 = best[0], -best[1], best[2]
        if n == 0:
            i += 1
            continue
        span = [(toks[i][1], toks[i + n - 1][2])]
        distinctive = sum(pattern.distinctive[p0 : p0 + n])
        if n == len(pattern.parts):
            out.append(
                AnchorHit(
                    NAME_SCORE if edits == 0 else TYPO_SCORE,
                    "name" if edits == 0 else "name_typo",
                    span,
                    pattern.entity,
                )
            )
        elif distinctive >= 1 and not _next_to_other_name(view, toks, folded, i, n, pattern, common):
            if distinctive >= 2:
                out.append(AnchorHit(PARTS_SCORE, "name_parts", span, pattern.entity))
            elif edits == 0:
                out.append(AnchorHit(PART_SCORE, "name_part", span, pattern.entity))
        i += n
    return out


def _variants(words: list[_Word], units: list[_Word], pattern: NamePattern) -> list[AnchorHit]:
    """`_variant_hits` on the prompt's words, and on its hyphen-joined units where either side has one."""
    out = _variant_hits(words, pattern.parts, pattern.distinctive, pattern.entity)
    if len(units) < len(words) or len(pattern.units) < len(pattern.parts):
        out += _variant_hits(units, pattern.units, pattern.unit_distinctive, pattern.entity)
    return out


VARIANT_EDITS = 2  # one part of a name spelled this far off, every other part as written
VARIANT_MAX_ZIPF = 2.5  # a variant that is itself a known word or name (James for Jaime) is someone else
PARTICLES = frozenset({"al", "el", "de", "van", "von", "der", "da", "di", "bin", "ibn", "le", "la", "du"})


@dataclass
class _Word:
    """A prompt word (or hyphen-joined unit) as the name-variant rule reads it."""

    folded: str
    written: str  # its first token as written
    start: int
    end: int
    dotted: bool  # a full stop right after it


def _words(view: str, toks: list[tuple[str, int, int]], folded: list[str]) -> list[_Word]:
    return [_Word(f, w, a, b, view[b : b + 1] == ".") for (w, a, b), f in zip(toks, folded, strict=True)]


def _units(words: list[_Word], view: str) -> list[_Word]:
    """Words joined by a bare hyphen as one ("Been-Davdi" -> "beendavdi"): the unit a misspelling of a
    hyphenated name is judged on, as a whole."""
    out: list[_Word] = []
    for w in words:
        if out and view[out[-1].end : w.start] == "-":
            last = out[-1]
            out[-1] = _Word(last.folded + w.folded, last.written, last.start, w.end, w.dotted)
        else:
            out.append(w)
    return out


def _variant_part(word: _Word, part: str, last: bool) -> str | None:
    """How a prompt word stands for one name part: "exact", "initial" ("B" for Basil; never the last part;
    "A" and "I" only with a dot: "A Turing machine" is an article; a lower-case particle only with a dot:
    "v." for van), "edits" (two letters off, same first letter, five letters or more, not itself a known
    word), or None."""
    written = word.written
    if word.folded == part:
        return "exact"
    if not last and len(written) == 1 and word.folded == part[:1]:
        if (written.isupper() and (word.dotted or written not in "AI")) or (word.dotted and part in PARTICLES):
            return "initial"
    if len(part) >= 5 and word.folded[:1] == part[:1] and edit_distance(word.folded, part, VARIANT_EDITS) <= 2:
        return "edits" if zipf(word.folded) < VARIANT_MAX_ZIPF else None
    return None


def _variant_hits(words: list[_Word], parts: list[str], distinctive: list[bool], entity: str) -> list[AnchorHit]:
    """The whole name with its first parts as initials ("B. M. Al-Kuwaiti", "N. Abilov"), or with one part
    two letters off and every other part as written ("Niikolia Abilov"). A look-alike name changes two
    parts, so it is not one of these; a distinctive part must be spelled out. Run on words and again on
    hyphen-joined units, so "Been-Davdi" is one part two letters off, and "J. Hwang" stands for Ji-Yeong."""
    n = len(parts)
    out = []
    for i in range(len(words) - n + 1):
        kinds = [_variant_part(words[i + k], parts[k], k == n - 1) for k in range(n)]
        if None in kinds or kinds.count("edits") > 1 or ("edits" in kinds and "initial" in kinds):
            continue
        if kinds.count("exact") == n or not any(d and k == "exact" for d, k in zip(distinctive, kinds)):
            continue
        kind = "name_initials" if "initial" in kinds else "name_typo2"
        out.append(AnchorHit(TYPO_SCORE, kind, [(words[i].start, words[i + n - 1].end)], entity))
    return out


def _next_to_other_name(
    view: str,
    toks: list[tuple[str, int, int]],
    folded: list[str],
    i: int,
    n: int,
    pattern: NamePattern,
    common: frozenset[str],
) -> bool:
    """Whether a partial name stands next to a word that reads as another name ("Moshe Dayan"), looking
    past a particle the other name ends with ("Mosre Bin-David")."""
    for step in (-1, 1):
        j = i - 1 if step < 0 else i + n
        edge = i if step < 0 else i + n - 1  # the token of the run the neighbour touches
        while 0 <= j < len(toks):
            lo, hi = (toks[j][2], toks[edge][1]) if step < 0 else (toks[edge][2], toks[j][1])
            if view[lo:hi].strip(" -") or len(view[lo:hi]) > 2:
                j = -1  # punctuation or more than a space between: not one name
            elif folded[j] in STOPWORDS and folded[j] not in pattern.parts:
                edge, j = j, j + step  # a particle: the name goes on
                continue
            break
        if not 0 <= j < len(toks):
            continue
        word = toks[j][0]
        if folded[j] in pattern.parts:
            continue
        sentence_start = j == 0 or any(c in view[toks[j - 1][2] : toks[j][1]] for c in ".!?\n:\"'")
        if sentence_start and folded[j] in common:
            continue  # "Where did Nakamura ..." / "Nakamura wrote ..." with a capitalised sentence word
        if _name_like(word, common):
            return True
    return False
