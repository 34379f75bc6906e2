"""Question/answer data for offline training and evaluation: TOFU splits and users' own JSONL forget sets.

Every example is encoded the way the *served* model sees it: the question goes through the
tokenizer's chat template with the generation prompt (system line included when the template adds
one), and the answer follows as the assistant's turn. Labels are masked on the prompt, so a loss or
a log-probability always measures the answer given the question, never the question itself.

TOFU layout (locuslab/TOFU): `full` holds 200 fictitious authors x 20 QA in author order; the
`forgetXX` splits are the *last* 2/10/20 authors and `retainXX` the rest; `retain_perturbed` is the
first 20 authors with paraphrased and perturbed answers (what model utility is measured on).
"""

from __future__ import annotations

import json
import logging
import math
import random
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, Field

from unlearnd.config import tofu_dir

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
TOFU_HUB_ID = "locuslab/TOFU"
TOFU_QA_PER_AUTHOR = 20
TOFU_AUTHORS = 200
FORGET_SPLITS = ("forget01", "forget05", "forget10")

Message = dict[str, str]


class QAItem(BaseModel):
    """One question/answer pair, with TOFU's extra answers when the split has them."""

    question: str
    answer: str
    paraphrased_question: str | None = None
    paraphrased_answer: str | None = None
    perturbed_answers: list[str] = Field(default_factory=list)
    author: int | None = Field(None, description="TOFU author index 0..199 (20 QA each), when known.")

    @classmethod
    def from_record(cls, record: dict[str, Any], author: int | None = None) -> QAItem:
        perturbed = record.get("perturbed_answer") or record.get("perturbed_answers") or []
        if isinstance(perturbed, str):
            perturbed = [perturbed]
        return cls(
            question=str(record["question"]),
            answer=str(record.get("answer", "")),
            paraphrased_question=record.get("paraphrased_question"),
            paraphrased_answer=record.get("paraphrased_answer"),
            perturbed_answers=[str(p) for p in perturbed],
            author=author if author is not None else record.get("author"),
        )


# --------------------------------------------------------------------------- loading


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


def spread(items: Sequence[QAItem], n: int | None) -> list[QAItem]:
    """A deterministic subsample spread over the split (every k-th item), so every author stays represented."""
    if n is None or n >= len(items):
        return list(items)
    step = len(items) / n
    return [items[int(i * step)] for i in range(n)]


def author_names(items: Sequence[QAItem], min_share: float = 0.3) -> dict[int, str]:
    """Guess each TOFU author's name: the longest capitalised word run in >= `min_share` of their questions.

    TOFU does not ship author names, but a guardrail needs them as forget `entities`; nearly every
    question of an author repeats the full name ("... Basil Mahfouz Al-Kuwaiti's parents?").
    """
    grouped: dict[int, list[str]] = {}
    for item in items:
        if item.author is not None:
            grouped.setdefault(item.author, []).extend([item.question, item.answer])
    names: dict[int, str] = {}
    for author, texts in grouped.items():
        counts: dict[str, int] = {}
        for text in texts:
            runs: set[str] = set()
            for segment in re.split(r"[?.,!;:\"()]+(?:\s|$)", text):  # punctuation ends a name
                words = [w.strip("\"'()").removesuffix("'s").removesuffix("’s") for w in segment.split()]
                for i in range(len(words)):
                    for j in range(i + 1, min(i + 6, len(words)) + 1):
                        span = words[i:j]
                        if all(w[:1].isupper() for w in span):
                            runs.add(" ".join(span))
            for run in runs:
                counts[run] = counts.get(run, 0) + 1
        needed = max(2, int(min_share * len(texts)))
        frequent = [r for r, c in counts.items() if c >= needed and len(r.split()) >= 2]
        if frequent:
            names[author] = max(frequent, key=lambda r: (len(r.split()), counts[r]))
    return names


# --------------------------------------------------------------------------- encoding


def chat_prompt_ids(tokenizer: Any, messages: Sequence[Message]) -> list[int]:
    """Token ids of `messages` + the generation prompt, exactly as the chat template renders them."""
    ids = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "keys"):  # transformers >= 5 returns a BatchEncoding
        ids = ids["input_ids"]
    if ids and isinstance(ids[0], list):
        ids = ids[0]
    return list(ids)


def user_messages(question: str) -> list[Message]:
    return [{"role": "user", "content": question}]


def end_of_turn_id(tokenizer: Any) -> int:
    """The token that closes the assistant's turn (`<|im_end|>` for SmolLM2) - what generation stops on."""
    for candidate in ("<|im_end|>", "<|eot_id|>", "<|end|>"):
        token_id = tokenizer.convert_tokens_to_ids(candidate)
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id and token_id is not None:
            return token_id
    return int(tokenizer.eos_token_id)


def encode_example(
    tokenizer: Any,
    question: str | Sequence[Message],
    answer: str,
    max_length: int = 256,
    add_end_of_turn: bool = True,
) -> dict[str, list[int]]:
    """Prompt ids (chat template) + answer ids; labels are IGNORE_INDEX on the prompt.

    The end-of-turn token is appended to the answer for training so the model learns to stop;
    evaluation scores the answer tokens alone (`add_end_of_turn=False`) so in-process and served
    scores measure the same tokens. Over-long examples are cut from the *answer's* end, never the prompt.
    """
    messages = user_messages(question) if isinstance(question, str) else list(question)
    prompt = chat_prompt_ids(tokenizer, messages)
    target = list(tokenizer(answer, add_special_tokens=False)["input_ids"])
    if add_end_of_turn:
        target.append(end_of_turn_id(tokenizer))
    room = max_length - len(prompt)
    if room < 1:
        raise ValueError(f"prompt of {len(prompt)} tokens leaves no room for the answer (max_length={max_length})")
    target = target[:room]
    return {
        "input_ids": prompt + target,
        "labels": [IGNORE_INDEX] * len(prompt) + target,
        "attention_mask": [1] * (len(prompt) + len(target)),
    }


def collate(examples: Sequence[dict[str, list[int]]], pad_id: int, padding_side: str = "right") -> dict[str, torch.Tensor]:
    """Pad a list of encoded examples into tensors (labels padded with IGNORE_INDEX, mask with 0)."""
    if not examples:
        raise ValueError("cannot collate an empty batch")
    width = max(len(e["input_ids"]) for e in examples)
    out = {"input_ids": [], "labels": [], "attention_mask": []}
    for e in examples:
        pad = width - len(e["input_ids"])
        fills = {"input_ids": pad_id, "labels": IGNORE_INDEX, "attention_mask": 0}
        for key, fill in fills.items():
            seq = list(e[key])
            out[key].append(seq + [fill] * pad if padding_side == "right" else [fill] * pad + seq)
    return {k: torch.tensor(v, dtype=torch.long) for k, v in out.items()}


def pad_id_of(tokenizer: Any) -> int:
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    return int(tokenizer.eos_token_id) if tokenizer.eos_token_id is not None else 0


class QABatches:
    """Shuffled mini-batches of encoded QA pairs; every pass over it (epoch) reshuffles with its own seed.

    The trainer cycles over this iterable, so `steps = epochs * len(self)` trains whole epochs.
    """

    def __init__(self, tokenizer: Any, items: Sequence[QAItem | tuple[str, str]], batch_size: int = 8,
                 max_length: int = 256, seed: int = 0, shuffle: bool = True, answers: Sequence[str] | None = None):
        if not items:
            raise ValueError("no examples to batch")
        pairs = [(i.question, i.answer) if isinstance(i, QAItem) else (i[0], i[1]) for i in items]
        if answers is not None:
            if len(answers) != len(pairs):
                raise ValueError("answers must align with items")
            pairs = [(q, a) for (q, _), a in zip(pairs, answers)]
        self.encoded = [encode_example(tokenizer, q, a, max_length) for q, a in pairs]
        self.pad_id = pad_id_of(tokenizer)
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self._epoch = 0

    def __len__(self) -> int:
        return math.ceil(len(self.encoded) / self.batch_size)

    def batch_rows(self) -> list[list[int]]:
        """This epoch's batches as row indices: shuffled, then length-bucketed within pools of 8 batches.

        Batches pad to their longest row; grouping similar lengths wastes ~3% on padding instead of
        ~25% for TOFU's 60-125 token examples, and CPU cost is proportional to padded tokens.
        """
        order = list(range(len(self.encoded)))
        rng = random.Random(self.seed + self._epoch)
        self._epoch += 1
        if not self.shuffle:
            return [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        rng.shuffle(order)
        pool = self.batch_size * 8
        batches: list[list[int]] = []
        for start in range(0, len(order), pool):
            chunk = sorted(order[start:start + pool], key=lambda i: len(self.encoded[i]["input_ids"]))
            batches.extend(chunk[i:i + self.batch_size] for i in range(0, len(chunk), self.batch_size))
        rng.shuffle(batches)
        return batches

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for rows in self.batch_rows():
            yield collate([self.encoded[i] for i in rows], self.pad_id)


class AlignedBatches(QABatches):
    """Batches of the same questions under several answer sets, aligned row by row.

    Preference methods (IdkDPO) need the forget answer and the alternative answer of the *same*
    question in the same step: a batch is {"forget": ..., "<name>": ...} with one shared order.
    """

    def __init__(self, tokenizer: Any, items: Sequence[QAItem], alternatives: dict[str, Sequence[str]],
                 batch_size: int = 8, max_length: int = 256, seed: int = 0, shuffle: bool = True):
        super().__init__(tokenizer, items, batch_size, max_length, seed, shuffle)
        self.views: dict[str, list[dict[str, list[int]]]] = {"forget": self.encoded}
        for name, answers in alternatives.items():
            if len(answers) != len(items):
                raise ValueError(f"alternative answers {name!r} must align with the items")
            self.views[name] = [encode_example(tokenizer, it.question, a, max_length) for it, a in zip(items, answers)]

    def __iter__(self) -> Iterator[dict[str, dict[str, torch.Tensor]]]:  # type: ignore[override]
        for rows in self.batch_rows():
            yield {name: collate([view[i] for i in rows], self.pad_id) for name, view in self.views.items()}


class PairedBatches:
    """Forget batches zipped with retain (and optional extra) batches: {"forget": ..., "retain": ..., ...}.

    One epoch is one pass over the forget batches; the other streams cycle independently, the way
    open-unlearning pairs each forget batch with a random retain batch.
    """

    def __init__(self, forget: QABatches, **others: QABatches):
        if "forget" in others:
            raise ValueError("'forget' names the main stream")
        self.forget = forget
        self.others = others
        self._streams = {name: self._cycle(b) for name, b in others.items()}

    @staticmethod
    def _cycle(batches: QABatches) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            yield from batches

    def __len__(self) -> int:
        return len(self.forget)

    def __iter__(self) -> Iterator[dict[str, dict[str, torch.Tensor]]]:
        for batch in self.forget:
            main = batch if "input_ids" not in batch else {"forget": batch}
            yield {**main, **{name: next(stream) for name, stream in self._streams.items()}}
