"""What the detectors learn "not a forget query" from: the built-in negatives (ordinary chat prompts,
questions about made-up people) and counterfactual negatives built from a request's own examples."""

from __future__ import annotations

import hashlib
from functools import lru_cache
from importlib import resources

import numpy as np

from unlearnd.detectors.anchors import FLAG_SCORE, AnchorIndex, RequestAnchors
from unlearnd.domain import ForgetSpec, QAExample


def _data_lines(name: str) -> list[str]:
    text = resources.files("unlearnd.detectors").joinpath("data", name).read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


def chat_part(text: str, eval_fraction: float = 0.4) -> str:
    """Deterministic split of the built-in prompts: 'eval' prompts are never used for fitting
    by `unlearnd eval classifier`, so its negatives are held out."""
    h = int(hashlib.sha1(text.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "eval" if h < eval_fraction else "fit"


@lru_cache(maxsize=4)
def chat_prompts(part: str = "all") -> tuple[str, ...]:
    """The built-in ordinary chat prompts (generic negatives); part = all | fit | eval."""
    lines = _data_lines("chat_prompts.txt")
    return tuple(t for t in lines if part == "all" or chat_part(t) == part)


def chat_subset(part: str = "all", limit: int = 0) -> list[str]:
    """`limit` evenly spaced prompts of a part (all themes stay represented); 0 = all."""
    prompts = list(chat_prompts(part))
    if not limit or limit >= len(prompts):
        return prompts
    step = len(prompts) / limit
    return [prompts[int(i * step)] for i in range(limit)]


@lru_cache(maxsize=2)
def person_questions(per_template: int = 3, seed: int = 0) -> tuple[str, ...]:
    """Generic questions about other (made-up) people: the built-in 'somebody else' negatives."""
    rng = np.random.default_rng(seed)
    names = swap_names()
    out = []
    for template in _data_lines("person_questions.txt"):
        for i in rng.choice(len(names), per_template, replace=False):
            out.append(template.format(name=names[int(i)]))
    return tuple(out)


@lru_cache(maxsize=1)
def swap_names() -> tuple[str, ...]:
    return tuple(_data_lines("names.txt"))


def questions(items: list[QAExample | str]) -> list[str]:
    return [qa.question for qa in ForgetSpec.as_qa(items)]


def answers(items: list[QAExample | str]) -> list[str]:
    return [qa.answer for qa in ForgetSpec.as_qa(items) if qa.answer]


def _trigrams(name: str) -> set[str]:
    word = f"  {name.lower()} "
    return {word[i : i + 3] for i in range(len(word) - 2)}


def similar_names(name: str, k: int = 5) -> list[str]:
    """The `k` built-in names most like `name` in form (shared letter trigrams, same number of words):
    a swap keeps the origin's look ("Takashi Nakamura" -> "Hiroshi Tanaka", not "Laura Jensen")."""
    grams, words = _trigrams(name), len(name.split())

    def likeness(other: str) -> float:
        theirs = _trigrams(other)
        return len(grams & theirs) / len(grams | theirs) - 0.1 * abs(len(other.split()) - words)

    return sorted((n for n in swap_names() if n.lower() != name.lower()), key=likeness, reverse=True)[:k]


def counterfactuals(texts: list[str], names: list[str], seed: int = 0) -> list[str | None]:
    """Each forget text with the target's name replaced by another person's of similar form and origin
    (same template, other subject), or None when it does not name the target. They teach the head that
    the *subject*, not the question form, makes a forget query."""
    index = AnchorIndex()
    index.add("target", RequestAnchors(names=names))
    rng = np.random.default_rng(seed)
    out: list[str | None] = []
    for text in texts:
        hit = index.find(text).get("target") if names else None
        if hit is None or hit.score < FLAG_SCORE or not hit.spans:
            out.append(None)
            continue
        spans = hit.spans
        pool = similar_names(hit.entity or names[0])
        name = pool[int(rng.integers(len(pool)))]
        parts = name.split()
        pieces, last = [], 0
        for start, end in spans:
            # a lone surname is replaced by a surname, a full name by a full name
            repl = name if " " in text[start:end] or "-" in text[start:end] else parts[-1]
            pieces += [text[last:start], repl]
            last = end
        out.append("".join(pieces) + text[last:])
    return out
