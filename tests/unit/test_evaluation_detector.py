"""`unlearnd eval detector`'s probes and bookkeeping (the real detector runs in test_detection_kinds)."""

import numpy as np

from unlearnd.data.tofu import TofuData
from unlearnd.detectors.spans import edit_distance
from unlearnd.evaluation.detector import (
    DetectorEvalOptions,
    Probe,
    build_probes,
    look_alike,
    probe_records,
    setups,
    summarise,
    typo,
    wilson,
)
from unlearnd.prompting import user_messages


def test_typo_is_one_edit_and_look_alike_two():
    rng = np.random.default_rng(0)
    for name in ("Takashi Nakamura", "Basil Mahfouz Al-Kuwaiti", "Hina Ameen"):
        t, a = typo(name, rng), look_alike(name, rng)
        assert edit_distance(t.lower(), name.lower(), 3) == 1
        assert edit_distance(a.lower(), name.lower(), 3) == 2


def test_probes_cover_every_kind_and_never_hold_a_fitted_question(tofu):
    data = TofuData(tofu, allow_hub=False)
    forget, probes = build_probes(data, "forget05", DetectorEvalOptions(data=str(tofu), per_kind=2))
    assert len(forget) == 10
    kinds = {(p.positive, p.kind) for p in probes}
    positive = {k for pos, k in kinds if pos}
    negative = {k for pos, k in kinds if not pos}
    assert len(positive) >= 12 and {"obfuscated", "indirect", "non_user_role", "multi_turn"} <= positive
    assert {"look_alike", "near_miss_place", "near_miss_part", "real_people", "chat", "plain"} <= negative
    fitted = {i.question for a in forget for i in a.items}
    assert not any(p.text in fitted for p in probes)
    requests = setups("forget05", forget)
    assert len(requests["one request per author"]) == 10 and requests["one request per author"][0].spec.entities == [
        forget[0].name
    ]
    assert requests["one request for all"][0].spec.entities == ["TOFU forget05 authors"]  # names left to derive


def test_summary_rates_intervals_and_errors():
    probes = [
        Probe("plain", True, "A", user_messages(f"q{i}"), ["r"] if i < 9 else [], 1.0 if i < 9 else 0.0)
        for i in range(10)
    ]
    probes += [
        Probe("chat", False, "", user_messages(f"c{i}"), ["r"] if i == 0 else [], 0.9 if i == 0 else 0.0)
        for i in range(20)
    ]
    s = summarise(probes)
    assert s["tpr"] == 0.9 and s["fpr"] == 0.05 and s["kinds"]["+ plain"]["n"] == 10
    assert s["targets"]["fpr_worst_negative_kind"] == 0.05
    assert len(s["errors"]) == 2 and {e["expected"] for e in s["errors"]} == {"flag", "pass"}
    lo, hi = wilson(9, 10)
    assert 0.55 < lo < 0.9 < hi <= 1.0 and wilson(0, 0) is None


def test_probe_records_say_whether_the_easy_cue_is_in_the_text():
    probes = [
        Probe("plain", True, "A", user_messages("Where was Nikolai Abilov born?"), ["r"], 0.9),
        Probe("description", True, "A", user_messages("Where was the Kazakh author born?"), [], 0.1),
    ]
    records = probe_records("one request per author", "guard", probes, ["Nikolai Abilov"])
    assert [r["named"] for r in records] == [True, False]
    assert records[0]["flagged_for"] == ["r"] and records[1]["text"].endswith("born?")


def test_left_out_authors_are_not_probed_and_another_seed_draws_other_probes(tofu):
    data = TofuData(tofu, allow_hub=False)
    opts = DetectorEvalOptions(data=str(tofu), split="forget10", per_kind=2, exclude_authors=list(range(190, 200)))
    forget, probes = build_probes(data, "forget10", opts)
    assert [a.index for a in forget] == list(range(180, 190))
    left_out = {a.name for a in build_probes(data, "forget05", DetectorEvalOptions(data=str(tofu)))[0]}
    assert not {p.about for p in probes if p.positive} & left_out  # 190-199 neither probed nor other authors
    again = build_probes(data, "forget10", opts.model_copy(update={"seed": 1}))[1]
    assert [p.text for p in again] != [p.text for p in probes]
    assert [p.text for p in build_probes(data, "forget10", opts)[1]] == [p.text for p in probes]


def test_summary_states_the_share_of_probes_that_name_a_forget_author():
    probes = [
        Probe("plain", True, "A", user_messages("Where was Nikolai Abilov born?"), ["r"], 0.9),
        Probe("plain", True, "A", user_messages("Where was the Kazakh author born?"), [], 0.1),
        Probe("chat", False, "", user_messages("Write a haiku."), [], 0.0),
    ]
    kinds = summarise(probes, ["Nikolai Abilov"])["kinds"]
    assert kinds["+ plain"]["named"] == 0.5 and kinds["- chat"]["named"] == 0.0
