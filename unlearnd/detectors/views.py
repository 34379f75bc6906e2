"""How a prompt is cut into views (the prompt itself, its sentences, word windows of long sentences),
scored as the max over its views, the same rule at fit and serve time."""

from __future__ import annotations

import re

import numpy as np

_SPLIT = re.compile(
    r"(?<=[.!?;:])\s+|\n+|,\s*(?:and|also|but|then|plus)\s+|\s+(?:and also|as well as|and then)\s+", re.IGNORECASE
)


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
            out += [" ".join(words[i : i + window]) for i in range(0, len(words) - window // 2, window // 2)]
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
