"""Who the benchmark forgets: TOFU's authors, then generated look-alikes up to any count.

TOFU holds 200 fictitious authors; the sweep to 1000 active requests needs more. A look-alike is a TOFU
author's 20 QA pairs about a new person whose name joins the given name of one TOFU author to the
surname of another (so its parts are real anchors shared with other requests: the hard case for the
anchor index) and never equals an existing name. They are real forget requests, registered and
activated like any other; only their facts are borrowed."""

from __future__ import annotations

import random
import re
from pathlib import Path


def tofu_authors(tofu_dir: Path, count: int | None = None) -> list[dict]:
    """TOFU's full split holds 20 QA pairs per fictitious author, in order: one request per author
    whose name can be derived from its questions (a few authors' cannot, and are skipped)."""
    from unlearnd.data.tofu import TOFU_QA_PER_AUTHOR, TofuData
    from unlearnd.detectors.names import derive_entities

    rows = TofuData(tofu_dir, allow_hub=False).split("full")
    authors = []
    for index in range(len(rows) // TOFU_QA_PER_AUTHOR):
        if count is not None and len(authors) == count:
            break
        pairs = rows[index * TOFU_QA_PER_AUTHOR : (index + 1) * TOFU_QA_PER_AUTHOR]
        names = derive_entities(pairs)
        if not names:
            continue
        authors.append(
            {
                "name": names[0],
                "entities": names,
                "forget": [{"question": p.question, "answer": p.answer} for p in pairs],
            }
        )
    return authors


def _renamed(text: str, old: str, new: str) -> str:
    """`text` with the full name, then each of its parts, replaced by the new name's (whole words)."""
    text = re.sub(rf"\b{re.escape(old)}\b", new, text)
    old_parts, new_parts = old.split(), new.split()
    if len(old_parts) == len(new_parts):
        for a, b in zip(old_parts, new_parts):
            text = re.sub(rf"\b{re.escape(a)}\b", b, text)
    return text


def lookalike_authors(authors: list[dict], count: int, seed: int = 0) -> list[dict]:
    """`count` new people: a TOFU author's facts under a name made of two other authors' name parts."""
    two_part = [a for a in authors if len(a["name"].split()) == 2]
    if len(two_part) < 3:
        raise ValueError("look-alikes need at least three TOFU authors with two-part names")
    taken = {a["name"].lower() for a in authors}
    rng = random.Random(seed)
    out: list[dict] = []
    while len(out) < count:
        source, first_of, last_of = rng.sample(two_part, 3)
        name = f"{first_of['name'].split()[0]} {last_of['name'].split()[1]}"
        if name.lower() in taken:
            continue
        taken.add(name.lower())
        old = source["name"]
        forget = [
            {"question": _renamed(qa["question"], old, name), "answer": _renamed(qa["answer"], old, name)}
            for qa in source["forget"]
        ]
        out.append({"name": name, "entities": [name], "forget": forget, "lookalike_of": old})
    return out


def population(tofu_dir: Path, count: int, seed: int = 0) -> list[dict]:
    """`count` forget-request specs: every TOFU author first, then look-alikes."""
    authors = tofu_authors(tofu_dir)
    if count <= len(authors):
        return authors[:count]
    return authors + lookalike_authors(authors, count - len(authors), seed)


def flagged_prompts(author: dict, n: int) -> list[str]:
    """Forget questions that name the author: these measure a route's latency, not detection recall."""
    names = [e.lower() for e in author["entities"]]
    questions = [qa["question"] for qa in author["forget"] if any(name in qa["question"].lower() for name in names)]
    questions = questions or [qa["question"] for qa in author["forget"]]
    return [questions[i % len(questions)] for i in range(n)]
