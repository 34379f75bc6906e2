"""The output guard: what the model says is checked too, on every route (`none` included).

The input detector can miss (a new disguise, a question that never names its subject); the answer
cannot hide what it is about. Generated text is checked against every active forget request that
has not switched it off (`options.output_guard: false`):

* anchors: the request's names (in any disguise), quoted titles and birth details
  (`detectors.anchors`), as in a prompt, one part of a name alone not counting;
* answer reproduction: the output repeats, word for word in 4-gram runs, enough of one forget
  answer that what it repeats carries `MIN_INFO` of information: each content word counts by how
  uncommon it is in English (`COMMON_ZIPF` minus its Zipf frequency, wordfreq), 4-grams of ordinary
  text (the built-in chat prompts) count nothing. Biography templates shared by everyone ("the
  author's full name is", "a member of the LGBTQ+ community", "has been honored with the
  prestigious") carry little and are no evidence about one person; runs with the uncommon words of
  the answer (names, invented places, titles, specific trades) are. A word that 1% of the request's
  retain examples (two at least) use counts nothing in the answer's prose, only inside a named thing
  (capitalised mid-sentence: "Medal for Outstanding Discoveries") or a number: other subjects' answers
  use it too ("critically acclaimed, with reviewers praising" cut another author's answer in
  `reports/continual-lora.md`). It still counts for what is held back while streaming.
* answer restatement (when the detector has a sentence encoder): each sentence of the output (and
  every `MEANING_EVERY_WORDS` words of a long one) that shares an uncommon word (`MEANING_WORD_ZIPF`)
  with some forget answer is embedded and compared with the request's forget answers; a cosine at or
  above the answer's threshold means the answer is being restated in other words. Each answer's
  threshold is calibrated when the request is loaded: `MEANING_MARGIN` above the closest text that
  must pass (the request's retain answers and ordinary chat), never below `MEANING_FLOOR`. A
  restatement is cut when its sentence ends, so words of that sentence more than `hold_chars` back
  may already be out: the word checks above are what holds text back.

On a hit the choice is cut and its text replaced by the request's refusal; its generation stops.
Output is released as soon as it cannot be part of a match still under way (`guardrail.release`: the
`strict` mode, the default), so the words that trigger a block (a name, a title, the start of a
reproduced answer) are never sent, also when streaming, and the log-probs of withheld text are never
returned; ordinary text leaves one token behind generation at most. On the subject of a flagged prompt,
where one part of a name is enough, output is released `hold_chars` behind generation. `stream-first`
releases at once and only cuts the stream when a check fires.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import threading
from collections import Counter
from collections.abc import AsyncIterator, Callable, Collection, Sequence
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Any

import numpy as np

from unlearnd.batching import MicroBatcher
from unlearnd.detectors.anchors import COMPACT_MIN, FLAG_SCORE, AnchorIndex, extract_anchors
from unlearnd.detectors.lookup import MeaningMatrix, OwnerIndex
from unlearnd.detectors.negatives import chat_prompts
from unlearnd.detectors.normalize import letters, to_ascii
from unlearnd.detectors.spans import FUNCTION_WORDS, STOPWORDS, fold, fold_word, zipf
from unlearnd.domain import ForgetRequest, ForgetSpec, QAExample
from unlearnd.engine.base import ChoiceDelta, TokenLogprob
from unlearnd.guardrail.release import RELEASE_MODES, ReleaseIndex, RequestHolds, build_sets
from unlearnd.interventions.guardrails import refusal_of

log = logging.getLogger(__name__)

_WORD = re.compile(r"[^\W_]+(?:['’][^\W_]+)?")
_POSSESSIVE = re.compile(r"['’]s$")
HOLD_CHARS = 96  # on a flagged prompt's subject: what is withheld until the text after it is checked
TAIL_CHARS = 256  # how much of the end of the output the anchor check reads each time
MEANING_FLOOR = 0.80  # cosine below which a sentence never counts as restating a forget answer
MEANING_MARGIN = 0.05  # above the closest retain / ordinary text, per forget answer
MEANING_EVERY_WORDS = 16  # a long sentence is also checked every this many words
MEANING_MIN_WORDS = 5  # shorter pieces carry too little to compare
# A sentence is embedded only if it shares a word this uncommon (Zipf frequency, wordfreq) with some forget
# answer: on TOFU's retain authors (never the evaluated ones) every paraphrase sentence at the meaning floor
# or above shared one with its answer (349 of 349; at Zipf 4.0, 343), and most ordinary sentences share none.
MEANING_WORD_ZIPF = 4.5
_SENTENCE_END = re.compile(r"[.!?。！？\n]")
COMMON_ZIPF = 6.0  # Zipf frequency (log10 uses per billion words) of words that carry no information ("time")
PROTECTED_INFO = 2.5  # a forget-answer word this uncommon (Zipf < 3.5) is never offered as a log-prob alternative
RETAIN_SHARE = 0.01  # a word this share of the retain examples use is shared prose, not the subject's
MIN_INFO = 8.0  # information repeated from one answer that makes the output a reproduction: two or three
# uncommon words (Zipf 2-3.5) with their context; a biography template carries 2-5


def _words(text: str) -> list[str]:
    return [fold(w) for w in _WORD.findall(text)]


def _unpossessive(word: str) -> str:
    """A possessive as its word ("Kuwait's" -> "kuwait"), with either apostrophe: it is as common as its word."""
    return _POSSESSIVE.sub("", word.replace("’", "'"))


def _key_forms(word: str) -> set[str]:
    """A word as the meaning pre-check files it: a possessive as its word, a plural also as its singular
    ("novels" is uncommon, "novel" is not)."""
    base = _unpossessive(word)
    return {base, base[:-1]} if len(base) > 3 and base.endswith("s") else {base} if base else set()


def _meaning_keys(words: list[str]) -> set[str]:
    """The keys a sentence is looked up by in the meaning pre-check."""
    return set().union(*map(_key_forms, words)) if words else set()


def _answer_keys(words: list[str]) -> set[str]:
    """The keys of one forget answer: its uncommon words, or for a plain answer with none ("She was born in
    New York City, USA.") all its content words, so that no answer goes unchecked (at the price of checking
    more ordinary sentences while such a request is active)."""
    distinct = {w for w in words if _key_forms(w)}
    chosen = {w for w in distinct if zipf(_unpossessive(w)) < MEANING_WORD_ZIPF}
    if not chosen:
        chosen = {w for w in distinct if w not in STOPWORDS and w not in FUNCTION_WORDS and len(w) >= 3}
    return _meaning_keys(sorted(chosen))


def _grams(words: list[str], n: int = 4) -> set[tuple[str, ...]]:
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


@lru_cache(maxsize=65536)
def information(word: str) -> float:
    """How much repeating `word` says: nothing for function words, more the less common it is."""
    if word in STOPWORDS or word in FUNCTION_WORDS or len(word) < 3:
        return 0.0
    return max(0.0, COMMON_ZIPF - zipf(_unpossessive(word)))


@dataclass
class _Answer:
    """A forget answer as the guard reads it: where each of its 4-grams starts, what each word says."""

    starts: dict[tuple[str, ...], list[int]]
    info: list[float]
    words: list[str]

    @classmethod
    def of(cls, text: str, ordinary: set[tuple[str, ...]], shared: frozenset[str] = frozenset()) -> _Answer:
        """`shared`: the words the request's retain examples share (`retain_words`); in the answer's own prose
        they say nothing about this subject, inside a named thing or a number they still do."""
        words = _words(text)
        starts: dict[tuple[str, ...], list[int]] = {}
        for i in range(len(words) - 3):
            gram = tuple(words[i : i + 4])
            if gram not in ordinary:
                starts.setdefault(gram, []).append(i)
        kept = _named_or_number(text)
        info = [
            0.0 if _unpossessive(w) in shared and not keep else information(w)
            for w, keep in zip(words, kept, strict=True)
        ]
        return cls(starts, info, words)

    def repeated(self, grams: set[tuple[str, ...]]) -> float:
        """Information of this answer's words that `grams` (an output's 4-grams) repeat, each word once."""
        covered = {i + k for g in self.starts.keys() & grams for i in self.starts[g] for k in range(4)}
        return sum(self.info[i] for i in covered)


_ORDINARY: set[tuple[str, ...]] | None = None


def _named_or_number(text: str) -> list[bool]:
    """Per word of `text` (as `_words` splits it): capitalised where a sentence does not begin ("the
    International Medal for Outstanding Discoveries"), or holding a digit: a fact, whatever words it shares."""
    out, end, opens = [], 0, True
    for m in _WORD.finditer(text):
        between = text[end : m.start()]
        if "\n" in between:
            opens = True
        elif between.strip():
            opens = between.rstrip()[-1] in ".!?"
        word, end = m.group(0), m.end()
        out.append(any(c.isdigit() for c in word) or (word[0].isupper() and not opens))
        opens = False
    return out


def retain_words(spec: ForgetSpec) -> frozenset[str]:
    """Words that at least `RETAIN_SHARE` of a request's retain examples (and two at least) use, as the
    reproduction check reads words: prose other subjects' answers share ("critically acclaimed, with reviewers
    praising") carries no information about this one. A share, not any use: in a large retain set a trade
    ("florist") turns up in a few answers by chance and is still this subject's fact."""
    examples = ForgetSpec.as_qa(spec.retain)
    uses = Counter(w for qa in examples for w in {_unpossessive(w) for w in _words(f"{qa.question} {qa.answer}")})
    least = max(2, math.ceil(RETAIN_SHARE * len(examples)))
    return frozenset(w for w, n in uses.items() if n >= least)


def ordinary_grams() -> set[tuple[str, ...]]:
    """4-grams of ordinary text (the built-in chat prompts): never distinctive of a forget answer."""
    global _ORDINARY
    if _ORDINARY is None:
        _ORDINARY = set().union(*(_grams(_words(t)) for t in chat_prompts()))
    return _ORDINARY


@dataclass
class Block:
    request_id: str
    reason: str  # "anchor:<kind>", "name_part", "answer" or "answer:meaning"
    refusal: str


@dataclass
class _Choice:
    text: str = ""  # what the choice generated so far
    ahead: str = ""  # its log-prob tokens, joined: ahead of `text` while the engine holds text for a stop string
    released: int = 0  # characters of `text` already sent
    held: list[tuple[ChoiceDelta, int]] = field(default_factory=list)  # (delta, how far its text or tokens reach)
    grams: set[tuple[str, ...]] = field(default_factory=set)
    checked_with: dict | None = None  # the guard's table (`loaded`) its 4-grams were last looked up in
    words_seen: int = 0  # complete words whose 4-grams are in `grams`
    hidden: str = ""  # the letters of the output only (spacing, punctuation, digits gone)
    sentence_start: int = 0  # where the sentence not yet compared by meaning begins
    meaning_words: int = 0  # words of it at the last comparison
    blocked: Block | None = None

    @property
    def visible(self) -> str:
        """The furthest view of the output: the log-prob tokens when they run ahead of the text."""
        return self.ahead if len(self.ahead) > len(self.text) else self.text


@dataclass
class _Meanings:
    """A request's forget answers as unit sentence embeddings, with each answer's calibrated threshold."""

    answers: np.ndarray  # (k, d)
    thresholds: np.ndarray  # (k,)


@dataclass
class _Loaded:
    """Everything the guard holds for one request, built off the event loop and swapped in at once."""

    answers: list[_Answer]
    refusal: str
    protected: frozenset[str]  # name parts and uncommon answer words: no log-prob alternative may spell them


class OutputGuard:
    def __init__(
        self,
        hold_chars: int = HOLD_CHARS,
        min_info: float = MIN_INFO,
        encoder: Callable[[], Any] | None = None,
        release: str = "strict",
    ):
        """`encoder`: gives the sentence encoder (`.encode(texts).emb`, unit rows) the meaning check uses;
        None switches that check off. `release`: "strict" (nothing that could be part of a match leaves)
        or "stream-first" (everything leaves at once; a block cuts the stream)."""
        if release not in RELEASE_MODES:
            raise ValueError(f"release must be one of {RELEASE_MODES}, not {release!r}")
        self.release_mode = release
        self.holds = ReleaseIndex()
        self.hold_chars = hold_chars
        self.min_info = min_info
        self.encoder = encoder
        self.anchors = AnchorIndex()
        self.loaded: dict[str, _Loaded] = {}
        self._hidden: dict[str, list[str]] = {}  # request -> its spread-out name and title forms
        self._hidden_index = OwnerIndex()  # first COMPACT_MIN letters of a hidden form -> requests
        self._grams = OwnerIndex()  # a forget answer's 4-gram -> requests
        self._meaning_matrix = MeaningMatrix()
        self._meaning_words = OwnerIndex()  # an uncommon word of a forget answer -> requests (meaning pre-check)
        self._protected: tuple[dict, frozenset[str]] = ({}, frozenset())  # (of which `loaded`, its protected words)
        self._parts: dict[str, set[str]] = {}
        self._lock = threading.Lock()  # loads run in a worker thread while checks run on the event loop
        self._ordinary_emb: np.ndarray | None = None
        self._meaning_batcher = MicroBatcher(self.restated_many)

    @property
    def request_ids(self) -> set[str]:
        return set(self.loaded)

    @property
    def checks_meaning(self) -> bool:
        return self.encoder is not None and bool(self._meaning_matrix)

    def load(self, request: ForgetRequest, elicited: Sequence[QAExample] = ()) -> None:
        """`elicited`: what the served model said about the subject (its fact terms join the anchors' facts)."""
        if request.spec.options.get("output_guard") is False:
            self.unload(request.id)
            return
        anchors = extract_anchors(request.spec, elicited)
        ordinary = ordinary_grams()
        shared = retain_words(request.spec)
        forget = ForgetSpec.as_qa(request.spec.forget)
        answers = [_Answer.of(qa.answer, ordinary, shared) for qa in forget if qa.answer]
        meanings = self._meanings(request) if self.encoder is not None else None
        # what is held back and never offered as an alternative: every uncommon word, retain-shared or not
        rare_words = {w for a in answers for w in a.words if information(w) >= PROTECTED_INFO}
        with self._lock:
            self.anchors.add(request.id, anchors)
            self._parts[request.id] = self.anchors.name_parts(request.id)
            self._hidden[request.id] = [form for form, _ in self.anchors.hidden_forms(request.id)]
            self._hidden_index.set(request.id, {form[:COMPACT_MIN] for form in self._hidden[request.id]})
            grams = {gram for answer in answers for gram in answer.starts}
            self._grams.set(request.id, grams)
            if meanings is not None:
                self._meaning_matrix.set(request.id, meanings.answers, meanings.thresholds)
                self._meaning_words.set(request.id, set().union(*(_answer_keys(a.words) for a in answers)))
            else:
                self._meaning_matrix.remove(request.id)
                self._meaning_words.remove(request.id)
            uncommon_parts = self.anchors.name_parts(request.id, uncommon_only=True)
            protected = frozenset(uncommon_parts | {fold_word(w) for w in rare_words} - {""})
            self.loaded = {**self.loaded, request.id: _Loaded(answers, refusal_of(request), protected)}
            self.holds.set(request.id, self._holds(request.id, grams, rare_words))

    def _holds(self, request_id: str, grams: set[tuple[str, ...]], rare_words: set[str]) -> RequestHolds:
        words, exact_words, places, dates = self.anchors.release_words(request_id)
        forms = set(self._hidden.get(request_id, []))
        return RequestHolds(words, forms, places, dates, grams, rare_words, exact_words)

    def unload(self, request_id: str) -> None:
        with self._lock:
            self.holds.remove(request_id)
            self.anchors.remove(request_id)
            self._parts.pop(request_id, None)
            self._hidden.pop(request_id, None)
            self._hidden_index.remove(request_id)
            self._grams.remove(request_id)
            self._meaning_matrix.remove(request_id)
            self._meaning_words.remove(request_id)
            self.loaded = {rid: entry for rid, entry in self.loaded.items() if rid != request_id}

    def _meanings(self, request: ForgetRequest) -> _Meanings | None:
        answers = [qa.answer for qa in ForgetSpec.as_qa(request.spec.forget) if qa.answer]
        if not answers or self.encoder is None:
            return None
        encoder = self.encoder()
        if self._ordinary_emb is None:
            self._ordinary_emb = encoder.encode(list(chat_prompts())).emb
        passing = [qa.answer for qa in ForgetSpec.as_qa(request.spec.retain) if qa.answer]
        calibration = self._ordinary_emb
        if passing:
            calibration = np.concatenate([calibration, encoder.encode(passing).emb])
        emb = encoder.encode(answers).emb
        closest = (emb @ calibration.T).max(axis=1) if len(calibration) else np.zeros(len(answers))
        return _Meanings(emb, np.maximum(MEANING_FLOOR, closest + MEANING_MARGIN))

    def prepare(self) -> None:
        """Build what the checks read lazily (the stacked answer matrix, the release rule's sets), off the
        request path: after a sync loaded requests, not in the first stream that needs it. The release sets
        are built outside the lock the streams' checks take, then swapped in."""
        with self._lock:
            if self._meaning_matrix:
                self._meaning_matrix.prepare()
            version, holds = self.holds.snapshot()
            if not self.holds.stale:
                return
        built = build_sets(holds)
        with self._lock:
            self.holds.install(version, built)

    def restates(self, text: str) -> Block | None:
        """The first active request one of whose forget answers `text` restates (meaning check)."""
        return self.restated_many([text])[0] if self.checks_meaning else None

    def restated_many(self, texts: list[str], exempt: str | None = None) -> list[Block | None]:
        """`restates` of each text: one encoder call and one matrix product for all of them (concurrent
        streams' sentences arrive together through `_meaning_batcher`)."""
        if not self.checks_meaning:
            return [None] * len(texts)
        embs = self.encoder().encode(texts).emb
        with self._lock:
            request_ids = self._meaning_matrix.first_restated_many(embs, exempt)
        loaded = self.loaded
        entries = [loaded.get(rid) if rid is not None else None for rid in request_ids]
        return [
            Block(rid, "answer:meaning", entry.refusal) if entry is not None else None
            for rid, entry in zip(request_ids, entries, strict=True)
        ]

    def check(
        self,
        text: str,
        grams: set[tuple[str, ...]] | None = None,
        hidden: str | None = None,
        flagged: Collection[str] = (),
        fresh: set[tuple[str, ...]] | None = None,
        exempt: str | None = None,
    ) -> Block | None:
        """The first active request `text` (an output so far) gives away, if any. `hidden`: the output's
        letters only (default: from `text`); `flagged`: the requests the prompt was flagged for, on whose
        subject one distinctive part of a name alone is enough; `exempt`: a request not checked."""
        loaded = self.loaded if exempt is None else {rid: e for rid, e in self.loaded.items() if rid != exempt}
        hidden = hidden if hidden is not None else letters(to_ascii(text))
        grams = grams if grams is not None else _grams(_words(text))
        windows = {hidden[i : i + COMPACT_MIN] for i in range(len(hidden) - COMPACT_MIN + 1)}
        with self._lock:
            found = self.anchors.find(text[-TAIL_CHARS:])
            hidden_forms = {rid: self._hidden[rid] for rid in self._hidden_index.owners(windows)}
            parts = {rid: self._parts.get(rid, set()) for rid in flagged}
            # a request's repetition grows only with its own 4-grams: those new since the last check decide
            repeating = self._grams.owners(grams if fresh is None else fresh)
        for request_id, hit in found.items():
            if hit.score >= FLAG_SCORE and request_id in loaded:
                return Block(request_id, f"anchor:{hit.kind}", loaded[request_id].refusal)
        for request_id, forms in hidden_forms.items():
            if request_id in loaded and any(form in hidden for form in forms):
                return Block(request_id, "anchor:name_hidden", loaded[request_id].refusal)
        if parts:
            words = {fold_word(w) for w in _words(text[-TAIL_CHARS:])}
            for request_id, names in parts.items():
                if request_id in loaded and words & names:
                    return Block(request_id, "name_part", loaded[request_id].refusal)
        for request_id in repeating:  # only requests sharing a 4-gram with the output can be repeated
            entry = loaded.get(request_id)
            if entry is not None and any(answer.repeated(grams) >= self.min_info for answer in entry.answers):
                return Block(request_id, "answer", entry.refusal)
        return None

    async def blocks(self, text: str, flagged: Collection[str] = ()) -> Block | None:
        """The block a whole text (a continuation to score) would get as output, meaning check included."""
        if not self.loaded:
            return None
        block = self.check(text, flagged=flagged)
        if block is None and self.checks_meaning and len(text.split()) >= MEANING_MIN_WORDS:
            block = (await self._meaning_batcher([text.strip()]))[0]
        return block

    def _withhold_alternatives(self, state: _Choice, delta: ChoiceDelta) -> ChoiceDelta:
        """`delta` without the top-log-prob alternatives that would spell a protected word (a name part,
        an uncommon word of a forget answer): the alternatives are what the model would have said."""
        if not delta.logprobs:
            return delta
        loaded = self.loaded  # replaced, never changed, on a load: the union is rebuilt once per table
        source, protected = self._protected
        if source is not loaded:
            protected = frozenset().union(*(entry.protected for entry in loaded.values()))
            self._protected = (loaded, protected)
        if not protected:
            return delta
        before = state.visible[: max(0, len(state.visible) - sum(len(t.token) for t in delta.logprobs))]
        kept = []
        for item in delta.logprobs:
            partial = fold_word(_TRAILING_WORD.search(before).group(0)) if _TRAILING_WORD.search(before) else ""
            alternatives = {
                token: lp
                for token, lp in item.top_logprobs.items()
                if not _spells(partial, token, protected) or token == item.token
            }
            kept.append(TokenLogprob(item.token, item.logprob, alternatives))
            before += item.token
        return replace(delta, logprobs=kept)

    async def filter(
        self,
        deltas: AsyncIterator[ChoiceDelta],
        encode: Callable[[str], list[int]],
        on_block: Callable[[Block, int], None],
        n: int | None = None,
        flagged: Collection[str] = (),
        exempt: str | None = None,
    ) -> AsyncIterator[ChoiceDelta]:
        """`deltas` with every choice's text released `hold_chars` behind its end once checked; a choice
        that gives a forget request (other than `exempt`) away is cut, its text replaced by the refusal, its
        log-probs dropped.
        Log-prob tokens can run ahead of the text (the engine holds text back while it may still match a
        stop string): what they reach is checked and held back the same way."""
        choices: dict[int, _Choice] = {}
        async for delta in deltas:
            state = choices.setdefault(delta.index, _Choice())
            if state.blocked is not None:
                continue
            state.text += delta.text
            state.ahead += "".join(t.token for t in delta.logprobs or [])
            state.hidden += letters(to_ascii(delta.text))
            final = delta.finish_reason is not None
            visible = state.visible
            words = _words(visible)
            complete = len(words) if final or not visible[-1:].isalnum() else len(words) - 1  # the last may go on
            added: set[tuple[str, ...]] = set()
            if complete > state.words_seen:  # new 4-grams end in the newly complete words
                added = _grams(words[max(0, state.words_seen - 3) : complete])
                state.grams |= added
                state.words_seen = complete
            hidden = state.hidden if len(state.ahead) <= len(state.text) else letters(to_ascii(visible))
            fresh = added if state.checked_with is self.loaded else None  # a load since: look all up again
            state.checked_with = self.loaded
            block = self.check(visible, state.grams, hidden, flagged, fresh, exempt)
            if block is None and self.checks_meaning:
                ended = final or bool(_SENTENCE_END.search(delta.text))
                block = await self._check_meaning(state, ended, exempt)
            if block is not None:
                state.blocked = block
                state.held.clear()
                on_block(block, delta.index)
                yield ChoiceDelta(
                    index=delta.index, text=block.refusal, token_ids=encode(block.refusal), finish_reason="stop"
                )
                if n is not None and sum(c.blocked is not None for c in choices.values()) == n:
                    return  # every choice is cut: the generation can stop
                continue
            state.held.append((self._withhold_alternatives(state, delta), len(visible)))
            for released in self._release(state, self._releasable(visible, final, flagged)):
                yield released

    async def _check_meaning(self, state: _Choice, ended: bool, exempt: str | None = None) -> Block | None:
        """Compare the current sentence by meaning when it ends, or every few words of a long one (an
        exempt call's sentences go alone: a batch shares one request left out, or none)."""
        piece = state.text[state.sentence_start :]
        words = len(piece.split())
        if not ended and words - state.meaning_words < MEANING_EVERY_WORDS:
            return None
        state.meaning_words = words
        if ended:
            state.sentence_start, state.meaning_words = len(state.text), 0
        if words < MEANING_MIN_WORDS or not self.may_restate(piece):
            return None
        if exempt is not None:
            return (await asyncio.to_thread(self.restated_many, [piece.strip()], exempt))[0]
        return (await self._meaning_batcher([piece.strip()]))[0]

    def may_restate(self, piece: str) -> bool:
        """Whether `piece` shares an uncommon word with some forget answer: the cheap pre-check that
        spares the encoder (most of the guard's cost per streamed word) for ordinary sentences."""
        with self._lock:
            return bool(self._meaning_words.owners(_meaning_keys(_words(piece))))

    def _releasable(self, visible: str, final: bool, flagged: Collection[str]) -> int:
        """How much of the output may leave now (the release rule of the module docstring)."""
        if final or self.release_mode == "stream-first":
            return len(visible)
        if flagged or self.release_mode == "fixed":
            return len(visible) - self.hold_chars
        with self._lock:
            return self.holds.hold_from(visible, final, information)

    def _release(self, state: _Choice, limit: int) -> list[ChoiceDelta]:
        """The held deltas whose text and tokens end at or before `limit`, in order."""
        out = []
        while state.held:
            delta, end = state.held[0]
            if end > limit:
                break
            out.append(delta)
            state.held.pop(0)
            state.released += len(delta.text)
        return out


_TRAILING_WORD = re.compile(r"[^\W_]*$")


def _spells(partial: str, token: str, protected: frozenset[str]) -> bool:
    """Whether `token` after the unfinished word `partial` starts or completes a protected word."""
    joins = token[:1].isalnum()  # no leading space: the token continues the word
    word = fold_word((partial if joins else "") + token)
    if len(word) < 2:
        return False
    return any(p.startswith(word) or word.startswith(p) for p in protected)
