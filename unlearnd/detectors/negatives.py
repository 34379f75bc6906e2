"""Data helpers shared by the detectors: the built-in negatives, request texts, counterfactual
negatives, and how a prompt is cut into views (whole prompt + sentences / windows)."""

from __future__ import annotations

import hashlib
import re
from functools import lru_cache
from importlib import resources

import numpy as np

from unlearnd.detectors.spans import EntityPattern, find_spans
from unlearnd.registry import ForgetSpec, QAExample

ARTIFACT_SUBDIR = "classifier"


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


def counterfactuals(texts: list[str], patterns: list[EntityPattern], seed: int = 0) -> list[str]:
    """Forget texts with the target's name replaced by another person's: same template, other
    subject. They teach the head that the *subject*, not the question form, makes a forget query.
    Texts that do not name the target are skipped (they have nothing to swap)."""
    if not patterns:
        return []
    rng = np.random.default_rng(seed)
    names = swap_names()
    out = []
    for text in texts:
        score, spans = find_spans(text, patterns)
        if score < 0.75 or not spans:
            continue
        name = names[int(rng.integers(len(names)))]
        parts = name.split()
        pieces, last = [], 0
        for start, end in spans:
            # a lone surname is replaced by a surname, a full name by a full name
            repl = name if " " in text[start:end] or "-" in text[start:end] else parts[-1]
            pieces += [text[last:start], repl]
            last = end
        out.append("".join(pieces) + text[last:])
    return out


_SPLIT = re.compile(r"(?<=[.!?;:])\s+|\n+|,\s*(?:and|also|but|then|plus)\s+|\s+(?:and also|as well as|and then)\s+",
                    re.IGNORECASE)


def views(text: str, max_views: int = 12, window: int = 24) -> list[str]:
    """The prompt itself plus its sentences (and word windows of long sentences).

    A forget question buried in a long context, wrapped in a jailbreak preamble, or joined to an
    unrelated question keeps its own sentence, whose embedding is not diluted by the rest.
    """
    text = text.strip()
    out = [text]
    parts = [p.strip() for p in _SPLIT.split(text) if p and len(p.strip()) >= 8]
    if len(parts) > 1:
        out += parts
    for part in parts or [text]:
        words = part.split()
        if len(words) > window * 3 // 2:
            out += [" ".join(words[i:i + window]) for i in range(0, len(words) - window // 2, window // 2)]
    seen, unique = set(), []
    for v in out:
        if v not in seen:
            seen.add(v)
            unique.append(v)
    if len(unique) > max_views:  # keep the prompt and the longest pieces
        rest = sorted(unique[1:], key=len, reverse=True)[: max_views - 1]
        unique = [unique[0]] + [v for v in unique[1:] if v in set(rest)]
    return unique


def expand(texts: list[str], max_views: int = 12) -> tuple[list[str], np.ndarray]:
    """All views of all texts, and for each view the index of the text it came from."""
    flat, owner = [], []
    for i, text in enumerate(texts):
        vs = views(text, max_views=max_views)
        flat += vs
        owner += [i] * len(vs)
    return flat, np.asarray(owner, dtype=np.int64)


def max_by_owner(values: np.ndarray, owner: np.ndarray, n: int) -> np.ndarray:
    """Per text, the max over its views of a (n_views, R) score matrix."""
    out = np.full((n,) + values.shape[1:], -np.inf, dtype=np.float64)
    np.maximum.at(out, owner, values)
    return out


def argmax_by_owner(values: np.ndarray, owner: np.ndarray, n: int) -> np.ndarray:
    """Per text and request, the index of the view reaching the max (for read-out of features)."""
    best = max_by_owner(values, owner, n)
    idx = np.zeros(best.shape, dtype=np.int64)
    for v in range(len(owner) - 1, -1, -1):
        hit = values[v] >= best[owner[v]]
        idx[owner[v]][hit] = v
    return idx
