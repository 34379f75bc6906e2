"""A Latin name written in Cyrillic letters ("Едвард Патрицк Сулливан", "Эдвард Патрик Салливан").

Transliteration is not one-to-one: one Cyrillic letter stands for several Latin spellings ("в" is v or w,
"ц" c or ts, "х" h or kh) and a writer may go by letters or by sound. So a Cyrillic word is not turned into
one Latin word and compared; it is aligned with a name part, each Cyrillic letter (or pair) matching any of
its Latin readings, a doubled Latin letter matching one Cyrillic letter, and anything else costing an edit.
Only Cyrillic is read this way (the script users of Russian, Ukrainian, Serbian and Bulgarian write).
"""

from __future__ import annotations

import re
from functools import lru_cache

# each Cyrillic letter (or pair) and the Latin spellings it may stand for; an empty reading: a sign written
# for sound only (ь, ъ)
READINGS: dict[str, tuple[str, ...]] = {
    "а": ("a",),
    "б": ("b",),
    "в": ("v", "w"),
    "г": ("g", "h"),
    "д": ("d",),
    "е": ("e", "ye"),
    "ё": ("yo", "e"),
    "ж": ("zh", "j", "g"),
    "з": ("z", "s"),
    "и": ("i", "ee", "y"),
    "й": ("y", "i", "j"),
    "к": ("k", "c", "ck", "q", "ch"),
    "л": ("l",),
    "м": ("m",),
    "н": ("n",),
    "о": ("o",),
    "п": ("p",),
    "р": ("r",),
    "с": ("s", "c", "z"),
    "т": ("t", "th"),
    "у": ("u", "w", "oo", "ou"),
    "ф": ("f", "ph"),
    "х": ("h", "kh", "ch", "x"),
    "ц": ("c", "ts", "tz", "z"),
    "ч": ("ch", "tch", "c"),
    "ш": ("sh", "sch"),
    "щ": ("shch", "sch"),
    "ъ": ("",),
    "ы": ("y", "i"),
    "ь": ("",),
    "э": ("e", "a"),
    "ю": ("yu", "iu", "u"),
    "я": ("ya", "ia"),
    "і": ("i",),
    "ї": ("yi", "i"),
    "є": ("ye", "e"),
    "ј": ("j", "y"),
    "кс": ("x", "ks"),
    "дж": ("j", "g", "dzh"),
    "кв": ("qu",),
    "ай": ("ai", "ay", "i"),
    "ей": ("ey", "ei", "ay"),
}
_PAIRS = {k for k in READINGS if len(k) == 2}
CYRILLIC_WORD = re.compile(r"[\u0400-\u04ff]+(?:-[\u0400-\u04ff]+)*")


def is_cyrillic(word: str) -> bool:
    return bool(word) and all("\u0400" <= c <= "\u04ff" or c == "-" for c in word)


def first_letters(word: str) -> set[str]:
    """The Latin letters a Cyrillic word may begin with."""
    low = word.lower()
    keys = [low[:2]] if low[:2] in _PAIRS else []
    keys.append(low[:1])
    return {r[0] for k in keys for r in READINGS.get(k, (k,)) if r}


@lru_cache(maxsize=1 << 15)
def script_edits(word: str, part: str, limit: int = 1) -> int:
    """Edits between a Cyrillic word and a folded Latin name part after the best reading of each Cyrillic
    letter (or pair) as Latin; `limit + 1` when over `limit`. A doubled Latin letter may stand for one
    Cyrillic letter ("Салливан" for "sullivan" costs one edit: у for u, never an edit for the ll)."""
    cyr = word.lower().replace("-", "")
    n, m = len(cyr), len(part)
    inf = limit + 1
    best = [[inf] * (m + 1) for _ in range(n + 1)]
    best[0][0] = 0
    for i in range(n + 1):
        for j in range(m + 1):
            cost = best[i][j]
            if cost > limit:
                continue
            if j + 1 <= m and j > 0 and part[j] == part[j - 1]:  # a doubled Latin letter
                best[i][j + 1] = min(best[i][j + 1], cost)
            for size in (1, 2):
                key = cyr[i : i + size]
                if len(key) < size or key not in READINGS:
                    continue
                for reading in READINGS[key]:
                    if part.startswith(reading, j):
                        k = j + len(reading)
                        best[i + size][k] = min(best[i + size][k], cost)
            if cost < limit:
                if i < n:
                    best[i + 1][j] = min(best[i + 1][j], cost + 1)  # a Cyrillic letter read as nothing
                if j < m:
                    best[i][j + 1] = min(best[i][j + 1], cost + 1)  # a Latin letter not written
                if i < n and j < m:
                    best[i + 1][j + 1] = min(best[i + 1][j + 1], cost + 1)  # another letter
    return min(best[n][m], inf)
