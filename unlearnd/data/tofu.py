"""TOFU (locuslab/TOFU): its splits, its authors, and the names a forget request about them uses.

Layout: `full` holds 200 fictitious authors x 20 QA in author order; the `forgetXX` splits are the
*last* 2/10/20 authors and `retainXX` the rest; `retain_perturbed` is the first 20 authors with
paraphrased and perturbed answers (what model utility is measured on). Files are read from
`UNLEARND_TOFU_DIR` (JSON lines, as on the hub), else fetched from the hub dataset.

Author names come from `unlearnd.detectors.names.derive_entities` (the one name heuristic).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from unlearnd.artifacts import write_text_atomic
from unlearnd.config import tofu_dir
from unlearnd.data.qa import read_jsonl
from unlearnd.detectors.names import derive_entities
from unlearnd.domain import QAItem

log = logging.getLogger(__name__)

TOFU_HUB_ID = "locuslab/TOFU"
TOFU_QA_PER_AUTHOR = 20
TOFU_AUTHORS = 200
FORGET_SPLITS = ("forget01", "forget05", "forget10")
# Every split unlearnd reads (tests, evaluation, benchmarks): what `export_hub_splits` writes.
TOFU_SPLITS = (
    "full",
    *FORGET_SPLITS,
    *(f"{name}_perturbed" for name in FORGET_SPLITS),
    "retain90",
    "retain95",
    "retain99",
    "retain_perturbed",
    "real_authors",
    "real_authors_perturbed",
    "world_facts",
    "world_facts_perturbed",
)


def _hub_split(name: str) -> list[dict[str, Any]]:
    """Fetch a TOFU split from the Hugging Face hub (needs `datasets` and network)."""
    try:
        from datasets import load_dataset
    except ImportError as exc:  # pragma: no cover - optional path
        raise FileNotFoundError(
            f"TOFU split {name!r} is not in the local folder and `datasets` is not installed to fetch "
            f"{TOFU_HUB_ID}; set UNLEARND_TOFU_DIR to a folder of TOFU JSON-lines files"
        ) from exc
    dataset = load_dataset(TOFU_HUB_ID, name, split="train")
    return [dict(row) for row in dataset]


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


def export_hub_splits(folder: str | Path, names: Sequence[str] = TOFU_SPLITS) -> Path:
    """Write TOFU splits from the hub as JSON-lines files (`<folder>/<name>.json`), the local layout.

    Each file is written atomically, so a folder holding a split's file holds all of it.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        if has_tofu_split(name, folder):
            continue
        lines = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in _hub_split(name))
        write_text_atomic(folder / f"{name}.json", lines)
    return folder


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

    def names_of(self, authors: Sequence[int]) -> dict[int, str]:
        """Each author's name, found in all of the author's pairs (a fold's half may not show it)."""
        return author_names(self.by_authors(sorted(set(authors))))

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
