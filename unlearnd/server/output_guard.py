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
  the answer (names, invented places, titles, specific trades) are.

On a hit the choice is cut and its text replaced by the request's refusal; its generation stops.
Output is released `hold_chars` behind what was generated, so the words that trigger a block (a
name, a title, the start of a reproduced answer) are never sent, also when streaming, and the
log-probs of withheld text are never returned.
"""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from functools import lru_cache

from unlearnd.detectors.anchors import FLAG_SCORE, AnchorIndex, extract_anchors
from unlearnd.detectors.negatives import chat_prompts
from unlearnd.detectors.spans import FUNCTION_WORDS, STOPWORDS, fold
from unlearnd.engine.base import ChoiceDelta
from unlearnd.interventions.guardrails import refusal_of
from unlearnd.spec import ForgetRequest, ForgetSpec

log = logging.getLogger(__name__)

_WORD = re.compile(r"[^\W_]+(?:['’][^\W_]+)?")
HOLD_CHARS = 96  # what is withheld until the text after it is checked (longer than a name or a title)
TAIL_CHARS = 256  # how much of the end of the output the anchor check reads each time
COMMON_ZIPF = 6.0  # Zipf frequency (log10 uses per billion words) of words that carry no information ("time")
MIN_INFO = 8.0  # information repeated from one answer that makes the output a reproduction: two or three
# uncommon words (Zipf 2-3.5) with their context; a biography template carries 2-5


def _words(text: str) -> list[str]:
    return [fold(w) for w in _WORD.findall(text)]


def _grams(words: list[str], n: int = 4) -> set[tuple[str, ...]]:
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


@lru_cache(maxsize=65536)
def information(word: str) -> float:
    """How much repeating `word` says: nothing for function words, more the less common it is."""
    from wordfreq import zipf_frequency

    if word in STOPWORDS or word in FUNCTION_WORDS or len(word) < 3:
        return 0.0
    word = re.sub(r"['’]s$", "", word)  # a possessive is as common as its word
    return max(0.0, COMMON_ZIPF - zipf_frequency(word, "en"))


@dataclass
class _Answer:
    """A forget answer as the guard reads it: where each of its 4-grams starts, what each word says."""

    starts: dict[tuple[str, ...], list[int]]
    info: list[float]

    @classmethod
    def of(cls, text: str, ordinary: set[tuple[str, ...]]) -> _Answer:
        words = _words(text)
        starts: dict[tuple[str, ...], list[int]] = {}
        for i in range(len(words) - 3):
            gram = tuple(words[i : i + 4])
            if gram not in ordinary:
                starts.setdefault(gram, []).append(i)
        return cls(starts, [information(w) for w in words])

    def repeated(self, grams: set[tuple[str, ...]]) -> float:
        """Information of this answer's words that `grams` (an output's 4-grams) repeat, each word once."""
        covered = {i + k for g in self.starts.keys() & grams for i in self.starts[g] for k in range(4)}
        return sum(self.info[i] for i in covered)


_ORDINARY: set[tuple[str, ...]] | None = None


def ordinary_grams() -> set[tuple[str, ...]]:
    """4-grams of ordinary text (the built-in chat prompts): never distinctive of a forget answer."""
    global _ORDINARY
    if _ORDINARY is None:
        _ORDINARY = set().union(*(_grams(_words(t)) for t in chat_prompts()))
    return _ORDINARY


@dataclass
class Block:
    request_id: str
    reason: str  # "anchor:<kind>" or "answer"
    refusal: str


@dataclass
class _Choice:
    text: str = ""
    released: int = 0  # characters of `text` already sent
    held: list[ChoiceDelta] = field(default_factory=list)
    grams: set[tuple[str, ...]] = field(default_factory=set)
    words_seen: int = 0
    blocked: Block | None = None


class OutputGuard:
    def __init__(self, hold_chars: int = HOLD_CHARS, min_info: float = MIN_INFO):
        self.hold_chars = hold_chars
        self.min_info = min_info
        self.anchors = AnchorIndex()
        self.answers: dict[str, list[_Answer]] = {}
        self.refusals: dict[str, str] = {}

    @property
    def request_ids(self) -> set[str]:
        return set(self.refusals)

    def load(self, request: ForgetRequest) -> None:
        if request.spec.options.get("output_guard") is False:
            self.unload(request.id)
            return
        self.anchors.add(request.id, extract_anchors(request.spec))
        ordinary = ordinary_grams()
        self.answers[request.id] = [
            _Answer.of(qa.answer, ordinary) for qa in ForgetSpec.as_qa(request.spec.forget) if qa.answer
        ]
        self.refusals[request.id] = refusal_of(request)

    def unload(self, request_id: str) -> None:
        self.anchors.remove(request_id)
        self.answers.pop(request_id, None)
        self.refusals.pop(request_id, None)

    def check(self, text: str, grams: set[tuple[str, ...]] | None = None) -> Block | None:
        """The first active request `text` (the end of an output) gives away, if any."""
        for request_id, hit in self.anchors.find(text[-TAIL_CHARS:]).items():
            if hit.score >= FLAG_SCORE and request_id in self.refusals:
                return Block(request_id, f"anchor:{hit.kind}", self.refusals[request_id])
        grams = grams if grams is not None else _grams(_words(text))
        for request_id, answers in self.answers.items():
            if any(answer.repeated(grams) >= self.min_info for answer in answers):
                return Block(request_id, "answer", self.refusals[request_id])
        return None

    async def filter(
        self,
        deltas: AsyncIterator[ChoiceDelta],
        encode: Callable[[str], list[int]],
        on_block: Callable[[Block, int], None],
        n: int | None = None,
    ) -> AsyncIterator[ChoiceDelta]:
        """`deltas` with every choice's text released `hold_chars` behind its end once checked; a choice
        that gives a forget request away is cut, its text replaced by the refusal, its log-probs dropped."""
        choices: dict[int, _Choice] = {}
        async for delta in deltas:
            state = choices.setdefault(delta.index, _Choice())
            if state.blocked is not None:
                continue
            state.text += delta.text
            state.held.append(delta)
            words = _words(state.text)
            if len(words) > state.words_seen:  # new 4-grams end in the new words
                state.grams |= _grams(words[max(0, state.words_seen - 3) :])
                state.words_seen = len(words)
            block = self.check(state.text, state.grams)
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
            for released in self._release(state, final=delta.finish_reason is not None):
                yield released

    def _release(self, state: _Choice, final: bool) -> list[ChoiceDelta]:
        """The held deltas that are now far enough behind the end of the text (all of them at the end)."""
        out = []
        while state.held:
            first = state.held[0]
            if not final and len(state.text) - (state.released + len(first.text)) < self.hold_chars:
                break
            out.append(state.held.pop(0))
            state.released += len(first.text)
        return out
