"""Data loading, chat-template encoding, label masking and batching."""

from __future__ import annotations

import json

import pytest

from unlearnd.data.qa import load_qa_jsonl, read_jsonl
from unlearnd.data.tofu import TofuData, author_names
from unlearnd.domain import QAItem
from unlearnd.prompting import chat_prompt_ids, end_of_turn_id
from unlearnd.train.data import IGNORE_INDEX, AlignedBatches, EncodedQA, PairedBatches, QABatches, collate, encode_qa


def _write_tofu(folder, n_authors=4, per_author=20):
    folder.mkdir(parents=True, exist_ok=True)
    # phrased like TOFU: the author is named in most questions and answers, as the subject of a verb
    rows = [
        {"question": f"What did Jana{a} Novak write in year {i}?", "answer": f"Jana{a} Novak wrote book {i}."}
        for a in range(n_authors)
        for i in range(per_author)
    ]
    (folder / "full.json").write_text("\n".join(json.dumps(r) for r in rows))
    (folder / "forget_last.json").write_text("\n".join(json.dumps(r) for r in rows[-per_author:]))
    pert = [{**r, "paraphrased_answer": "p", "perturbed_answer": ["x", "y"]} for r in rows[-per_author:]]
    (folder / "forget_last_perturbed.json").write_text("\n".join(json.dumps(r) for r in pert))
    (folder / "real_authors.json").write_text(json.dumps({"question": "Who wrote Hamlet?", "answer": "Shakespeare"}))
    return rows


def test_tofu_splits_get_author_indices_from_full(tmp_path):
    _write_tofu(tmp_path)
    tofu = TofuData(tmp_path, allow_hub=False)
    assert tofu.authors_of("forget_last") == [3]
    assert [it.author for it in tofu.split("full")][::20] == [0, 1, 2, 3]
    pert = tofu.split("forget_last_perturbed")
    assert pert[0].paraphrased_answer == "p" and pert[0].perturbed_answers == ["x", "y"]
    assert tofu.split("real_authors")[0].author is None
    assert len(tofu.by_authors([1, 2])) == 40
    with pytest.raises(FileNotFoundError):
        tofu.split("missing_split")


def test_hub_splits_are_exported_in_the_local_layout(tmp_path, monkeypatch):
    """Where no local copy exists, the hub's splits become the JSON-lines folder everything else reads."""
    from unlearnd.data import tofu as tofu_module

    rows = _write_tofu(tmp_path / "source")
    fetched = []

    def fake_hub(name):
        fetched.append(name)
        return read_jsonl(tmp_path / "source" / f"{name}.json")

    monkeypatch.setattr(tofu_module, "_hub_split", fake_hub)
    tofu_module.export_hub_splits(tmp_path / "out", ["full", "forget_last"])
    tofu_module.export_hub_splits(tmp_path / "out", ["full", "forget_last"])  # already there: not fetched again
    assert fetched == ["full", "forget_last"]
    tofu = TofuData(tmp_path / "out", allow_hub=False)
    assert [it.question for it in tofu.split("full")] == [r["question"] for r in rows]
    assert tofu.authors_of("forget_last") == [3]


def test_author_names_are_recovered_from_questions(tmp_path):
    _write_tofu(tmp_path)
    names = author_names(TofuData(tmp_path, allow_hub=False).split("full"))
    assert names == {a: f"Jana{a} Novak" for a in range(4)}


def test_user_jsonl_and_json_list(tmp_path):
    lines = tmp_path / "mine.jsonl"
    lines.write_text('{"question": "Who is X?", "answer": "A spy."}\n\n{"question": "Where?"}\n')
    items = load_qa_jsonl(lines)
    assert [(i.question, i.answer) for i in items] == [("Who is X?", "A spy."), ("Where?", "")]
    listed = tmp_path / "mine.json"
    listed.write_text(json.dumps([{"question": "a", "answer": "b"}]))
    assert read_jsonl(listed) == [{"question": "a", "answer": "b"}]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"answer": "no question"}\n')
    with pytest.raises(ValueError):
        load_qa_jsonl(bad)


def test_encoding_masks_the_chat_prompt(tokenizer):
    enc = encode_qa(tokenizer, "Who wrote Hamlet?", "William Shakespeare.")
    prompt = chat_prompt_ids(tokenizer, [{"role": "user", "content": "Who wrote Hamlet?"}])
    answer = tokenizer("William Shakespeare.", add_special_tokens=False)["input_ids"]
    assert enc.input_ids == prompt + answer + [end_of_turn_id(tokenizer)]
    assert enc.labels[: len(prompt)] == [IGNORE_INDEX] * len(prompt)
    assert enc.labels[len(prompt) :] == answer + [end_of_turn_id(tokenizer)]
    # the prompt is what the served model sees: system line + user turn + generation prompt
    text = tokenizer.decode(prompt)
    assert text.endswith("<|im_start|>user\nWho wrote Hamlet?<|im_end|>\n<|im_start|>assistant\n")
    # evaluation scores the answer alone
    assert encode_qa(tokenizer, "Who wrote Hamlet?", "William Shakespeare.", end_of_turn=False).labels[-1] == answer[-1]


def test_truncation_cuts_the_answer_not_the_prompt(tokenizer):
    prompt_len = len(chat_prompt_ids(tokenizer, [{"role": "user", "content": "Q?"}]))
    enc = encode_qa(tokenizer, "Q?", "word " * 200, max_length=prompt_len + 5)
    assert len(enc.input_ids) == prompt_len + 5
    assert sum(label != IGNORE_INDEX for label in enc.labels) == 5
    with pytest.raises(ValueError):
        encode_qa(tokenizer, "Q?", "a", max_length=prompt_len)


def test_collate_pads_right_with_ignored_labels():
    batch = collate([EncodedQA("a", [5], [6, 7]), EncodedQA("b", [], [8])], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    left = collate([EncodedQA("a", [], [1, 2]), EncodedQA("b", [], [3])], pad_id=0, padding_side="left")
    assert left["input_ids"].tolist() == [[1, 2], [0, 3]]


def test_batches_reshuffle_each_epoch_and_pair_streams(tokenizer):
    items = [QAItem(question=f"q{i}?", answer=f"a{i}") for i in range(10)]
    batches = QABatches(tokenizer, items, batch_size=4, seed=1)
    assert len(batches) == 3

    def rows(batch):
        return [tuple(r[m == 1].tolist()) for r, m in zip(batch["input_ids"], batch["attention_mask"])]

    epoch1 = [row for b in batches for row in rows(b)]
    epoch2 = [row for b in batches for row in rows(b)]
    assert sorted(epoch1) == sorted(epoch2) and epoch1 != epoch2

    retain = QABatches(tokenizer, items[:3], batch_size=2, seed=2)
    paired = list(PairedBatches(QABatches(tokenizer, items, batch_size=4), retain=retain))
    assert len(paired) == 3 and set(paired[0]) == {"forget", "retain"}
    assert sorted(p["forget"]["input_ids"].shape[0] for p in paired) == [2, 4, 4]
    assert all(p["retain"]["input_ids"].shape[0] in (1, 2) for p in paired)  # the retain stream cycles on its own


def test_aligned_batches_keep_rows_of_the_same_question(tokenizer):
    items = [QAItem(question=f"question number {i}?", answer=f"answer {i}") for i in range(6)]
    aligned = AlignedBatches(tokenizer, items, {"idk": ["I don't know."] * 6}, batch_size=3, seed=3)
    for batch in aligned:
        f, idk = batch["forget"], batch["idk"]
        for r in range(f["input_ids"].shape[0]):
            f_prompt = f["input_ids"][r][f["labels"][r] == IGNORE_INDEX]
            i_prompt = idk["input_ids"][r][idk["labels"][r] == IGNORE_INDEX]
            # same question => same prompt tokens before padding
            assert (
                f_prompt[f["attention_mask"][r][f["labels"][r] == IGNORE_INDEX] == 1].tolist()
                == i_prompt[idk["attention_mask"][r][idk["labels"][r] == IGNORE_INDEX] == 1].tolist()
            )


def test_batches_are_length_bucketed_and_cover_every_row_once(tokenizer):
    items = [QAItem(question=f"q{i}?", answer=" ".join(["word"] * (1 + (i * 7) % 40))) for i in range(64)]
    batches = QABatches(tokenizer, items, batch_size=8, seed=0)
    rows = batches.batch_rows()
    assert sorted(i for b in rows for i in b) == list(range(64))
    lengths = [len(e) for e in batches.encoded]
    padded = sum(8 * max(lengths[i] for i in b) for b in rows)
    # bucketing: padding overhead is small (random batches of these lengths waste ~40%)
    assert padded < 1.1 * sum(lengths)
    assert batches.batch_rows() != rows  # a new epoch reshuffles


def test_the_seed_changes_the_batches_not_only_their_order(tokenizer):
    """Issue 22: a fold smaller than one length-bucketing pool was sorted into the same batches whatever
    the seed, and seed 1's second epoch was seed 2's first (`Random(seed + epoch)`)."""
    items = [QAItem(question=f"q{i}?", answer=" ".join(["word"] * (10 + 2 * i))) for i in range(16)]

    def epochs(seed: int, n: int = 2) -> list[set[frozenset[int]]]:
        batches = QABatches(tokenizer, items, batch_size=4, seed=seed)
        return [{frozenset(b) for b in batches.batch_rows()} for _ in range(n)]

    assert epochs(1) == epochs(1)  # reproducible
    assert epochs(1)[0] != epochs(2)[0]  # other seed: other batches, not the same ones reordered
    assert epochs(1)[1] != epochs(2)[0]  # streams do not overlap across seeds and epochs
