"""Composite prompts: a flagged question asked together with ordinary ones.

"1. <about a forgotten person> 2. <something else>" should lose only its first half. The last user
message is split into parts (list items, else sentences) and each part is classified alone. When some
parts are ordinary and the conversation made of those alone routes `none`, the ordinary parts are
answered by the untouched model and the flagged ones by the request's intervention, one after the
other in the prompt's order. The model answering the ordinary parts never sees the flagged ones, and
its answer still passes the output guard as strictly as the flagged prompt's would.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable
from dataclasses import replace

from unlearnd.detectors.normalize import to_ascii
from unlearnd.engine.base import ChoiceDelta
from unlearnd.guardrail.call import GuardedCall

MAX_PARTS = 8  # more parts than this is a document, not a list of questions: not split
MIN_PART_WORDS = 3  # shorter sentences ("Thanks.", "Dr.") join their neighbour
SEPARATOR = "\n\n"
_ITEM = re.compile(r"^[ \t]*(?:\d{1,2}[.)]|[-*\u2022])[ \t]+", re.M)
_SENTENCE_BREAK = re.compile(r"([?!.])\s+(?=[\"'(\[]?[A-Z0-9])")  # linear: no run of letters is retried
MAX_SPLIT_CHARS = 4000  # a longer message is a document: not split (and never scanned at length here)
_ABBREVIATIONS = {"dr", "mr", "mrs", "ms", "st", "jr", "sr", "prof", "vs", "etc", "no", "vol", "fig", "mt", "ft"}
# Who a part speaks of without naming them. A pointing phrase ("this author", "these two writers", "the
# aforementioned novelist", "the former's") always means somebody outside the part; a pronoun ("she",
# "their") or "the writer" only where no name or quoted title comes before it in the part ("Where was Nelson
# Mandela imprisoned for 18 of his 27 years?").
_SINGULAR = (
    "author|writer|novelist|poet|playwright|person|individual|man|woman|guy|lady|gentleman|artist|scientist"
    "|creator|storyteller|journalist|historian|biographer|celebrity"
)
_PLURAL = rf"(?:{_SINGULAR})s|men|women|people|ladies|gentlemen|celebrities"
_ADJECTIVES = r"(?:(?!(?:a|an|the|and|or|of|that|is|was)\s)[\w'’-]+\s+){0,2}"  # "this award-winning Kuwaiti"
_POINTERS = r"the same|the above|the aforementioned|aforementioned|(?:above|previously)[- ]mentioned|said"
_VERBS = "is|was|has|had|did|does|do|say|said|write|wrote|win|won|live|lived|grew|came"  # "the former wrote"
_POINTING = re.compile(
    rf"\b(?i:(?:this|that|the previous|the former|the latter|{_POINTERS})\s+{_ADJECTIVES}(?:{_SINGULAR})"
    rf"|(?:these|those|{_POINTERS})\s+{_ADJECTIVES}(?:{_PLURAL})"
    rf"|the (?:former|latter)(?=['’]s\b|\s*[.,;:?!]|\s+(?:{_VERBS})\b))\b"
)
_STARTERS = (  # capitalised without being a name: "Also, What did he write?", "Where Was She Born?"
    "What|Where|When|Who|Whom|Whose|Why|How|Which|Is|Are|Was|Were|Did|Do|Does|Has|Have|Had|Can|Could|Would"
    "|Will|Should|Please|Tell|Give|List|Name|Describe|Explain|And|Also|But|So|Then|Now|Next|Finally|Lastly"
    "|Plus|Besides|Okay|Ok|The|A|An|In|On|At|Of|For|To|From|By|With|About|Born|Write|Wrote|Written"
)
_THE_NOUN = _SINGULAR.replace("|individual", "")  # "the individual professions of ..."
# "the author of Dune", "the author Zhen Xu", "the author born in Lagos ..." say whom they mean
_OF_A_NAME = r"(?i:of)\s+(?!(?i:these|those|this|that|them|him|her|it)\b)"
_SAYS_WHOM = rf"(?![\w'’]*\s+(?:{_OF_A_NAME}|(?!(?:{_STARTERS})\b)[A-Z][a-z]|(?i:who|whose|born\s+(?:in|on|to))\b))"
_PRONOUN = re.compile(  # "the Man Booker Prize": a capitalised word after the noun makes it a name
    r"\b(?:(?i:he|she|him|his|her|hers|they|them|their|theirs|himself|herself|themselves)"
    rf"|(?i:the)\s+(?:{_THE_NOUN}|{_THE_NOUN.title()}|{_THE_NOUN.upper()}){_SAYS_WHOM})\b"
)
# A quoted title names its subject as a name does ("The 'In Death' series ... her romance novels").
_QUOTED = re.compile(r"(?<![\w'’])['\"‘“][^'\"‘“’”\n]{1,200}['\"’”](?=[\s.,;:?!)]|$)")
_NAME_WORD = re.compile(rf"(?<=[\w,;:'’\"] )(?!(?:{_STARTERS})\b)[A-Z][a-z]")  # a name mid-part: "Nelson"


def split_parts(text: str) -> list[str]:
    """A message's parts: its list items (any text before the first kept as one part), else its
    sentences; `[text]` where it does not split into 2 to `MAX_PARTS` parts."""
    if len(text) > MAX_SPLIT_CHARS:
        return [text]
    starts = [m.start() for m in _ITEM.finditer(text)]
    if len(starts) >= 2:
        cuts = sorted({0, *starts, len(text)})
        parts = [text[a:b].strip() for a, b in zip(cuts, cuts[1:], strict=False)]
    else:
        parts = _joined_short(_sentences(text.strip()))
    parts = [p for p in parts if p]
    return parts if 2 <= len(parts) <= MAX_PARTS else [text]


def _sentences(text: str) -> list[str]:
    """`text` cut after each ., ? or ! that ends a sentence (not an initial or a title such as "Dr.")."""
    out, start = [], 0
    for match in _SENTENCE_BREAK.finditer(text):
        before = text[max(0, match.start() - 40) : match.start()].split()
        word = (before[-1] if before else "").lower().strip("\"'([")
        if match.group(1) == "." and (len(word) <= 1 or word in _ABBREVIATIONS):
            continue
        out.append(text[start : match.end()].strip())
        start = match.end()
    return [*out, text[start:].strip()]


def _joined_short(sentences: list[str]) -> list[str]:
    """Sentences with fewer than `MIN_PART_WORDS` words joined to the next one (the last to the one before)."""
    out: list[str] = []
    carry = ""
    for sentence in sentences:
        carry = f"{carry} {sentence}".strip()
        if len(carry.split()) >= MIN_PART_WORDS:
            out.append(carry)
            carry = ""
    if carry:
        if out:
            out[-1] = f"{out[-1]} {carry}"
        else:
            out.append(carry)
    return out


def refers_back(part: str) -> bool:
    """Whether `part` speaks of somebody it does not name itself ("What gender is this author?"): answered
    apart from the part that named them, the reply would still read as an answer about them."""
    body = to_ascii(_ITEM.sub("", part, count=1))  # (to_ascii drops invisible characters too)
    if _POINTING.search(body):
        return True
    body = _QUOTED.sub("Title", body)
    reference = _PRONOUN.search(body)
    return reference is not None and not _NAME_WORD.search(body, 0, reference.start())


def with_references(parts: list[str], flagged: list[bool]) -> list[bool]:
    """`flagged` with every part that refers back to somebody joined to the flagged ones, when any is: the
    subject of a flagged part is the likeliest "this author", and a wrong guess only costs a refusal."""
    if not any(flagged):
        return flagged
    return [f or refers_back(p) for p, f in zip(parts, flagged, strict=True)]


def worth_splitting(parts: list[str], flagged: list[bool]) -> bool:
    """Some parts flagged and some ordinary question left: a list's header alone is not one."""
    pairs = list(zip(parts, flagged, strict=True))
    items = [(p, f) for p, f in pairs if _ITEM.match(p)]
    questions = items if len(items) >= 2 else pairs
    return any(f for _, f in pairs) and any(not f for _, f in questions)


def part_calls(call: GuardedCall, parts: list[str], flagged: list[bool]) -> list[GuardedCall]:
    """The sub-calls of a split chat, in the order their first question appears: the same conversation
    with its last message cut down to the ordinary parts (a list's header among them), or to the flagged ones."""
    last = call.messages[-1]
    groups = {False: [p for p, f in zip(parts, flagged, strict=True) if not f]}
    groups[True] = [p for p, f in zip(parts, flagged, strict=True) if f]
    items = [f for p, f in zip(parts, flagged, strict=True) if _ITEM.match(p)]  # a list's header does not count
    first = items[0] if items else flagged[0]
    order = [first, not first]
    return [
        GuardedCall(
            id=f"{call.id}-part{k}",
            kind="chat",
            sampling=call.sampling.model_copy(),
            messages=[*call.messages[:-1], {**last, "content": "\n".join(groups[is_flagged])}],
            max_tokens=call.max_tokens,
            splittable=False,
        )
        for k, is_flagged in enumerate(order)
    ]


async def joined(
    call: GuardedCall,
    generate: Callable[[GuardedCall], AsyncIterator[ChoiceDelta]],
    encode: Callable[[str], list[int]],
) -> AsyncIterator[ChoiceDelta]:
    """The parts' answers as one reply per choice: separated by a blank line, within the client's
    `max_tokens` in all, one finish reason at the end. A choice the output guard cut stays cut."""
    n = call.sampling.n
    used, last_finish, closed = [0] * n, ["stop"] * n, set()
    separator = encode(SEPARATOR)
    for k, part in enumerate(call.parts):
        if len(closed) == n:  # every choice was cut: nothing more to say
            break
        part.withhold_alternatives = call.withhold_alternatives
        if call.max_tokens is not None:
            left = call.max_tokens - max(used) - (len(separator) if k else 0)
            if left <= 0:  # the earlier parts used the client's budget
                last_finish = ["length"] * n
                break
            part.max_tokens = part.sampling.max_tokens = left
            part.sampling.min_tokens = min(part.sampling.min_tokens, left)
        if k:
            for index in set(range(n)) - closed:
                used[index] += len(separator)
                yield ChoiceDelta(index=index, text=SEPARATOR, token_ids=separator)
        async for delta in generate(part):
            if delta.index in closed:
                continue
            used[delta.index] += len(delta.token_ids)
            if delta.index in part.output_blocked:  # the refusal ends this choice
                call.output_blocked[delta.index] = part.output_blocked[delta.index]
                closed.add(delta.index)
                yield delta
                continue
            last_finish[delta.index] = delta.finish_reason or last_finish[delta.index]
            yield replace(delta, finish_reason=None) if delta.finish_reason else delta
    for index in sorted(set(range(n)) - closed):
        yield ChoiceDelta(index=index, text="", token_ids=[], finish_reason=last_finish[index])
