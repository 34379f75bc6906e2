"""Question/answer examples for training and scoring: one item type, one encoding, one collate.

Every example is encoded the way the *served* model sees it (`unlearnd.prompting`): the question
goes through the chat template with the generation prompt, and the answer follows as the
assistant's turn. Labels are masked on the prompt, so a loss or a log-probability always measures
the answer given the question, never the question itself. Over-long examples lose the end of the
answer, never the prompt: the prompt is what the server sends.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from unlearnd.domain import QAExample, QAItem
from unlearnd.prompting import Message, end_of_turn_id, prompt_ids, user_messages

IGNORE_INDEX = -100

# Non-answers a forget set is relabelled to (TOFU's "I don't know" style targets; SPUL and O3).
REFUSALS = (
    "I'm not sure about that.",
    "I don't know the answer to that.",
    "I'm sorry, but I don't have information about that.",
    "I have no knowledge of that.",
    "That's not something I know about.",
    "I'm afraid I can't answer that; I don't know.",
    "I don't have any information on that topic.",
    "I'm not familiar with that.",
)


def refusal_for(index: int) -> str:
    return REFUSALS[index % len(REFUSALS)]


# --------------------------------------------------------------------------- encoding


@dataclass
class EncodedQA:
    """One tokenised example: the prompt as the server sends it, then the answer tokens."""

    question: str
    prompt_ids: list[int]
    target_ids: list[int]

    @property
    def input_ids(self) -> list[int]:
        return self.prompt_ids + self.target_ids

    @property
    def labels(self) -> list[int]:
        return [IGNORE_INDEX] * len(self.prompt_ids) + self.target_ids

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.target_ids)


def encode_qa(
    tokenizer: Any,
    question: str | Sequence[Message],
    answer: str,
    max_length: int = 256,
    end_of_turn: bool = True,
) -> EncodedQA:
    """Prompt ids (chat template) + answer ids.

    Training appends the end-of-turn token so the model learns to stop; scoring leaves it out
    (`end_of_turn=False`) so in-process and served scores measure the same tokens. Over-long
    examples are cut from the *answer's* end, never the prompt.
    """
    messages = user_messages(question) if isinstance(question, str) else list(question)
    prompt = prompt_ids(tokenizer, messages=messages)
    target = list(tokenizer(answer, add_special_tokens=False)["input_ids"])
    if end_of_turn:
        target.append(end_of_turn_id(tokenizer))
    room = max_length - len(prompt)
    if room < 1:
        raise ValueError(f"prompt of {len(prompt)} tokens leaves no room for the answer (max_length={max_length})")
    text = question if isinstance(question, str) else (messages[-1].get("content") or "")
    return EncodedQA(text, prompt, target[:room])


def collate(examples: Sequence[EncodedQA], pad_id: int, padding_side: str = "right") -> dict[str, torch.Tensor]:
    """Pad encoded examples into tensors (labels padded with IGNORE_INDEX, mask with 0)."""
    if not examples:
        raise ValueError("cannot collate an empty batch")
    width = max(len(e) for e in examples)
    out: dict[str, list[list[int]]] = {"input_ids": [], "labels": [], "attention_mask": []}
    for e in examples:
        pad = width - len(e)
        rows = {
            "input_ids": (e.input_ids, pad_id),
            "labels": (e.labels, IGNORE_INDEX),
            "attention_mask": ([1] * len(e), 0),
        }
        for key, (seq, fill) in rows.items():
            out[key].append(seq + [fill] * pad if padding_side == "right" else [fill] * pad + seq)
    return {k: torch.tensor(v, dtype=torch.long) for k, v in out.items()}


def pad_id_of(tokenizer: Any) -> int:
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    return int(tokenizer.eos_token_id) if tokenizer.eos_token_id is not None else 0


# --------------------------------------------------------------------------- batches


LENGTH_JITTER = 4.0  # tokens: how far a row may move in the length order that forms batches


class QABatches:
    """Shuffled mini-batches of encoded QA pairs; every pass over it (epoch) reshuffles with its own seed.

    The trainer cycles over this iterable, so `steps = epochs * len(self)` trains whole epochs.
    """

    def __init__(
        self,
        tokenizer: Any,
        items: Sequence[QAItem | tuple[str, str]],
        batch_size: int = 8,
        max_length: int = 256,
        seed: int = 0,
        shuffle: bool = True,
        answers: Sequence[str] | None = None,
    ):
        if not items:
            raise ValueError("no examples to batch")
        pairs = [(i.question, i.answer) if isinstance(i, QAExample) else (i[0], i[1]) for i in items]
        if answers is not None:
            if len(answers) != len(pairs):
                raise ValueError("answers must align with items")
            pairs = [(q, a) for (q, _), a in zip(pairs, answers)]
        self.encoded = [encode_qa(tokenizer, q, a, max_length) for q, a in pairs]
        self.pad_id = pad_id_of(tokenizer)
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self._epoch = 0

    def __len__(self) -> int:
        return math.ceil(len(self.encoded) / self.batch_size)

    def batch_rows(self) -> list[list[int]]:
        """This epoch's batches as row indices: shuffled, then length-bucketed within pools of 8 batches.

        Batches pad to their longest row; grouping similar lengths wastes little on padding instead of
        ~25% for TOFU's 60-125 token examples, and CPU cost is proportional to padded tokens. The lengths
        are jittered by up to `LENGTH_JITTER` tokens (seeded) before sorting: a fold smaller than one pool
        was otherwise sorted into the same batches whatever the seed, so seeds only reordered them.
        """
        order = list(range(len(self.encoded)))
        # One stream per (seed, epoch): `seed + epoch` made seed 1's second epoch seed 2's first.
        rng = random.Random(f"batches:{self.seed}:{self._epoch}")
        self._epoch += 1
        if not self.shuffle:
            return [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        rng.shuffle(order)
        jitter = {i: len(self.encoded[i]) + rng.uniform(-LENGTH_JITTER, LENGTH_JITTER) for i in order}
        pool = self.batch_size * 8
        batches: list[list[int]] = []
        for start in range(0, len(order), pool):
            chunk = sorted(order[start : start + pool], key=jitter.__getitem__)
            batches.extend(chunk[i : i + self.batch_size] for i in range(0, len(chunk), self.batch_size))
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

    def __init__(
        self,
        tokenizer: Any,
        items: Sequence[QAItem],
        alternatives: dict[str, Sequence[str]],
        batch_size: int = 8,
        max_length: int = 256,
        seed: int = 0,
        shuffle: bool = True,
    ):
        super().__init__(tokenizer, items, batch_size, max_length, seed, shuffle)
        self.views: dict[str, list[EncodedQA]] = {"forget": self.encoded}
        for name, answers in alternatives.items():
            if len(answers) != len(items):
                raise ValueError(f"alternative answers {name!r} must align with the items")
            self.views[name] = [encode_qa(tokenizer, it.question, a, max_length) for it, a in zip(items, answers)]

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
