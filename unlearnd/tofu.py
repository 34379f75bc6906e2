"""TOFU (locuslab/TOFU): its splits, its authors, and the names a forget request about them uses.

Layout: `full` holds 200 fictitious authors x 20 QA in author order; the `forgetXX` splits are the
*last* 2/10/20 authors and `retainXX` the rest; `retain_perturbed` is the first 20 authors with
paraphrased and perturbed answers (what model utility is measured on). Files are read from
`UNLEARND_TOFU_DIR` (JSON lines, as on the hub), else fetched from the hub dataset.

Names (one heuristic, used by every evaluation, benchmark and detector report). TOFU does not ship
author names, but a guardrail needs them as forget `entities`. Candidate names are runs of 2-4
capitalised words (particles such as "van der" or "al-" allowed) outside quotes; a candidate is kept
when it recurs in at least `min_pairs` QA pairs. Sub-spans of a kept longer name ("Yun-Hwa" inside
"Hsiao Yun-Hwa") and runs that begin with an ordinary sentence word ("The", "What") are dropped.
This recovers the people a split is about because TOFU, like most biography QA, names its subject
over and over, while places and titles recur less often (titles are quoted and skipped). A kept run
must also be used like a person's name in at least `min_person` pairs and 30% of its mentions
(possessive "X's", or subject of a verb such as "X was/wrote/received"), which drops "African
American" and award names; a run found after "in / across / near" or "City, " inside a sentence (not
as "in X's") in 20% of its mentions is a place ("South Africa") and is dropped too.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from unlearnd.config import tofu_dir
from unlearnd.spec import QAExample
from unlearnd.train.data import QAItem, read_jsonl

log = logging.getLogger(__name__)

TOFU_HUB_ID = "locuslab/TOFU"
TOFU_QA_PER_AUTHOR = 20
TOFU_AUTHORS = 200
FORGET_SPLITS = ("forget01", "forget05", "forget10")


def _hub_split(name: str) -> list[dict[str, Any]]:
    """Fetch a TOFU split from the Hugging Face hub (needs `datasets` and network; never used in tests)."""
    try:
        from datasets import load_dataset
    except ImportError as exc:  # pragma: no cover - optional path
        raise FileNotFoundError(
            f"TOFU split {name!r} is not in the local folder and `datasets` is not installed to fetch "
            f"{TOFU_HUB_ID}; set UNLEARND_TOFU_DIR to a folder of TOFU JSON-lines files"
        ) from exc
    dataset = load_dataset(TOFU_HUB_ID, name, split="train")  # pragma: no cover - network
    return [dict(row) for row in dataset]  # pragma: no cover


def tofu_records(name: str, folder: str | Path | None = None, allow_hub: bool = True) -> list[dict[str, Any]]:
    """Raw records of one TOFU split: `<folder>/<name>.json` (or `.jsonl`), else the hub when allowed."""
    folder = Path(folder) if folder is not None else tofu_dir()
    for suffix in (".json", ".jsonl"):
        path = folder / f"{name}{suffix}"
        if path.exists():
            return read_jsonl(path)
    if allow_hub:
        log.info("TOFU split %s not found under %s; trying the hub dataset %s", name, folder, TOFU_HUB_ID)
        return _hub_split(name)
    raise FileNotFoundError(f"TOFU split {name!r} not found under {folder}")


def has_tofu_split(name: str, folder: str | Path | None = None) -> bool:
    folder = Path(folder) if folder is not None else tofu_dir()
    return any((folder / f"{name}{suffix}").exists() for suffix in (".json", ".jsonl"))


class TofuData:
    """The TOFU splits, with author indices recovered from `full` (authors are contiguous blocks of 20)."""

    def __init__(self, folder: str | Path | None = None, allow_hub: bool = True):
        self.folder = Path(folder) if folder is not None else tofu_dir()
        self.allow_hub = allow_hub
        self._cache: dict[str, list[QAItem]] = {}
        self._author_of: dict[tuple[str, str], int] | None = None

    def _author_index(self) -> dict[tuple[str, str], int]:
        """(question, answer) -> author; keyed by the pair because a few questions repeat across authors
        ("What is the full name of the author?" appears for two of them)."""
        if self._author_of is None:
            full = tofu_records("full", self.folder, self.allow_hub)
            self._author_of = {}
            for i, record in enumerate(full):
                self._author_of.setdefault((record["question"], record.get("answer", "")), i // TOFU_QA_PER_AUTHOR)
        return self._author_of

    def split(self, name: str) -> list[QAItem]:
        """Items of a split; fictitious-author splits get their author index, real_authors/world_facts none."""
        if name not in self._cache:
            records = tofu_records(name, self.folder, self.allow_hub)
            if name == "full":
                authors = [i // TOFU_QA_PER_AUTHOR for i in range(len(records))]
            elif name.startswith(("real_authors", "world_facts")):
                authors = [None] * len(records)
            else:
                index = self._author_index()
                authors = [index.get((r["question"], r.get("answer", ""))) for r in records]
            self._cache[name] = [QAItem.from_record(r, author=a) for r, a in zip(records, authors)]
        return self._cache[name]

    def authors_of(self, name: str) -> list[int]:
        return sorted({item.author for item in self.split(name) if item.author is not None})

    def by_authors(self, authors: Sequence[int], split: str = "full") -> list[QAItem]:
        wanted = set(authors)
        return [item for item in self.split(split) if item.author in wanted]

    def perturbed_for(self, forget_split: str) -> list[QAItem]:
        return self.split(f"{forget_split}_perturbed")


def author_names(items: Sequence[QAItem]) -> dict[int, str]:
    """Each TOFU author's name (the first name `derive_entities` finds in the author's QA pairs)."""
    grouped: dict[int, list[QAItem]] = {}
    for item in items:
        if item.author is not None:
            grouped.setdefault(item.author, []).append(item)
    names = {}
    for author, group in grouped.items():
        found = derive_entities(group)
        if found:
            names[author] = found[0]
    return names


# -- names -----------------------------------------------------------------------------------------

_CAP = r"[A-Z][\w'’]*(?:-[A-Z]?[\w'’]+)*"
_PARTICLE = r"(?:al|el|de|van|von|der|da|di|bin|ibn)"
# a name: capitalised words, particles between them ("van der"), or glued on ("al-Faisal")
_RUN = re.compile(rf"(?<![\w'’-])({_CAP}(?:\s+(?:(?:{_PARTICLE}\s+)+)?(?:{_PARTICLE}-)?{_CAP}){{1,3}})")
_QUOTED = re.compile(r"\"[^\"]*\"|'[^']{3,}'|“[^”]*”|‘[^’]{3,}’")
_LEADING = {
    "The",
    "What",
    "Who",
    "Where",
    "When",
    "Why",
    "How",
    "Which",
    "Is",
    "Are",
    "Was",
    "Were",
    "Do",
    "Does",
    "Did",
    "Can",
    "Could",
    "In",
    "On",
    "At",
    "For",
    "From",
    "With",
    "By",
    "As",
    "A",
    "An",
    "Has",
    "Have",
    "Had",
    "Would",
    "Should",
    "Will",
    "Tell",
    "Name",
    "Of",
    "And",
    "But",
    "Yes",
    "No",
    "This",
    "That",
    "These",
    "Those",
    "Her",
    "His",
    "Their",
    "Its",
    "Our",
    "My",
    "Your",
    "Some",
    "One",
    "Many",
    "Most",
    "Although",
    "While",
    "Despite",
    "Being",
    "Born",
    "Author",
    "Writer",
    "Apart",
    "Besides",
    "Both",
    "Each",
    "Throughout",
    "Given",
    "Considering",
    "Like",
    "Unlike",
    "Through",
    "Since",
    "After",
    "Before",
    "During",
}


_PLACE_CONTEXT = re.compile(r"(?:\b(?:in|from|at|the|of|to|a|an|near|into|across|by|for|with)\s+)$", re.IGNORECASE)
_POSSESSIVE = re.compile(r"(?:['’]s|['’])$")


def _runs(text: str) -> set[str]:
    """Capitalised runs in person-like position (not right after a preposition or article:
    'in Kuwait City', 'the Irwin Prize'), possessives stripped."""
    text = _QUOTED.sub(" ", text)
    found = set()
    for m in _RUN.finditer(text):
        words = m.group(1).split()
        skipped = 0
        while words and words[0] in _LEADING:
            words = words[1:]
            skipped += 1
        if len(words) < 2:
            continue
        if not skipped and _PLACE_CONTEXT.search(text[: m.start()]):
            continue
        words[-1] = _POSSESSIVE.sub("", words[-1])
        found.add(" ".join(words))
    return found


_PERSON_NEXT = (
    r"(?:['’]s?|\s+(?:is|was|has|had|writes|wrote|received|grew|began|often|also|draws|uses|won|"
    r"published|explores|became|portrays|incorporates|says|believes|lives|lived|started|credits))\b"
)


def _person_evidence(name: str, pairs: Sequence[QAExample]) -> int:
    """Pairs where the name is used like a person's: possessive, or subject of a typical verb."""
    pat = re.compile(re.escape(name).replace("'", "['’]") + _PERSON_NEXT)
    return sum(1 for qa in pairs if pat.search(qa.question) or pat.search(qa.answer))


def _place_evidence(name: str, pairs: Sequence[QAExample]) -> int:
    """Pairs where the name follows 'in / across / near' or 'Town, ' (city, country), as places do."""
    # "Town, Name" counts only inside a sentence ("born in Havana, Cuba"), not "Yes, Name ..."
    pat = re.compile(
        r"(?:\b(?:in|across|near)\s+|\b[a-z]+\s+(?:[A-Z]\w+\s+)*[A-Z]\w+,\s+)"
        + re.escape(name).replace("'", "['’]")
        + r"\b(?!['’])"
    )
    return sum(1 for qa in pairs if pat.search(qa.question) or pat.search(qa.answer))


def derive_entities(
    pairs: Sequence[QAExample], min_pairs: int = 3, min_person: int = 4, min_person_ratio: float = 0.3
) -> list[str]:
    """Names that recur across QA pairs and are used like persons' names (see module docstring)."""
    counts: Counter[str] = Counter()
    for qa in pairs:
        counts.update(_runs(qa.question) | _runs(qa.answer))
    # the same name with curly and straight apostrophes counts once
    merged: Counter[str] = Counter()
    for name, c in counts.items():
        merged[name.replace("’", "'")] += c
    counts = merged
    kept = []
    for name, c in counts.items():
        if c < min_pairs:
            continue
        person = _person_evidence(name, pairs)
        place = _place_evidence(name, pairs)
        if person >= min(min_person, c) and person >= min_person_ratio * c and place < 0.2 * (c + place):
            kept.append(name)
    kept.sort(key=lambda n: (-len(n), n))
    names: list[str] = []
    for name in kept:
        if not any(re.search(rf"(?<!\w){re.escape(name)}(?!\w)", longer) for longer in names):
            names.append(name)
    return sorted(names)
