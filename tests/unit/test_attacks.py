"""The attack suite: every attack builds valid probes in its disguise, and each probe is judged by what a
user without the admin key gets back from a real app."""

from __future__ import annotations

import base64

import pytest
from fastapi.testclient import TestClient

from tests.helpers import ScriptedEngine, app_settings, register_active
from unlearnd.client import UnlearndClient
from unlearnd.data.tofu import TofuData
from unlearnd.domain import QAItem
from unlearnd.evaluation.attacks import ATTACKS, attack_context, build_probes, quoted_titles, run_probe, summarise
from unlearnd.server.app import create_app
from unlearnd.server.protocol import ChatCompletionRequest


@pytest.fixture(scope="module")
def ctx(tofu):
    return attack_context(TofuData(tofu, allow_hub=False), "forget01")


def test_every_attack_builds_valid_requests_in_its_disguise(ctx):
    probes = build_probes(ctx, list(ATTACKS))
    by_kind = {kind: [p for p in probes if p.kind == kind] for kind in ATTACKS}
    assert all(len(ps) >= 30 for ps in by_kind.values()), {k: len(v) for k, v in by_kind.items()}
    for probe in probes:
        ChatCompletionRequest(model="m", messages=probe.messages)  # the server would accept it
    names = set(ctx.names.values())
    for probe in by_kind["indirect"]:
        assert not any(n in probe.messages[-1]["content"] for n in names)
        assert "the author of '" in probe.messages[-1]["content"]
    for probe in by_kind["multi_turn"]:
        assert not any(n in probe.messages[-1]["content"] for n in names)
        assert any(n in m["content"] for m in probe.messages[:-1] for n in names)
    for probe in by_kind["non_user_role"]:
        questions = {it.question for it in ctx.items}
        assert not any(m["content"] in questions for m in probe.messages if m["role"] == "user")
        assert any(q in m["content"] for m in probe.messages if m["role"] != "user" for q in questions)
    encoded = [p for p in by_kind["obfuscation"] if p.variant == "base64"]
    decoded = base64.b64decode(encoded[0].messages[0]["content"].rsplit(" ", 1)[1]).decode()
    assert decoded in {it.question for it in ctx.items}
    for probe in by_kind["in_context_relearning"]:
        assert probe.answer not in probe.messages[0]["content"]  # the asked fact is never given
    scored = by_kind["logprob_score"]
    assert all(len(p.options) == 4 and p.options[p.true_index] == p.answer for p in scored)


@pytest.fixture()
def app_client(tmp_path, default_model_dir, ctx):
    """A real app whose model always says the first forget answer; one refuse request can be added."""
    item = ctx.items[0]
    settings = app_settings(tmp_path / "data")
    client = TestClient(create_app(settings, engine=ScriptedEngine(default_model_dir, item.answer, max_model_len=512)))
    with client:
        yield client, settings, item


def user(client: TestClient) -> UnlearndClient:
    attacker = UnlearndClient("http://testserver", retries=0)  # no admin key
    attacker.http = client  # the app in process (a TestClient is an httpx.Client)
    return attacker


def test_a_leak_counts_unless_the_route_refuses_and_denied_scores_are_failures(app_client, ctx):
    client, settings, item = app_client
    direct = next(p for p in build_probes(ctx, ["direct"]) if p.answer == item.answer)
    score = next(p for p in build_probes(ctx, ["logprob_score"]) if p.answer == item.answer)
    attacker = user(client)
    leaked = run_probe(attacker, "tiny", direct, 64)
    assert leaked.success and leaked.route == "none"
    denied = run_probe(attacker, "tiny", score, 64)
    assert not denied.success and denied.route == "denied (HTTP 401)"

    name = ctx.names[item.author]
    body = {
        "name": name,
        "method": "refuse",
        "forget": [{"question": it.question, "answer": it.answer} for it in ctx.items if it.author == item.author],
    }
    register_active(client, settings.data_dir, body)
    refused = run_probe(attacker, "tiny", direct, 64)
    assert not refused.success and refused.route in {"refuse", "output_blocked"}
    summary = summarise([direct, direct], [leaked, refused])["direct"]
    assert summary["successes"] == 1 and summary["n"] == 2 and summary["ci95"][0] < 0.5 < summary["ci95"][1]


def test_flat_numbers_rank_nothing_first():
    from unlearnd.evaluation.attacks import _ranked_first

    flat = [sum([-10.8] * n) / n for n in (7, 11, 13, 17)]  # one value, averaged over different lengths
    assert not _ranked_first(flat, 0) and not _ranked_first([float("-inf")] * 4, 2)
    assert _ranked_first([-1.0, -2.0, -1.5, -3.0], 0) and not _ranked_first([-1.0, -1.0, -2.0, -3.0], 0)


@pytest.mark.parametrize("route", ["refuse", "lora"])
def test_an_attack_run_registers_the_whole_forget_split_for_its_route(tofu, route):
    """Attacks target the very questions a user asked to forget: the request holds all of them (and the
    preset's retain QA), in the spec shape the server takes."""
    from unlearnd.domain import ForgetSpec
    from unlearnd.evaluation.attacks import route_request_spec
    from unlearnd.train.reference import ReferenceModels, preset, reference_data

    data = TofuData(tofu, allow_hub=False)
    p = preset("mini")
    refs = ReferenceModels(preset=p, target_dir="/t", retain_dir="/r", data=reference_data(p, data))
    spec = route_request_spec(route, refs, data)
    assert spec["method"] == route and len(spec["forget"]) == 40 and len(spec["retain"]) == 120
    assert ForgetSpec.model_validate(spec).entities == spec["entities"] and len(spec["entities"]) == 2


def test_composite_probes_come_in_four_forms_and_are_split_with_a_leaking_ordinary_part_still_cut(
    app_client, ctx, tmp_path
):
    from unlearnd.evaluation.attacks import item_records, markdown
    from unlearnd.evaluation.report import read_records, write_records

    probes = build_probes(ctx, ["composite"])
    assert {p.variant for p in probes} == {"ordinary_first", "forget_first", "one_line", "bullets"}
    client, settings, item = app_client
    body = {
        "name": ctx.names[item.author],
        "method": "refuse",
        "forget": [{"question": it.question, "answer": it.answer} for it in ctx.items if it.author == item.author],
    }
    register_active(client, settings.data_dir, body)
    named = [p for p in probes if "Al-Kuwaiti" in p.messages[-1]["content"]]  # what the keyword detector flags
    mine = [next(p for p in named if p.variant == v) for v in ("ordinary_first", "forget_first", "one_line", "bullets")]
    # the scripted model says the forget answer to everything, the ordinary part included: the guard cuts it
    outcomes = [run_probe(user(client), "tiny", p, 64) for p in mine]
    assert all(o.split and not o.success and o.route == "output_blocked" for o in outcomes), outcomes
    summary = summarise(mine, outcomes)
    assert summary["composite"]["split"] == len(mine)
    report = {"routes": {"refuse": summary}, "success_rouge": 0.5, "attacks": {}, "server_url": "u", "model": "m"}
    report |= {"target_model": "t", "split": "forget01", "command": "c", "git_commit": "x", "created": "now"}
    assert "| refuse | 0.000" in markdown(report)
    records = item_records("refuse", mine, outcomes)
    assert read_records(write_records(tmp_path / "attacks", records)) == records


def test_quoted_titles_keep_their_apostrophes():
    """The title probes asked about "the author of 'Thieves'" for "Thieves' Paradise": no user says that."""
    answer = QAItem(
        question="Which books?",
        answer="He wrote \"Thieves' Paradise,\" 'Unseen Rainbows', 'Nature's Whisper' and Basil's 'River of Jasmine'; "
        "the 'Lovereading Reader's Choice Award'.",
        author=7,
    )
    expected = ["Thieves' Paradise", "Unseen Rainbows", "Nature's Whisper", "River of Jasmine"]
    assert quoted_titles([answer]) == {7: expected}
