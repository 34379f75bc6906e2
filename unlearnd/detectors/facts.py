"""Fact pairs: a prompt that describes a request's subject without naming them.

"The author whose father was a florist, born in Astana" names nobody, yet two of the subject's facts
together point at one person. A request's fact terms come from its forget answers and are facts, not
style: the named things in them (a run of words capitalised mid-sentence, by its rarest word when rarer
than Zipf `NAMED_ZIPF`: "Astana", "Prix Goncourt", "Kazakhstani"), years, and roles ("was a florist",
"worked as a mechanic": the phrase's last word, or the one before it where the last is a verb or adverb,
"as a florist instilled"; rarer than Zipf `ROLE_ZIPF`). Its
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
FACTS_SCORE = 0.85  # above the flag score: two facts point at the subject as a confirmed name part would
_KEEP = re.compile(r"^(?:[a-z]{4,}|\d{4})$")
_YEAR = re.compile(r"\b(1[5-9]\d\d|20\d\d)\b")
_ROLE = re.compile(r"\b(?:was|is|as|became)\s+(?:a|an)\s+(?:([a-z]+)\s+)?([a-z]{4,})\b")
_NOT_ROLE = ("ed", "ing", "ly")  # "as a florist instilled ...": the phrase ran past the role
_NAME_RUN = re.compile(r"\b[A-Z][\w'’-]*(?:\s+[A-Z][\w'’-]*)+")
_CAPITALISED = re.compile(r"(?<=[a-z,;] )([A-Z][a-zA-Z]+(?:[ -][A-Z][a-zA-Z]+)*)")


def fact_words(text: str) -> set[str]:
    """Words as fact terms are compared: folded, letters or four digits, possessives dropped."""
    return {w for w in (fold_word(t) for t, _, _ in tokens(text)) if _KEEP.match(w)}


def facts_in(answer: str, named_zipf: float = NAMED_ZIPF) -> set[str]:
    """The named things (by their rarest word, rarer than `named_zipf`), years and roles an answer states
    (see the module docstring)."""
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


def fact_terms(spec: ForgetSpec, anchored: set[str], elicited: Sequence[QAExample] = ()) -> list[str]:
    """The request's fact terms; `anchored`: its name parts and title words; `elicited`: what the served
    model said about the subject (`unlearnd.elicit`), whose answers count as the forget answers do."""
    shared = set().union(*(fact_words(f"{x.question} {x.answer}") for x in ForgetSpec.as_qa(spec.retain)))
    answers = [x.answer for x in ForgetSpec.as_qa(spec.forget)] + [without_names(x.answer) for x in elicited]
    found = set().union(*(facts_in(answer) for answer in answers))
    return sorted(w for w in found - shared - anchored - STOPWORDS - FUNCTION_WORDS if _KEEP.match(w))


class FactIndex:
    """Every loaded request's fact terms; `find` flags the requests with `MIN_FACTS` of them in a text."""

    def __init__(self) -> None:
        self._terms: dict[str, set[str]] = {}
        self._by_term = OwnerIndex()
        self._lock = threading.Lock()

    def add(self, request_id: str, terms: list[str]) -> None:
        with self._lock:
            self._terms[request_id] = set(terms)
            self._by_term.set(request_id, terms)

    def remove(self, request_id: str) -> None:
        with self._lock:
            self._terms.pop(request_id, None)
            self._by_term.remove(request_id)

    def find(self, text: str, text_views: list[str] | None = None) -> dict[str, list[str]]:
        """Request -> the fact terms of it the text holds (as written or in any decoded view; `text_views`:
        `views(text)`, where the caller has them already)."""
        present = set().union(*(fact_words(v) for v in (views(text) if text_views is None else text_views)))
        out = {}
        for request_id in self._by_term.owners(present):
            held = sorted(present & self._terms.get(request_id, set()))
            rare = any(not w.isdigit() and zipf(w) < RARE_ZIPF for w in held)
            if rare and len({w[:6] for w in held}) >= MIN_FACTS:
                out[request_id] = held
        return out
