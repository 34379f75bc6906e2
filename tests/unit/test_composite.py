"""Splitting composite prompts and joining their parts' answers (served: tests/integration/test_openai_api.py)."""

from __future__ import annotations

import asyncio

from unlearnd.engine.base import ChoiceDelta, SamplingSpec
from unlearnd.guardrail.call import GuardedCall
from unlearnd.guardrail.composite import SEPARATOR, joined, part_calls, split_parts


def test_numbered_items_split_with_their_header_and_sentences_split_when_long_enough():
    text = "Please answer both questions.\n1. Where was Ana born?\n2) What is the capital of France?"
    assert split_parts(text) == [
        "Please answer both questions.",
        "1. Where was Ana born?",
        "2) What is the capital of France?",
    ]
    assert split_parts("- Who wrote Dune?\n- How tall is Everest?") == ["- Who wrote Dune?", "- How tall is Everest?"]
    assert split_parts("Tell me about Ana Ruiz. Also, what is 2 + 2?") == [
        "Tell me about Ana Ruiz.",
        "Also, what is 2 + 2?",
    ]


def test_short_sentences_and_initials_join_a_neighbour_and_one_part_is_not_a_split():
    assert split_parts("Who is J. R. R. Tolkien?") == ["Who is J. R. R. Tolkien?"]
    assert split_parts("Thanks. Who wrote the novel Dune?") == ["Thanks. Who wrote the novel Dune?"]
    assert split_parts("What is the capital of France?") == ["What is the capital of France?"]
    many = " ".join(f"Sentence number {i} is here." for i in range(12))
    assert split_parts(many) == [many]  # a document, not a list of questions


def test_part_calls_keep_the_history_and_put_the_first_parts_group_first():
    call = GuardedCall(
        id="c",
        kind="chat",
        sampling=SamplingSpec(max_tokens=20),
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "x"}],
        max_tokens=20,
    )
    parts = ["Header.", "1. Where was Ana born?", "2. What is 2 + 2?"]
    about, ordinary = part_calls(call, parts, [False, True, False])  # the first item is flagged: it goes first
    assert ordinary.messages == [call.messages[0], {"role": "user", "content": "Header.\n2. What is 2 + 2?"}]
    assert about.messages[-1]["content"] == "1. Where was Ana born?"
    assert not ordinary.splittable and not about.splittable and ordinary.id != about.id


def _encode(text: str) -> list[int]:
    return [ord(c) for c in text]


def _scripted(replies: dict[str, list[ChoiceDelta]], blocked: dict[str, dict[int, str]] | None = None):
    async def generate(part: GuardedCall):
        part.output_blocked.update((blocked or {}).get(part.id, {}))
        for delta in replies[part.id]:
            yield delta

    return generate


def _delta(index: int, text: str, finish: str | None = None) -> ChoiceDelta:
    return ChoiceDelta(index=index, text=text, token_ids=_encode(text), finish_reason=finish)


def _run(call: GuardedCall, generate) -> dict[int, list[ChoiceDelta]]:
    async def go():
        out: dict[int, list[ChoiceDelta]] = {}
        async for delta in joined(call, generate, _encode):
            out.setdefault(delta.index, []).append(delta)
        return out

    return asyncio.run(go())


def _split_call(max_tokens: int | None, n: int = 1) -> GuardedCall:
    call = GuardedCall(id="c", kind="chat", sampling=SamplingSpec(max_tokens=64, n=n), max_tokens=max_tokens)
    call.parts = [GuardedCall(id=f"p{k}", kind="chat", sampling=SamplingSpec(max_tokens=64, n=n)) for k in (0, 1)]
    return call


def test_joined_answers_one_reply_with_one_finish_within_the_budget():
    call = _split_call(max_tokens=30)
    generate = _scripted({"p0": [_delta(0, "No."), _delta(0, "", "stop")], "p1": [_delta(0, "Paris.", "stop")]})
    deltas = _run(call, generate)[0]
    assert "".join(d.text for d in deltas) == "No." + SEPARATOR + "Paris."
    assert [d.finish_reason for d in deltas if d.finish_reason] == ["stop"] and deltas[-1].finish_reason == "stop"
    assert call.parts[1].max_tokens == 30 - 3 - len(SEPARATOR)  # what the first part and the blank line left


def test_joined_stops_with_length_when_the_first_part_used_the_budget_and_a_cut_choice_stays_cut():
    call = _split_call(max_tokens=3)
    deltas = _run(call, _scripted({"p0": [_delta(0, "No.", "length")], "p1": [_delta(0, "Paris.")]}))[0]
    assert "".join(d.text for d in deltas) == "No." and deltas[-1].finish_reason == "length"

    call = _split_call(max_tokens=None, n=2)
    replies = {
        "p0": [_delta(0, "I'm sorry.", "stop"), _delta(1, "Fine.", "stop")],
        "p1": [_delta(0, "more"), _delta(1, "Paris.", "stop")],
    }
    out = _run(call, _scripted(replies, blocked={"p0": {0: "fr-1"}}))
    assert "".join(d.text for d in out[0]) == "I'm sorry." and out[0][-1].finish_reason == "stop"
    assert "".join(d.text for d in out[1]) == "Fine." + SEPARATOR + "Paris."
    assert call.output_blocked == {0: "fr-1"}


def test_a_question_mark_after_a_number_still_ends_a_sentence():
    assert split_parts("What is 2 + 2? Where was Ana Ruiz born?") == ["What is 2 + 2?", "Where was Ana Ruiz born?"]


def test_a_long_run_without_spaces_splits_at_once_and_a_header_alone_is_not_an_ordinary_question():
    import time

    from unlearnd.guardrail.composite import worth_splitting

    start = time.perf_counter()
    assert split_parts("a" * 3000 + ". B" + "b" * 900 + "? Next one here.")  # once quadratic: seconds
    assert split_parts("x" * 400_000) == ["x" * 400_000]
    assert time.perf_counter() - start < 0.5
    parts = ["Please answer both.", "1. Where was Ana born?", "2. Who are Ana's parents?"]
    assert not worth_splitting(parts, [False, True, True])
    assert worth_splitting(parts, [False, True, False])
    assert worth_splitting(["Tell me about Ana Ruiz.", "What is 2 + 2?"], [True, False])


def test_joined_stops_once_every_choice_was_cut():
    call = _split_call(max_tokens=None)
    called = []

    async def generate(part):
        called.append(part.id)
        if part.id == "p0":
            part.output_blocked[0] = "fr-1"
        yield _delta(0, "I'm sorry.", "stop")

    deltas = _run(call, generate)[0]
    assert called == ["p0"] and [d.text for d in deltas] == ["I'm sorry."] and call.output_blocked == {0: "fr-1"}


def test_a_part_that_refers_back_to_somebody_goes_with_the_flagged_parts():
    """forget10 leak run (commit 2baf5a1): a description flagged by its titles was split and its question
    "What gender identity does this author belong to?" answered alone, as if it were about nobody."""
    from unlearnd.guardrail.composite import refers_back, with_references, worth_splitting

    parts = split_parts(
        "Some of the well-known books written by this author are 'Galactic Shadows: A Star Wars Epic' and "
        "'Empire's Successor: The Thrawn Legacy'. What gender identity does this author belong to?"
    )
    assert len(parts) == 2 and refers_back(parts[1])
    assert with_references(parts, [True, False]) == [True, True]
    assert not worth_splitting(parts, with_references(parts, [True, False]))  # refused whole, not split
    for leaning in (
        "2. What did she write?",
        "Where was their first book set?",
        "Is the author's work popular?",
        "Where was the aforementioned novelist born?",
        "What awards did this famous playwright win?",
        "Also, What did he write?",  # a capitalised question word is no name
        "Who is the author of these books?",
        "Did Stephen King ever review this author's work?",  # a pointing phrase never names its subject
        "What did the former write?",
        "Where was h\u200be born?",  # an invisible character inside the pronoun
        "Where Was The Author Born?",
        "WHERE WAS THE AUTHOR BORN?",
    ):
        assert refers_back(leaning), leaning
    for ordinary in (
        "2. Who painted the ceiling of the Sistine Chapel?",
        "Where was Nelson Mandela imprisoned for 18 of his 27 years in jail?",  # names whom "his" means
        "Who is the author of Dune?",
        "Which country is famous for its fjords?",
        "Which author wrote 'Their Eyes Were Watching God'?",  # a title's words are no reference
        "Who was the previous president of France?",
        "Is it true that a person can survive without water for a week?",
        "Who was the first man on the moon?",
        "How does the author Zhen Xu continue to make an impact on literature today?",
        "What is the full name of the author born in Lagos, Nigeria?",
    ):
        assert not refers_back(ordinary), ordinary
    assert with_references(["What did she write?", "What is 2 + 2?"], [False, False]) == [False, False]
    keeps = ["Tell me about Ana Ruiz.", "Also, what is 2 + 2?"]
    assert worth_splitting(keeps, with_references(keeps, [True, False]))
