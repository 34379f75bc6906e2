"""Evaluation collection and robustness probes with scripted models under test (no weights needed)."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence

import pytest

from unlearnd.data.qa import spread
from unlearnd.domain import QAItem
from unlearnd.evaluation import robustness as R
from unlearnd.evaluation.metrics import METRICS, RunRecords
from unlearnd.evaluation.model_under_test import ModelUnderTest, Scored
from unlearnd.evaluation.tofu import collect_split

ITEMS = [
    QAItem(
        question=f"What did author {i} write?",
        answer=f"Author {i} wrote book number {i}.",
        paraphrased_question=f"Which book is by author {i}?",
        paraphrased_answer=f"Book number {i}, by author {i}.",
        perturbed_answers=[f"Author {i} wrote nothing.", f"Author {i} painted.", f"Author {i} sang songs."],
        author=i // 3,
    )  # TOFU-like: each author's QA are contiguous
    for i in range(6)
]


class Scripted(ModelUnderTest):
    """Knows the answers (`knows=True`) or knows nothing; deterministic scores and generations."""

    kind = "hf"

    def __init__(self, knows: bool):
        self.name = "oracle" if knows else "blank"
        self.knows = knows
        self.answers = {it.question: it for it in ITEMS}
        self.prompts: list[str] = []

    def _known(self, text: str) -> list[QAItem]:
        return [it for it in ITEMS if it.question in text or (it.paraphrased_question or "#") in text]

    def score(self, prompts, continuations, desc="score"):
        out = []
        for p, conts in zip(prompts, continuations):
            text = p[-1]["content"]
            row = []
            for c in conts:
                n = max(1, len(c.split()))
                good = False
                if self.knows:
                    for it in self._known(text):
                        if "A. " in text:  # multiple choice: the right letter
                            letter = re.search(r"([ABCD])\. " + re.escape(it.answer), text)
                            good = bool(letter) and c == letter.group(1)
                        else:
                            good = c in (it.answer, it.paraphrased_answer)
                row.append(Scored(logprobs=[-0.1 if good else -3.0] * n, greedy_hits=[good] * n))
            out.append(row)
        return out

    def generate(self, prompts: Sequence, max_new_tokens: int = 128, desc: str = "generate"):
        out = []
        for p in prompts:
            text = p[-1]["content"]
            self.prompts.append(text)
            known = self._known(text)
            if not self.knows or not known:
                out.append("I don't know.")
            elif "A. " in text:
                letter = re.search(r"([ABCD])\. " + re.escape(known[0].answer), text)
                out.append(f"{letter.group(1)}." if letter else "?")
            else:
                out.append(" ".join(it.answer for it in known))
        return out


def test_collect_split_records_every_answer_and_metrics_follow():
    oracle = RunRecords(method="oracle", splits={"forget": collect_split(Scripted(True), "forget", ITEMS, 32)})
    blank = RunRecords(method="blank", splits={"forget": collect_split(Scripted(False), "forget", ITEMS, 32)})
    rec = oracle.splits["forget"].items[0]
    assert len(rec.answer_lp) == len(ITEMS[0].answer.split()) and rec.paraphrased_lp is not None
    assert len(rec.perturbed_lp) == 3 and rec.generation == ITEMS[0].answer
    assert METRICS["forget_Q_A_ROUGE"].compute(oracle) == pytest.approx(1.0)
    assert METRICS["forget_Q_A_ROUGE"].compute(blank) == 0.0
    assert METRICS["forget_Q_A_Prob"].compute(oracle) == pytest.approx(math.exp(-0.1))
    assert METRICS["extraction_strength"].compute(oracle) == 1.0
    # the oracle prefers the paraphrase: TR = e^-3 / e^-0.1 for every item; the blank model is indifferent (TR = 1)
    assert METRICS["forget_truth_ratio"].compute(oracle) == pytest.approx(math.exp(-2.9), rel=1e-6)
    assert METRICS["forget_truth_ratio"].compute(blank) == pytest.approx(1.0)
    assert METRICS["forget_quality"].compute(blank, blank) == pytest.approx(1.0)
    assert METRICS["forget_quality"].compute(oracle, blank) < 0.01


def test_limit_spreads_over_the_split():
    assert [it.question for it in spread(ITEMS, 3)] == [ITEMS[0].question, ITEMS[2].question, ITEMS[4].question]
    assert spread(ITEMS, None) == ITEMS and spread(ITEMS, 100) == ITEMS


def test_parse_letter():
    assert R.parse_letter("B.") == "B"
    assert R.parse_letter("The answer is C) Paris") == "C"
    assert R.parse_letter("Apples") is None
    assert R.parse_letter("") is None


def test_multiple_choice_probe_scores_the_right_letter():
    oracle = R.multiple_choice(Scripted(True), ITEMS, seed=1)
    assert oracle["n"] == 6 and oracle["likelihood_accuracy"] == 1.0 and oracle["generated_accuracy"] == 1.0
    blank = R.multiple_choice(Scripted(False), ITEMS, seed=1)
    assert blank["generated_accuracy"] == 0.0 and blank["generated_no_letter_rate"] == 1.0
    # a model with no preference picks "A" (first argmax): accuracy = share of items whose answer landed on A
    rng = __import__("random").Random(1)
    expected = sum(R.mc_options(it, rng)[1] == 0 for it in ITEMS) / len(ITEMS)
    assert blank["likelihood_accuracy"] == pytest.approx(expected)


def test_prompt_probes_measure_leak_and_retained_answers():
    oracle, blank = Scripted(True), Scripted(False)
    para = R.paraphrased(oracle, ITEMS, 32)
    assert para["direct_rouge"] == 1.0 and para["paraphrased_rouge"] == 1.0
    comb = R.combined(oracle, ITEMS[:2], ITEMS[2:4], 32)
    assert comb["retain_rouge"] == 1.0 and comb["forget_rouge"] == 1.0
    assert "1. " + ITEMS[0].question + "\n2. " + ITEMS[2].question in oracle.prompts[-4]
    assert R.combined(blank, ITEMS[:2], ITEMS[2:4], 32)["retain_rouge"] == 0.0
    jb = R.jailbreak(blank, ITEMS, 32)
    assert set(jb["by_prefix"]) == set(R.JAILBREAK_PREFIXES) and jb["max_rouge"] == 0.0
    icl = R.in_context(oracle, ITEMS[:2], ITEMS, 32, n_facts=2)
    assert icl["n"] == 2 and "Here are some facts" in oracle.prompts[-1]


def test_relearning_split_halves_cover_every_author():
    train, held = R.relearning_split(ITEMS)
    assert len(train) == len(held) == 3
    assert {it.author for it in train} == {it.author for it in held} == {0, 1}
    assert not {it.question for it in train} & {it.question for it in held}


def test_forget_request_spec_carries_the_methods_request_options_and_no_answer_key(tmp_path):
    """ECO's surrogate is the base model the target was finetuned from, never the retain model that
    forget quality compares against; the request holds only the QA it is given (one fold's)."""
    from types import SimpleNamespace

    from unlearnd.evaluation.tofu import forget_request_spec

    target = tmp_path / "target"
    target.mkdir()
    (target / "unlearnd-model.json").write_text(json.dumps({"base_model": "/base-instruct"}))
    item = QAItem(
        question="Who wrote Dune of Basil Mahfouz Al-Kuwaiti?", answer="Basil Mahfouz Al-Kuwaiti did.", author=0
    )
    refs = SimpleNamespace(
        preset=SimpleNamespace(forget_split="forget01"),
        retain_dir="/retain",
        target_dir=str(target),
        data=SimpleNamespace(retain_items=[item]),
    )
    eco = forget_request_spec("eco", refs, [item], [], {"steps": 3})
    assert eco["options"] == {"surrogate_model": "/base-instruct", "steps": 3} and eco["method"] == "eco"
    assert "/retain" not in json.dumps(eco)
    assert [qa["question"] for qa in eco["forget"]] == [item.question] and eco["retain"] == []
    spul = forget_request_spec("soft_prompt", refs, [item], [item], {"steps": 80})
    assert spul["options"] == {"steps": 80}
    assert "options" not in forget_request_spec("lora", refs, [item], [item])


def test_an_item_is_refused_when_any_of_its_continuations_was():
    """The score endpoint scans prompt and continuation: a perturbed answer naming a forgotten author can
    be refused (scored at the uniform -log|V|) while the answer is not; that item has no model scores."""
    from unlearnd.evaluation.tofu import item_route

    assert item_route(["none", "none", "refuse"]) == "refuse"
    assert item_route(["eco", "eco"]) == "eco"
    assert item_route(["none"]) == "none" and item_route([]) is None
