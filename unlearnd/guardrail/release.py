"""When generated text may leave: the output guard's release rule.

The guard checks the whole output after every delta; what it has checked may still become part of a
match that completes later ("Takashi" before " Nakamura"). Holding a fixed 96 characters back made every
ordinary stream wait for 96 characters. Instead, `ReleaseIndex.hold_from` finds the earliest position
where a protected match could still be under way, and everything before it is released:

* the unfinished last word, when it could still grow into a protected word (a prefix as written; with one
  edit once it has `MIN_LETTERS` letters, for name parts long enough for the name search to allow a typo),
  except the output's first word while it has fewer than `MIN_LETTERS` letters (so a stream's first token
  does not wait for its second; at most `MIN_LETTERS - 1` letters of a name leave that way);
* a trailing run of complete words each of which could be part of a protected phrase (a name part, with one
  edit when long; an uncommon title or birthplace word; leetspeak and other scripts read as letters);
* a disguised form in progress: a suffix of the output's letters (spacing, digits and punctuation
  dropped; also what NATO code words spell) that begins a whole name or title, as written, reversed or
  ROT13'd, once that suffix is `MIN_LETTERS` long (so at most `MIN_LETTERS - 1` letters of a spread-out
  name can leave before its block);
* a trailing run of date words (numbers, month names), while a request has full dates;
* a trailing run that repeats a forget answer word for word, from its first word that carries information;
* the current sentence, while it shares an uncommon word with a forget answer (it may be restating it:
  the meaning check compares the sentence when it ends);
* the request's birthplace named in the last `TAIL_CHARS`, while a request has a birth year to pair it with.

Ordinary text matches none of these, so it leaves one token behind generation at most. `stream-first`
releases everything at once and only cuts the stream when a check fires (what leaves before is gone);
`fixed` holds a fixed number of characters back (the rule before this one, kept to measure against).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from unlearnd.detectors.normalize import NATO, letters, to_ascii, unleet
from unlearnd.detectors.spans import fold, fold_word, tokens

RELEASE_MODES = ("strict", "stream-first", "fixed")  # fixed: `hold_chars` behind, always (the old rule)
MIN_LETTERS = 4  # a letters-only suffix this long that begins a protected form is held
MIN_TYPO_LEN = 5  # protected words this long also match with one edit (as the anchor search allows)
TAIL_CHARS = 256
_DATE_WORD = re.compile(r"^\d{1,4}(st|nd|rd|th)?$")
_SENTENCE_END = re.compile(r"[.!?。！？\n]")
_MONTHS = {
    "january", "february", "march", "april", "may", "june", "july", "august", "september", "october",
    "november", "december", "jan", "feb", "mar", "apr", "jun", "jul", "aug", "sep", "sept", "oct", "nov", "dec",
}  # fmt: skip


def _deletions(word: str) -> set[str]:
    return {word[:i] + word[i + 1 :] for i in range(len(word))}


def _forms(word: str) -> set[str]:
    """A word as names are compared, read as written, transliterated, and with leetspeak as letters."""
    ascii_word = to_ascii(word)
    return {f for f in (fold_word(word), fold_word(ascii_word), fold_word(unleet(ascii_word))) if f}


@dataclass
class RequestHolds:
    """What one forget request protects, in the shapes the release rule looks for."""

    words: set[str] = field(default_factory=set)  # name parts (folded; one typo allowed when long)
    forms: set[str] = field(default_factory=set)  # whole names and titles, letters only, + reversed, ROT13
    places: list[list[str]] = field(default_factory=list)  # birthplaces (folded words), when it has dates
    dates: bool = False
    answer_grams: set[tuple[str, ...]] = field(default_factory=set)  # distinctive 4-grams of its forget answers
    rare_words: set[str] = field(default_factory=set)  # uncommon words of its forget answers
    exact_words: set[str] = field(default_factory=set)  # uncommon title and birthplace words (as written)


def build_sets(holds: list[RequestHolds]) -> dict[str, object]:
    """The prefix sets of the release rule over every request's holds (`ReleaseIndex`'s attributes)."""
    names = set().union(*(h.words for h in holds))
    words = names | set().union(*(h.exact_words for h in holds))
    # One typo, as the name search allows it: only in name parts this long (titles and places match as written)
    typo_words = {w for w in names if len(w) >= MIN_TYPO_LEN}
    word_deletions = set().union(*(_deletions(w) for w in typo_words))
    forms = set().union(*(h.forms for h in holds))
    places = [p for h in holds for p in h.places]
    places_by_first: dict[str, list[list[str]]] = {}  # a birthplace's first word -> the birthplaces
    for place in places:
        places_by_first.setdefault(place[0], []).append(place)
    grams = set().union(*(h.answer_grams for h in holds))
    return {
        "words": words,
        "word_prefixes": {w[:i] for w in words for i in range(1, len(w) + 1)},
        "typo_words": typo_words,
        "typo_word_prefixes": {w[:i] for w in typo_words for i in range(MIN_LETTERS - 1, len(w) + 1)},
        "word_deletions": word_deletions,
        "typo_prefixes": {d[:i] for d in word_deletions for i in range(MIN_LETTERS - 1, len(d) + 1)},
        "form_prefixes": {f[:i] for f in forms for i in range(MIN_LETTERS, len(f) + 1)},
        "longest_form": max((len(f) for f in forms), default=0),
        "places": places,
        "places_by_first": places_by_first,
        "dates": any(h.dates for h in holds),
        "answer_runs": grams | {g[:k] for g in grams for k in (1, 2, 3)},
        "rare_words": set().union(*(h.rare_words for h in holds)),
    }


class ReleaseIndex:
    """The union of every loaded request's holds, as prefix sets the release rule reads in one pass.

    The sets are rebuilt after a change, once: by `prepare` off the event loop after a registry sync (with a
    thousand requests a build takes most of a second, which the first stream after the change paid while
    every other stream waited), else when the rule next runs. A server that loads a thousand requests at
    start builds them once."""

    def __init__(self) -> None:
        self.requests: dict[str, RequestHolds] = {}
        self._version = 0  # changes made
        self._built = -1  # the version the sets were built from

    @property
    def stale(self) -> bool:
        return self._built != self._version

    def set(self, request_id: str, holds: RequestHolds) -> None:
        self.requests[request_id] = holds
        self._version += 1

    def remove(self, request_id: str) -> None:
        if self.requests.pop(request_id, None) is not None:
            self._version += 1

    def snapshot(self) -> tuple[int, list[RequestHolds]]:
        """What a build reads (taken under the caller's lock; the build itself needs none)."""
        return self._version, list(self.requests.values())

    def install(self, version: int, built: dict[str, object]) -> None:
        """Swap in sets built from `snapshot()` at `version`, unless something changed since."""
        if version == self._version:
            self.__dict__.update(built)
            self._built = version

    def _build(self) -> None:
        version, holds = self.snapshot()
        self.install(version, build_sets(holds))

    # -- the rule -------------------------------------------------------------------------------------
    def hold_from(self, text: str, final: bool, info: Callable[[str], float]) -> int:
        """The earliest position of `text` (an output so far) that must stay held; len(text) holds nothing.
        `info`: how much a (folded) word says (the guard's information weight)."""
        if final or not self.requests:
            return len(text)
        if self.stale:
            self._build()
        toks = tokens(text)
        unfinished = bool(text) and text[-1].isalnum() and bool(toks) and toks[-1][2] == len(text)
        candidates = [
            self._word_run(text, toks, unfinished),
            self._letters(text),
            self._nato(toks),
            self._date_run(toks),
            self._answer_run(toks, unfinished, info),
            self._sentence(text),
            self._place(text),
        ]
        return min(len(text), *candidates)

    def _protected_like(self, word: str) -> bool:
        """Whether a complete word could be part of a protected phrase (a name part with one typo when long)."""
        for form in _forms(word):
            if form in self.words:
                return True
            if len(form) < MIN_TYPO_LEN - 1:
                continue
            if form in self.word_deletions or any(d in self.typo_words for d in _deletions(form)):
                return True  # a letter missing, or one too many
            if len(form) >= MIN_TYPO_LEN and _deletions(form) & self.word_deletions:
                return True  # a letter changed or two swapped
        return False

    def _could_grow(self, partial: str) -> bool:
        """Whether an unfinished word could still become a protected word: as written from its first
        letter; with a typo once it has `MIN_LETTERS` letters (a typo'd name is a disguised form, and the
        letters rule lets as many letters of a disguised form leave: with a hundred requests nearly every
        short start is one edit from some name's start, and holding those held every stream's first word)."""
        for form in _forms(partial):
            if form in self.word_prefixes:
                return True
            if len(form) < MIN_LETTERS:
                continue
            if form in self.typo_prefixes:
                return True  # a letter missing
            if any(d in self.typo_word_prefixes or d in self.typo_prefixes for d in _deletions(form)):
                return True  # one letter too many, or a letter changed
        return False

    def _fragment(self, partial: str) -> bool:
        """Whether the output's unfinished first word is too short to say anything: under `MIN_LETTERS`
        letters and no protected word itself. It leaves with its own token, so a stream's first word does
        not wait for the next one (with a thousand requests nearly every short start, "The", "In", "A",
        begins some name): at most `MIN_LETTERS - 1` letters of a name can leave this way, as many as the
        letters rule lets go of a spread-out name. Later words are held whole."""
        forms = _forms(partial)
        return all(len(f) < MIN_LETTERS and f not in self.words for f in forms)

    def _word_run(self, text: str, toks: list[tuple[str, int, int]], unfinished: bool) -> int:
        hold = len(text)
        complete = toks[:-1] if unfinished else toks
        if unfinished and self._could_grow(toks[-1][0]):
            if len(toks) == 1 and self._fragment(toks[-1][0]):
                return hold  # the output's first few letters (see `_fragment`)
            hold = toks[-1][1]
        elif unfinished:
            return hold  # the last word cannot become protected: nothing before it continues a phrase
        for word, start, _ in reversed(complete):
            if not self._protected_like(word):
                break
            hold = start
        return hold

    def _letters(self, text: str) -> int:
        """A suffix of the output's letters that begins a whole protected form."""
        if not self.form_prefixes:
            return len(text)
        hold = len(text)
        window = _last_letters(text, self.longest_form + 1)
        for stream, positions in window:
            for k in range(len(stream) - MIN_LETTERS, -1, -1):
                if stream[k:] in self.form_prefixes:
                    hold = min(hold, positions[k])
        return hold

    def _nato(self, toks: list[tuple[str, int, int]]) -> int:
        """A trailing run of NATO code words whose letters begin a protected form."""
        run = []
        for word, start, _ in reversed(toks):
            if word.lower() not in NATO:
                break
            run.append((NATO[word.lower()], start))
        run.reverse()
        spelled = "".join(letter for letter, _ in run)
        for k in range(len(run)):
            if len(spelled) - k >= MIN_LETTERS and spelled[k:] in self.form_prefixes:
                return run[k][1]
        return _END

    def _date_run(self, toks: list[tuple[str, int, int]]) -> int:
        if not self.dates:
            return _END
        hold = _END
        for word, start, _ in reversed(toks):
            w = word.lower().rstrip(".,")
            if not (_DATE_WORD.match(w) or w in _MONTHS or w == "of"):
                break
            hold = start
        return hold

    def _answer_run(self, toks: list[tuple[str, int, int]], unfinished: bool, info: Callable[[str], float]) -> int:
        """A trailing run that repeats a forget answer, from its first word that says something."""
        if not self.answer_runs:
            return _END
        words = [(fold(w), s) for w, s, _ in (toks[:-1] if unfinished else toks)]
        start = len(words)
        for i in range(len(words) - 1, -1, -1):
            run = tuple(w for w, _ in words[i:])
            if len(run) <= 3:
                if run not in self.answer_runs:
                    break
            elif run[:4] not in self.answer_runs:
                break
            start = i
        for word, pos in words[start:]:
            if info(word) > 0:
                return pos
        return _END

    def _sentence(self, text: str) -> int:
        """The current sentence, while it shares an uncommon word with a forget answer."""
        if not self.rare_words:
            return _END
        ends = list(_SENTENCE_END.finditer(text))
        start = ends[-1].end() if ends else 0
        if any(fold(w) in self.rare_words for w, _, _ in tokens(text[start:])):
            return start
        return _END

    def _place(self, text: str) -> int:
        """A request's birthplace in the recent output, while its birth year may still follow."""
        if not self.places:
            return _END
        offset = max(0, len(text) - TAIL_CHARS)
        toks = tokens(text[offset:])
        folded = [fold_word(w) for w, _, _ in toks]
        for i, word in enumerate(folded):  # looked up by first word: a thousand requests' places, one pass
            if any(folded[i : i + len(p)] == p for p in self.places_by_first.get(word, ())):
                return offset + toks[i][1]
        return _END


_END = 1 << 62  # "no hold" for one rule (the minimum over the rules is capped by the text's length)


_LEET_CHARS = frozenset(c for c in map(chr, range(33, 127)) if not c.isalpha() and letters(unleet("a" + c)[1:]))


def _last_letters(text: str, n: int) -> Iterable[tuple[str, list[int]]]:
    """The last `n` letters of `text`, as two letters-only streams (leetspeak digits read as letters, and
    digits dropped), each with the position in `text` every letter came from."""
    plain: list[tuple[str, int]] = []
    leet: list[tuple[str, int]] = []
    i = len(text)
    while i > 0 and (len(plain) < n or len(leet) < n):
        i -= 1
        char = text[i]
        if char.isascii():  # the common case, without the transliteration table
            lower = char.lower()
            if "a" <= lower <= "z":
                plain.append((lower, i))
                leet.append((lower, i))
            elif char in _LEET_CHARS:
                leet.extend((c, i) for c in reversed(letters(unleet("a" + char)[1:])))
            continue
        ascii_char = to_ascii(char)
        plain.extend((c, i) for c in reversed(letters(ascii_char)))
        leet.extend((c, i) for c in reversed(letters(unleet("a" + ascii_char)[1:])))
    for stream in (plain[:n][::-1], leet[:n][::-1]):
        yield "".join(c for c, _ in stream), [p for _, p in stream]
