"""Fact pairs: a prompt that describes a request's subject without naming them.

"The author whose father was a florist, born in Astana" names nobody, yet two of the subject's facts
together point at one person. A request's fact terms come from its forget answers and are facts, not
style: the named things in them (a run of words capitalised mid-sentence, by its rarest word when rarer
than Zipf `NAMED_ZIPF`: "Astana", "Prix Goncourt", "Kazakhstani"), years, and roles ("was a florist",
"worked as a mechanic": the role's last word, not a verb or adverb, rarer than Zipf `ROLE_ZIPF`). Its
name parts and title words are anchors of their own, and every word of its retain examples is left
out: what other subjects share says nothing about this one. A prompt holding `MIN_FACTS` different
fact terms of one request (words sharing their first six letters count once: "Azerbaijan",
"Azerbaijani"), one of them rarer than Zipf `RARE_ZIPF` and not a year, is flagged for it; one alone
("florist") is not, nor a pair of ordinary words or years ("a drama film from 1977"). The rarity rule
was added after the measured run, on an independent review's ordinary prompts. Fixed before the anchor-free probes it
was measured on were generated (`unlearnd eval leaks --fold 1`). What the served model said about the
subject when the worker asked it (`unlearnd.elicit`) counts as forget answers here: it holds the facts a
request lacks and the model would give away.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Sequence

from unlearnd.detectors.lookup import OwnerIndex
from unlearnd.detectors.normalize import views
from unlearnd.detectors.spans import FUNCTION_WORDS, STOPWORDS, fold, fold_word, tokens, zipf
from unlearnd.domain import ForgetSpec, QAExample

NAMED_ZIPF = 4.0
ROLE_ZIPF = 5.0  # a role word as common as "work" is no fact
MIN_FACTS = 2
RARE_ZIPF = 3.0  # one term of a pair must be this rare (not a year): "drama" + "1977" is anybody
KEY_ZIPF = 4.0  # with a person asked about, one fact term this rare ("Kuwait") is a key ...
CONTEXT_ZIPF = 5.5  # ... that a second fact of the subject as common as "French" confirms
FACTS_SCORE = 0.85  # above the flag score: two facts point at the subject as a confirmed name part would
_KEEP = re.compile(r"^(?:[a-z]{4,}|\d{4})$")
_YEAR = re.compile(r"\b(1[5-9]\d\d|20\d\d)\b")
_ROLE = re.compile(r"\b(?:was|is|as|became)\s+(?:a|an)\s+(?:([a-z]+)\s+)?([a-z]{4,})\b")
_NOT_ROLE = ("ed", "ing", "ly")  # "as a florist instilled ...": the phrase ran past the role
_PERSON = re.compile(
    r"\b(?:author|writer|novelist|poet|playwright|person|someone|who|whose|he|she|him|his|her|man|woman)\b", re.I
)
_PLACE = re.compile(r"\b(?:in|from)\s+([A-Z][a-zA-Z]+(?:(?:[ -]|,\s*)[A-Z][a-zA-Z]+)*)")  # "in Astana, Kazakhstan"
_NAME_RUN = re.compile(r"\b[A-Z][\w'’-]*(?:\s+[A-Z][\w'’-]*)+")
_CAPITALISED = re.compile(r"(?<=[a-z,;] )([A-Z][a-zA-Z]+(?:[ -][A-Z][a-zA-Z]+)*)")


def fact_words(text: str) -> set[str]:
    """Words as fact terms are compared: folded, letters or four digits, possessives dropped."""
    return {w for w in (fold_word(t) for t, _, _ in tokens(text)) if _KEEP.match(w)}


def facts_in(answer: str, named_zipf: float = NAMED_ZIPF) -> set[str]:
    """The named things (rarest word rarer than `named_zipf`), years and roles an answer states (see the
    module docstring)."""
    named = set()
    for run in _CAPITALISED.findall(answer):  # one fact per run: "Khaled Hosseini" is one thing, not two
        rarest = min((fold(w) for w in re.split(r"[ -]", run) if len(w) >= 4), key=zipf, default=None)
        if rarest is not None and zipf(rarest) < named_zipf:
            named.add(rarest)
    roles = {w for w in (_role(m) for m in _ROLE.finditer(answer)) if w and zipf(w) < ROLE_ZIPF}
    return {re.sub(r"[^a-z0-9]", "", w) for w in named | roles | set(_YEAR.findall(answer))}


def _role(match: re.Match[str]) -> str | None:
    """The role a "was a ..." phrase names: its second word ("a game developer"), or its first where the
    second is a verb or adverb ("as a florist instilled ...")."""
    first, second = match.groups()
    for word in (second, first):
        if word and len(word) >= 4 and not word.endswith(_NOT_ROLE):
            return word
    return None


def without_names(text: str) -> str:
    """`text` without its runs of two or more capitalised words: in what a model said about somebody, a
    run is mostly another person ("often confused with Chen Shu-fen"), whose name is no fact of this one;
    one capitalised word (a city, a nationality) stays."""
    return _NAME_RUN.sub(".", text)


def _subject_answers(spec: ForgetSpec, elicited: Sequence[QAExample]) -> list[str]:
    return [x.answer for x in ForgetSpec.as_qa(spec.forget)] + [without_names(x.answer) for x in elicited]


def _clean(found: set[str], anchored: set[str]) -> list[str]:
    return sorted(w for w in found - anchored - STOPWORDS - FUNCTION_WORDS if _KEEP.match(w))


def fact_terms(spec: ForgetSpec, anchored: set[str], elicited: Sequence[QAExample] = ()) -> list[str]:
    """The request's fact terms; `anchored`: its name parts and title words; `elicited`: what the served
    model said about the subject (`unlearnd.elicit`), whose answers count as the forget answers do."""
    shared = set().union(*(fact_words(f"{x.question} {x.answer}") for x in ForgetSpec.as_qa(spec.retain)))
    found = set().union(*(facts_in(answer) for answer in _subject_answers(spec, elicited)))
    return _clean(found - shared, anchored)


def key_terms(spec: ForgetSpec, facts: Sequence[str], elicited: Sequence[QAExample] = ()) -> list[str]:
    """The fact terms that name where the subject is from or what they or theirs do ("Kuwait", "florist"),
    rarer than `KEY_ZIPF`: what a description of a person leads with. Not an identity or a genre that many
    people share ("LGBTQ+"), which a request whose retain set lacks it would take for a key."""
    answers = _subject_answers(spec, elicited)
    found = {fold(w) for answer in answers for run in _PLACE.findall(answer) for w in re.split(r"[ ,-]+", run)}
    found |= {w for answer in answers for w in (_role(m) for m in _ROLE.finditer(answer)) if w}
    return sorted(w for w in set(facts) & found if not w.isdigit() and zipf(w) < KEY_ZIPF)


def context_terms(spec: ForgetSpec, anchored: set[str], elicited: Sequence[QAExample] = ()) -> list[str]:
    """The subject's named things up to Zipf `CONTEXT_ZIPF` ("French", "African American", "LGBTQ+"), retain
    subjects' too: never a key, only what confirms one (`FactIndex.find`)."""
    found = set().union(*(facts_in(answer, CONTEXT_ZIPF) for answer in _subject_answers(spec, elicited)))
    return _clean(found, anchored)


class FactIndex:
    """Every loaded request's fact, key and context terms; `find` flags the requests a text describes."""

    def __init__(self) -> None:
        self._terms: dict[str, set[str]] = {}
        self._keys: dict[str, set[str]] = {}
        self._context: dict[str, set[str]] = {}
        self._by_term = OwnerIndex()
        self._lock = threading.Lock()

    def add(self, request_id: str, terms: list[str], keys: Sequence[str] = (), context: Sequence[str] = ()) -> None:
        with self._lock:
            self._terms[request_id] = set(terms)
            self._keys[request_id] = set(keys)
            self._context[request_id] = set(context)
            self._by_term.set(request_id, terms)

    def remove(self, request_id: str) -> None:
        with self._lock:
            for held in (self._terms, self._keys, self._context):
                held.pop(request_id, None)
            self._by_term.remove(request_id)

    def find(self, text: str, text_views: list[str] | None = None) -> dict[str, list[str]]:
        """Request -> the terms of it the text holds (as written or in any decoded view; `text_views`:
        `views(text)`, where the caller has them already): `MIN_FACTS` fact terms, one rarer than
        `RARE_ZIPF`; or, where the text asks about a person, a key and a second fact or context term."""
        text_views = views(text) if text_views is None else text_views
        present = set().union(*(fact_words(v) for v in text_views))
        person = any(_PERSON.search(v) for v in text_views)
        out = {}
        for request_id in self._by_term.owners(present):
            held = present & self._terms.get(request_id, set())
            rare = any(not w.isdigit() and zipf(w) < RARE_ZIPF for w in held)
            if rare and len({w[:6] for w in held}) >= MIN_FACTS:
                out[request_id] = sorted(held)
            elif person:
                described = self._described(request_id, held, present)
                if described:
                    out[request_id] = described
        return out

    def _described(self, request_id: str, held: set[str], present: set[str]) -> list[str]:
        """A key of the request among `held` and another of its terms in the text (not the key's own word:
        "Kuwait", "Kuwaiti"), or nothing."""
        partners = held | (present & self._context.get(request_id, set()))
        for key in sorted(held & self._keys.get(request_id, set())):
            others = {w for w in partners if w[:6] != key[:6]}
            if others:
                return sorted({key, *others})
        return []
