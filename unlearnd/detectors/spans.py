"""Text primitives the name matchers share: word tokens with offsets, accent- and case-folding, the
Damerau edit distance, merging of character spans, and the small words that are never part of a name."""

from __future__ import annotations

import re
import unicodedata
from functools import lru_cache

_TOKEN = re.compile(r"[^\W_]+(?:['’][^\W_]+)?", re.UNICODE)
_POSSESSIVE = re.compile(r"['’](s|S)$")
STOPWORDS = {
    "the",
    "and",
    "of",
    "von",
    "van",
    "de",
    "der",
    "la",
    "le",
    "del",
    "al",
    "bin",
    "ibn",
    "da",
    "di",
    "du",
    "el",
    "mr",
    "mrs",
    "ms",
    "dr",
    "jr",
    "sr",
    "st",
}

# capitalised only because they start a sentence: never evidence of another person's name
FUNCTION_WORDS = {
    "what",
    "who",
    "whom",
    "whose",
    "where",
    "when",
    "why",
    "how",
    "which",
    "is",
    "are",
    "was",
    "were",
    "do",
    "does",
    "did",
    "can",
    "could",
    "would",
    "should",
    "will",
    "has",
    "have",
    "had",
    "tell",
    "describe",
    "explain",
    "give",
    "list",
    "name",
    "please",
    "about",
    "and",
    "but",
    "or",
    "so",
    "if",
    "in",
    "on",
    "at",
    "for",
    "from",
    "with",
    "by",
    "to",
    "as",
    "a",
    "an",
    "i",
    "we",
    "you",
    "he",
    "she",
    "they",
    "it",
    "my",
    "your",
    "his",
    "her",
    "their",
    "its",
    "our",
    "this",
    "that",
    "these",
    "those",
    "author",
    "writer",
    "novelist",
    "poet",
    "book",
    "books",
    "mr",
    "mrs",
    "ms",
    "dr",
    "professor",
    "prof",
    "sir",
    "madam",
    "ignore",
    "now",
    "then",
    "also",
    "hi",
    "hello",
    "hey",
    "dear",
    "yes",
    "no",
    "ok",
    "okay",
}


def fold(text: str) -> str:
    """Lower-case and strip diacritics ("Müller" -> "muller")."""
    if text.isascii():  # nothing to decompose (the output guard folds every word of every delta)
        return text.lower()
    norm = unicodedata.normalize("NFKD", text)
    return "".join(c for c in norm if not unicodedata.combining(c)).lower()


def fold_word(text: str) -> str:
    """A word as names, facts and protected words are compared: folded, letters and digits only
    ("Al-Kuwaiti" -> "alkuwaiti", "Zephyr-9" -> "zephyr9")."""
    return re.sub(r"[^a-z0-9]", "", fold(text))


@lru_cache(maxsize=65536)
def zipf(word: str) -> float:
    """How common `word` is in English (wordfreq's Zipf scale; 0 for unknown words), cached: the detector and
    the output guard ask about the same words again and again."""
    from wordfreq import zipf_frequency

    return zipf_frequency(word, "en")


def tokens(text: str) -> list[tuple[str, int, int]]:
    """Word tokens with character offsets; hyphens split words, apostrophe-s stays attached."""
    out = []
    for m in _TOKEN.finditer(text):
        word, start = m.group(0), m.start()
        if _POSSESSIVE.search(word):  # possessive: "Vasquez's"
            word = word[:-2]
        out.append((word, start, start + len(word)))
    return out


def edit_distance(a: str, b: str, limit: int = 2) -> int:
    """Damerau-Levenshtein (optimal string alignment) distance, cut off above `limit`."""
    if abs(len(a) - len(b)) > limit:
        return limit + 1
    prev2: list[int] | None = None
    prev = list(range(len(b) + 1))
    for i in range(1, len(a) + 1):
        cur = [i] + [0] * len(b)
        for j in range(1, len(b) + 1):
            cost = 0 if a[i - 1] == b[j - 1] else 1
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + cost)
            if prev2 is not None and i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                cur[j] = min(cur[j], prev2[j - 2] + 1)
        if min(cur) > limit:
            return limit + 1
        prev2, prev = prev, cur
    return prev[-1]


def merge_spans(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[list[int]] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(s, e) for s, e in merged]
