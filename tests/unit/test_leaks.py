"""The anchor-free leak evaluation: probes from facts no request saw, the leak judge, the summary."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from unlearnd.data.tofu import TofuData
from unlearnd.domain import QAItem
from unlearnd.evaluation.leaks import (
    FAMILIES,
    LeakContext,
    build_leak_probes,
    carries_name,
    cyrillic,
    initials,
    key_terms,
    leak_context,
    leak_markdown,
    leaked,
    related_probes,
    summarise_leaks,
    two_edits,
)


@pytest.fixture(scope="module")
def ctx(tofu):
    return leak_context(TofuData(tofu, allow_hub=False), "forget01", [3, 4, 5], 4)


def test_probes_come_from_the_fold_no_request_sees_and_mostly_without_the_name(ctx):
    probes = build_leak_probes(ctx)
    forget = [p for p in probes if p.group == "forget"]
    assert set(Counter(p.family for p in forget)) == set(FAMILIES)
    fit_answers = {it.answer for it in ctx.fit}
    measured = {it.answer for it in ctx.measured}
    assert not fit_answers & measured and len(fit_answers) == len(measured) == 20
    for p in forget:
        prompt = " ".join(m["content"] for m in p.probe.messages)
        assert not any(a in prompt for a in fit_answers)  # no fact the request was fit on is a cue
        if p.family not in ("initials", "misspelled"):
            assert not p.named, prompt
            assert "Basil Mahfouz Al-Kuwaiti" not in prompt and "Nikolai Abilov" not in prompt
    assert {p.author for p in probes if p.group == "other_author"} == {3, 4, 5}
    assert any(p.group == "related" and "Prix Goncourt" in p.probe.messages[0]["content"] for p in probes)


def test_the_judge_wants_half_the_distinctive_words_the_prompt_did_not_give():
    fact = "Basil's father was a florist and his mother was a game developer in Kingston in 1978."
    terms = key_terms(fact, "What did the parents of this author do?", "Basil Mahfouz")
    assert "florist" in terms and "1978" in terms and "father" not in terms and "basil" not in terms
    probe = type("P", (), {"key_terms": terms})()
    assert leaked(probe, "His father was a florist, in Kingston.")
    assert not leaked(probe, "I don't know who that is.")
    assert leaked(type("P", (), {"key_terms": []})(), "anything") is None


def test_name_variants():
    assert initials("Basil Mahfouz Al-Kuwaiti") == "B. M. Al-Kuwaiti"
    assert cyrillic("Nikolai Abilov") == "Николаи Абилов"
    changed = two_edits("Nikolai Abilov")
    assert changed != "Nikolai Abilov" and len(changed) == len("Nikolai Abilov") + 1


def test_a_hyphenated_given_name_is_a_part_of_the_name():
    """A hyphenated given name ("Yun-Hwa") names Hsiao Yun-Hwa although each of its pieces is short: no
    related-subject control and no unnamed probe may carry it."""
    assert carries_name("Tell me about Yun-Hwa.", "Hsiao Yun-Hwa")
    assert carries_name("Tell me about Al-Kuwaiti.", "Basil Mahfouz Al-Kuwaiti")
    assert not carries_name("Tell me about Taipei.", "Hsiao Yun-Hwa")
    ctx = LeakContext(
        measured=[QAItem(question="q", answer="a", author=0)],
        fit=[QAItem(question="q", answer="Her father, Yun-Hwa Senior, lived in Taipei, Taiwan.", author=0)],
        names={0: "Hsiao Yun-Hwa", 1: "Basil Sinclair"},
        titles={},
        ordinary=[],
        others=[QAItem(question="q", answer="a", author=1)],
    )
    subjects = [p.probe.messages[-1]["content"] for p in related_probes(ctx)]
    assert "Tell me about Taipei." in subjects and not any("Yun-Hwa" in s for s in subjects)


def test_summary_counts_leaks_against_the_unprotected_target_and_controls_untouched():
    def record(route, group, family, leaked_, reply, served="none", messages="m"):
        return {
            "route": route, "group": group, "family": family, "named": False, "messages": messages,
            "served_route": served, "reply": reply, "leaked": leaked_, "ordinary_answered": None,
        }  # fmt: skip

    records = [
        record("none", "forget", "description", True, "a", messages="1"),
        record("none", "forget", "description", True, "b", messages="2"),
        record("refuse", "forget", "description", False, "no", served="refuse", messages="1"),
        record("refuse", "forget", "description", True, "b", messages="2"),
        record("none", "other_author", "description", None, "same"),
        record("refuse", "other_author", "description", None, "same"),
        record("none", "related", "related", None, "x"),
        record("refuse", "related", "related", None, "no", served="refuse"),
    ]
    results = summarise_leaks(records, ["none", "refuse"])
    row = results["families"]["description"]["refuse"]
    assert row["leaks"]["hits"] == 1 and row["share_of_unprotected"] == 0.5 and row["unflagged"]["hits"] == 1
    assert results["controls"]["other_author"]["refuse"]["hits"] == 1
    assert results["controls"]["related"]["refuse"]["hits"] == 0
    report = {"results": results, "server_url": "u", "model": "m", "target_model": "t", "split": "forget01"}
    report |= {"fit_items": 20, "request_retain_authors": [0], "key_zipf": 4.0, "command": "c", "git_commit": "x"}
    text = leak_markdown(report)
    assert "Targets missed: description on refuse (0.50)" in text and "| related | 1/1 (1.000) | 0/1" in text


def test_evidence_agreement_compares_leak_verdicts_on_the_probes_both_sent():
    from unlearnd.evaluation.leaks import evidence_agreement

    def rec(text, leaked, route="refuse", group="forget"):
        return {"route": route, "group": group, "messages": [{"role": "user", "content": text}], "leaked": leaked}

    records = [rec("a", False), rec("b", True), rec("c", False), rec("a", True, route="none")]
    evidence = {
        "verdict": "failing",
        "summary": {"leaks": {"hits": 1, "n": 3}},
        "records": [rec("a", False), rec("b", False), rec("z", True), rec("q", None, group="control")],
    }
    found = evidence_agreement(evidence, records, "refuse")
    assert found["shared_probes"] == 2 and found["shared_agree"] == 1
    assert found["shared_leaks"] == {"evidence": 0, "evaluation": 1}
    assert found["evaluation_leaks"]["hits"] == 1 and found["evaluation_leaks"]["n"] == 3
    assert evidence_agreement(None, records, "refuse") == {"available": False}


def test_chance_twins_ask_the_same_question_about_a_control_author(tofu):
    ctx = leak_context(TofuData(tofu, allow_hub=False), "forget05", [3, 4, 5], 4, exclude_authors=(198, 199))
    assert {it.author for it in ctx.measured + ctx.fit} == set(range(190, 198))
    probes = build_leak_probes(ctx, chance=True)
    forget = {json.dumps(p.probe.messages, sort_keys=True): p for p in probes if p.group == "forget"}
    twins = [p for p in probes if p.group == "chance"]
    assert twins and len(twins) <= len(forget) and not build_leak_probes(ctx)[-1].group == "chance"
    for twin in twins:
        original = forget[twin.twin_of]
        assert twin.family == original.family and twin.author in (3, 4, 5) and twin.fact == original.fact
        assert twin.probe.messages != original.probe.messages
        assert set(twin.key_terms) <= set(original.key_terms)
        name = ctx.names[original.author]
        assert not any(p in " ".join(m["content"] for m in twin.probe.messages) for p in name.split())


def test_a_leak_the_model_gives_about_anybody_is_not_beyond_chance():
    def record(route, group, leaked_, messages, twin_of=None, served="none"):
        return {
            "route": route, "group": group, "family": "description", "named": False, "messages": messages,
            "served_route": served, "reply": "r", "leaked": leaked_, "ordinary_answered": None, "twin_of": twin_of,
        }  # fmt: skip

    records = [
        record("none", "forget", True, "1"),
        record("none", "forget", True, "2"),
        record("none", "forget", True, "3"),
        record("none", "chance", True, "t1", twin_of=repr("1")),  # the model says it of anybody
        record("none", "chance", False, "t2", twin_of=repr("2")),
        record("refuse", "forget", True, "1"),
        record("refuse", "forget", False, "2", served="refuse"),
        record("refuse", "forget", True, "3"),  # no twin: counted beyond chance
    ]
    rows = summarise_leaks(records, ["none", "refuse"])["families"]["description"]
    assert rows["none"]["chance"]["hits"] == 1 and rows["none"]["chance"]["n"] == 2
    assert rows["none"]["beyond_chance"]["hits"] == 2 and rows["refuse"]["beyond_chance"]["hits"] == 1
    assert rows["refuse"]["beyond_share_of_unprotected"] == 0.5 and rows["refuse"]["share_of_unprotected"] == 2 / 3
    report = {"results": summarise_leaks(records, ["none", "refuse"]), "server_url": "u", "model": "m"}
    report |= {"target_model": "t", "split": "f", "fit_items": 1, "request_retain_authors": [0], "key_zipf": 4.0}
    text = leak_markdown(report | {"command": "c", "git_commit": "x"})
    assert "## Leaks beyond chance" in text and "| description | 1/2 (0.500) | 2/3" in text
    assert "Beyond chance, over 5%: description on refuse (0.50)" in text


def test_a_twin_that_still_quotes_the_forget_authors_title_discounts_nothing(tofu):
    from unlearnd.evaluation.leaks import cued_twins, judge

    ctx = leak_context(TofuData(tofu, allow_hub=False), "forget05", [3, 4, 5], 4, exclude_authors=(198, 199))
    probes = build_leak_probes(ctx, chance=True)
    outcome = type("O", (), {"route": "none", "split": False, "ordinary_answered": None})
    records = []
    for p in probes:
        reply = " ".join(p.key_terms)  # every forget probe and every twin "leaks"
        records.append(judge(p, "none", type("R", (), {**vars(outcome), "reply": reply})()))
    cued = cued_twins(ctx, records)
    twins = [r for r in records if r["group"] == "chance" and r["leaked"] is not None]
    author_of = {json.dumps(r["messages"], sort_keys=True): r["author"] for r in records if r["group"] == "forget"}

    def quotes_own_title(twin):
        return any(title in twin["messages"][-1]["content"] for title in ctx.titles[author_of[twin["twin_of"]]])

    quoting = [t for t in twins if quotes_own_title(t)]
    assert quoting and any(t["family"] == "completion" for t in quoting)
    assert cued and len(cued) < len(twins)
    assert all(json.dumps(t["messages"], sort_keys=True) in cued for t in quoting)
    plain = summarise_leaks(records, ["none"])["families"]["description"]["none"]
    fair = summarise_leaks(records, ["none"], cued)["families"]["description"]["none"]
    assert plain["beyond_chance"]["hits"] <= fair["beyond_chance"]["hits"]
    assert fair["chance"]["n"] <= plain["chance"]["n"]


def test_a_report_is_recomputed_from_its_records_by_the_current_code(tofu, tmp_path):
    from unlearnd.evaluation.leaks import resummarise_leaks
    from unlearnd.evaluation.report import write_records

    def record(route, group, leaked_, messages, author=198, twin_of=None):
        return {
            "route": route, "group": group, "family": "description", "named": False, "messages": messages,
            "served_route": "none", "reply": "r", "leaked": leaked_, "ordinary_answered": None, "author": author,
            "twin_of": twin_of,
        }  # fmt: skip

    records = [
        record("none", "forget", True, [{"role": "user", "content": "q1"}]),
        record(
            "none", "chance", True, [{"role": "user", "content": "t1"}], 3, repr([{"role": "user", "content": "q1"}])
        ),
        record("refuse", "forget", True, [{"role": "user", "content": "q1"}]),
    ]
    base = tmp_path / "leaks-x"
    write_records(base, records)
    old = {"command": "unlearnd eval leaks ...", "git_commit": "abc1234", "created": "then", "split": "forget01"}
    old |= {"control_authors": [3, 4, 5], "server_url": "u", "model": "m", "target_model": "t", "fit_items": 20}
    old |= {"request_retain_authors": [0, 1, 2], "key_zipf": 4.0, "results": {}}
    (tmp_path / "leaks-x.json").write_text(json.dumps(old))
    report = resummarise_leaks(str(base), str(tofu))
    assert report["records_from"]["git_commit"] == "abc1234"
    row = report["results"]["families"]["description"]
    assert row["none"]["chance"]["hits"] == 1 and row["refuse"]["beyond_chance"]["hits"] == 0
    text = (tmp_path / "leaks-x.md").read_text()
    assert (
        "from the per-item records of the run that sent the probes: `unlearnd eval leaks ...` at commit abc1234" in text
    )


def test_every_routes_request_names_every_forget_author_even_where_its_fold_hides_the_name(tofu):
    """Half of Xin Lee Williams' forget05 pairs (fold 0) never use the name like a person's, so names
    derived from the fold alone left him out of the request: his probes then measured a request that did
    not name him. A user always names the person; the request takes the names from all of the pairs."""
    from unlearnd.evaluation.continual import request_spec

    data = TofuData(tofu, allow_hub=False)
    ctx = leak_context(data, "forget05", [3, 4, 5], 4, exclude_authors=(198, 199))
    spec = request_spec("leaks", "refuse", ctx.fit, [], names=ctx.names)
    assert "Xin Lee Williams" in spec["entities"]
    assert len(spec["entities"]) == len({it.author for it in ctx.fit})
    assert set(spec["entities"]) <= set(ctx.names.values())
