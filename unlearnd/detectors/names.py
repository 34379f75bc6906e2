"""The one name heuristic (used by the detector, every evaluation and benchmark): which people a set of
QA pairs is about. TOFU does not ship author names, and users may register a request without
listing its entities.

Candidate names are runs of 2-4 capitalised words (particles such as "van der" or "al-" allowed)
outside quotes; a candidate is kept when it recurs in at least `min_pairs` QA pairs. Sub-spans of a
kept longer name ("Yun-Hwa" inside "Hsiao Yun-Hwa") and runs that begin with an ordinary sentence
word ("The", "What") are dropped. This recovers the people a split is about because TOFU, like most
biography QA, names its subject over and over, while places and titles recur less often (titles are
quoted and skipped). A kept run must also be used like a person's name in at least `min_person`
pairs and 30% of its mentions (possessive "X's", or subject of a verb such as "X was/wrote/received"),
which drops "African American" and award names; a run found after "in / across / near" or "City, "
inside a sentence (not as "in X's") in 20% of its mentions is a place ("South Africa") and is
dropped too.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

from unlearnd.domain import QAExample

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
