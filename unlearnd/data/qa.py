"""Question/answer data from files: JSON lines in, `QAItem`s out, and the deterministic subsets jobs take."""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from unlearnd.domain import QAItem


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Read JSON lines (TOFU's `.json` files are JSON lines); a file holding one JSON list also works."""
    text = Path(path).read_text(encoding="utf-8").strip()
    if not text:
        return []
    if text.startswith("["):
        data = json.loads(text)
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list or JSON lines")
        return data
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def load_qa_jsonl(path: str | Path) -> list[QAItem]:
    """A user's own forget/retain set: JSON lines with `question` and `answer` (extra TOFU fields optional)."""
    records = read_jsonl(path)
    items = []
    for i, record in enumerate(records):
        if "question" not in record:
            raise ValueError(f"{path}: line {i + 1} has no 'question' field")
        items.append(QAItem.from_record(record))
    return items


def spread(items: Sequence[Any], n: int | None) -> list[Any]:
    """A deterministic subsample spread over the list (every k-th item), so every author stays represented."""
    if n is None or n >= len(items):
        return list(items)
    step = len(items) / n
    return [items[int(i * step)] for i in range(n)]


def subsample(items: Sequence[Any], n: int | None, seed: int) -> list[Any]:
    """A fixed random subset, in the original order (all of them when n is None or larger than the list)."""
    if n is None or n >= len(items):
        return list(items)
    rng = random.Random(seed)
    return [items[i] for i in sorted(rng.sample(range(len(items)), n))]
