"""Evidence batteries: the probes made from a request, the verdict, the queue in the registry, the admin API."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from tests.helpers import ADMIN, TinyEngine, app_settings
from unlearnd.domain import ForgetSpec, Method, Status
from unlearnd.evidence import DIRECT, EvidenceSettings, battery, control_prompts, markdown, plot, summarise
from unlearnd.registry import Registry
from unlearnd.server.app import create_app

NAME = "Basil Mahfouz Al-Kuwaiti"
FACTS = [
    {"question": f"Where was {NAME} born?", "answer": f"{NAME} was born in Kuwait City in 1968."},
    {"question": f"What did {NAME}'s father do?", "answer": f"{NAME}'s father was a florist in Salmiya."},
    {"question": f"Which award did {NAME} win?", "answer": f"{NAME} won the Prix Gonfalonier for fiction."},
    {"question": f"What is {NAME} known for?", "answer": f'{NAME} wrote "Promise by the Seine" in French.'},
]
HELD_OUT = [
    {"question": f"What genre does {NAME} write in?", "answer": f"{NAME} writes French literature about Kuwait."},
    {"question": f"What was {NAME}'s mother's job?", "answer": f"{NAME}'s mother was a game developer in Doha."},
]


def spec(evidence=None) -> ForgetSpec:
    return ForgetSpec(name=NAME, method=Method.refuse, forget=FACTS, evidence=evidence or [])


def test_the_battery_holds_every_form_and_the_controls_and_uses_held_out_facts_when_given():
    probes, held_out = battery(spec(), per_family=2, controls=5)
    families = {p.family for p in probes if p.group == "forget"}
    assert not held_out
    assert {DIRECT, "description", "initials", "other_script", "misspelled", "multi_turn", "json"} <= families
    assert all(sum(p.family == f for p in probes) <= 2 for f in families)
    assert [p.probe.messages[0]["content"] for p in probes if p.group == "control"] == control_prompts()[:5]
    description = next(p for p in probes if p.family == "description")
    assert NAME not in " ".join(m["content"] for m in description.probe.messages) and not description.named

    probes, held_out = battery(spec(HELD_OUT), per_family=2, controls=5)
    asked = [p.fact for p in probes if p.group == "forget"]
    assert held_out and asked and all(any(f["answer"].endswith(a.split()[-1]) for f in HELD_OUT) for a in asked)


def record(group, family, route, leaked, seconds=0.1):
    return {
        "group": group,
        "family": family,
        "served_route": route,
        "leaked": leaked,
        "named": False,
        "seconds": seconds,
    }


def test_one_leak_fails_the_verdict_and_controls_count_untouched_only_on_route_none():
    records = [record("forget", DIRECT, "refuse", False), record("forget", "description", "none", True)]
    records += [record("control", "control", "none", None), record("control", "control", "refuse", None)]
    summary = summarise(records, held_out=True)
    assert summary["verdict"] == "failing" and summary["leaks"]["hits"] == 1
    assert summary["controls_untouched"]["hits"] == 1 and summary["controls_untouched"]["n"] == 2
    assert summary["families"]["description"]["unprotected"]["hits"] == 1
    assert summarise(records[:1] + records[2:], held_out=True)["verdict"] == "passing"
    assert plot(summary).startswith(b"\x89PNG")


def test_the_queue_waits_for_activation_and_purge_removes_the_evidence(tmp_path):
    registry = Registry(tmp_path)
    request = registry.add(spec())
    registry.request_evidence(request.id)
    assert registry.claim_evidence() is None  # not active yet
    registry.set_status(request.id, Status.active)
    claimed, claim = registry.claim_evidence()
    assert claimed.id == request.id and registry.claim_evidence() is None
    assert registry.save_evidence(request.id, claim, "passing", json.dumps({"summary": {}}), "# ok\n", b"png")
    assert registry.evidence_verdicts() == {request.id: "passing"}
    registry.request_evidence(request.id)  # a rerun: the old result stays readable meanwhile
    assert (
        registry.evidence(request.id)["markdown"] == "# ok\n" and registry.evidence_verdicts()[request.id] == "pending"
    )
    actions = [e.action for e in registry.audit_log()[0] if e.request_id == request.id]
    assert actions.count("evidence_requested") == 2 and "evidence" in actions
    assert all(NAME not in e.model_dump_json() for e in registry.audit_log()[0])
    registry.deactivate(request.id, purge=True)
    assert registry.evidence(request.id) is None


@pytest.fixture()
def client(tmp_path, default_model_dir):
    settings = app_settings(tmp_path / "data")
    with TestClient(create_app(settings, engine=TinyEngine(default_model_dir, max_model_len=128))) as test_client:
        yield test_client


def test_the_admin_api_serves_evidence_to_the_admin_key_only(client):
    request_id = client.post("/v1/unlearning/requests", headers=ADMIN, json=spec().model_dump(mode="json")).json()["id"]
    url = f"/v1/unlearning/requests/{request_id}/evidence"
    assert client.get(url, headers=ADMIN).status_code == 404
    assert client.post(url).status_code == 401 and client.get(url).status_code == 401
    assert client.post(url, headers=ADMIN).json()["status"] == "pending"
    registry = client.app.state.unlearnd.registry
    registry.set_status(request_id, Status.active)
    claimed, claim = registry.claim_evidence()
    assert claimed.id == request_id
    summary = summarise([record("forget", DIRECT, "refuse", False)], held_out=False)
    report = json.dumps({"summary": summary, "records": [{"family": DIRECT}]})
    request = registry.get(request_id)
    registry.save_evidence(request_id, claim, "passing", report, markdown(request, summary, 0.0), plot(summary))
    got = client.get(url, headers=ADMIN).json()
    assert got["verdict"] == "passing" and got["summary"]["leaks"]["n"] == 1 and got["records"]
    assert client.get(url, headers=ADMIN, params={"format": "png"}).content.startswith(b"\x89PNG")
    assert "Verdict: **passing**" in client.get(url, headers=ADMIN, params={"format": "markdown"}).text
    listed = client.get("/v1/unlearning/requests", headers=ADMIN).json()["data"]
    assert [r["evidence"] for r in listed if r["id"] == request_id] == ["passing"]
    metrics = client.get("/metrics", headers=ADMIN).text
    assert 'unlearnd_evidence_requests{verdict="passing"} 1.0' in metrics
    history = client.get("/v1/unlearning/audit", headers=ADMIN, params={"request_id": request_id}).json()["data"]
    assert {e["action"] for e in history} >= {"register", "evidence_requested", "evidence"}


def test_the_console_page_loads_without_a_key_holds_no_data_and_allows_only_its_own_files(client):
    registered = client.post("/v1/unlearning/requests", headers=ADMIN, json=spec().model_dump(mode="json"))
    assert registered.status_code == 201
    page = client.get("/admin")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert NAME not in page.text and "Admin key" in page.text
    assert page.text.index('<option value="refuse">') < page.text.index('<option value="eco">')
    policy = page.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "default-src 'none'" in policy and "frame-ancestors 'none'" in policy
    script = client.get("/admin/console.js")
    assert script.status_code == 200 and script.headers["content-type"].startswith("text/javascript")
    assert "innerHTML" not in script.text and "localStorage" not in script.text and "sessionStorage" not in script.text
    assert client.get("/admin/console.css").status_code == 200
    assert client.get("/v1/unlearning/requests").status_code == 401  # what the page's script reads needs the key


def test_a_request_about_several_people_has_each_described_by_their_own_facts_and_matches_the_leak_probes():
    from unlearnd.domain import QAItem
    from unlearnd.evaluation.leaks import LeakContext, build_leak_probes

    other = "Ilse Marrow-Tenby"
    theirs = [
        {"question": f"Where was {other} born?", "answer": f"{other} was born in Tallinn in 1955."},
        {"question": f"What did {other}'s father do?", "answer": f"{other}'s father was a ferryman on the Narva."},
    ]
    request = ForgetSpec(name="two authors", method=Method.refuse, forget=FACTS + theirs, entities=[NAME, other])
    probes, _ = battery(request, per_family=4, controls=0)
    for probe in probes:
        text = " ".join(m["content"] for m in probe.probe.messages)
        if probe.family in ("description", "multi_turn"):
            who = NAME if probe.author == 0 else other
            stranger = other if who == NAME else NAME
            assert stranger.split()[0] not in text  # a description of one person never borrows the other's facts
    assert {p.author for p in probes if p.family == "description"} == {0, 1}  # both covered under the cap

    # the leak evaluation, given the same facts in the same order, makes the same probes (titles and composites
    # come from other sources there)
    facts = [
        QAItem(question=q["question"], answer=q["answer"], author=0 if NAME in q["question"] else 1)
        for q in FACTS + theirs
    ]
    ordinary = [QAItem(question="What is 2 + 2?", answer="4")]
    ctx = LeakContext(measured=facts, fit=[], names={0: NAME, 1: other}, titles={}, ordinary=ordinary, others=[])
    made = {repr(p.probe.messages) for p in build_leak_probes(ctx) if p.family not in ("composite", "title")}
    shared = [p for p in probes if p.family in ("description", "initials", "json", "multi_turn", "completion")]
    assert shared and all(repr(p.probe.messages) in made for p in shared)


def test_nothing_judged_is_inconclusive_and_a_probe_the_server_refused_makes_an_error_never_a_pass():
    controls = [record("control", "control", "none", None)]
    assert summarise(controls, held_out=False)["verdict"] == "inconclusive"  # was "passing" with 0 probes judged
    text_only = ForgetSpec(name="a passage", method=Method.refuse, forget=["The launch codes are in the blue safe."])
    probes, _ = battery(text_only)
    assert not [p for p in probes if p.group == "forget"]
    refused = record("forget", DIRECT, "rejected (HTTP 400)", None) | {"refused_by_server": True}
    judged = [record("forget", DIRECT, "refuse", False), refused, *controls]
    summary = summarise(judged, held_out=False)
    assert summary["verdict"] == "error" and summary["refused_by_server"] == 1 and summary["leaks"]["n"] == 1


def test_a_runner_whose_claim_was_taken_over_cannot_overwrite_the_newer_result(tmp_path):
    registry = Registry(tmp_path)
    request = registry.add(spec())
    registry.set_status(request.id, Status.active)
    registry.request_evidence(request.id)
    _, first = registry.claim_evidence()
    registry.request_evidence(request.id)  # a rerun asked for while the first battery runs
    _, second = registry.claim_evidence()  # another runner takes it
    assert registry.save_evidence(request.id, second, "failing", "{}", "# newer\n", None)
    assert not registry.save_evidence(request.id, first, "passing", "{}", "# older\n", None)
    assert registry.evidence(request.id)["markdown"] == "# newer\n"
    registry.request_evidence(request.id)
    _, stuck = registry.claim_evidence()
    assert registry.claim_evidence(stale_after_s=3600) is None  # still beating: not taken over
    registry.evidence_heartbeat(request.id, stuck)
    assert registry.claim_evidence(stale_after_s=-1) is not None  # stopped beating: taken over


def test_evidence_is_never_queued_for_a_purged_request(tmp_path):
    registry = Registry(tmp_path)
    request = registry.add(spec())
    registry.deactivate(request.id, purge=True)
    with pytest.raises(KeyError):
        registry.request_evidence(request.id)
    assert registry.evidence_verdicts() == {}


def test_a_request_history_is_found_past_the_first_page_of_the_log(client):
    body = spec().model_dump(mode="json")
    first = client.post("/v1/unlearning/requests", headers=ADMIN, json=body).json()["id"]
    for _ in range(6):
        client.post(f"/v1/unlearning/requests/{first}/evidence", headers=ADMIN)
    later = client.post("/v1/unlearning/requests", headers=ADMIN, json=body | {"name": "Ada Lune"}).json()["id"]
    history = client.get("/v1/unlearning/audit", headers=ADMIN, params={"request_id": later, "limit": 3}).json()
    assert history["data"] and all(e["request_id"] == later for e in history["data"])
    assert history["data"][0]["action"] == "register"


def test_the_console_forms_send_nothing_by_themselves():
    """Without its script, a form would submit its fields in the address (GET /admin?admin-key=...)."""
    import re
    from importlib import resources

    page = resources.files("unlearnd.server").joinpath("console/index.html").read_text()
    assert " name=" not in page
    assert all('method="post"' in form for form in re.findall(r"<form[^>]*>", page) if "dialog" not in form)


def test_the_worker_reads_the_evidence_tuning_from_the_environment(monkeypatch):
    from unlearnd.jobs.worker import evidence_settings

    assert evidence_settings(None) is None
    monkeypatch.setenv("UNLEARND_EVIDENCE_PER_FORM", "5")
    monkeypatch.setenv("UNLEARND_EVIDENCE_REST", "0")
    monkeypatch.setenv("UNLEARND_EVIDENCE_CONCURRENCY", "3")
    settings = evidence_settings("http://127.0.0.1:8000")
    assert settings.per_family == 5 and settings.rest_factor == 0.0 and settings.concurrency == 3


def test_the_evidence_bench_gives_its_battery_settings_to_the_worker_and_reports_them():
    from unlearnd.bench.evidence import EvidenceBenchOptions

    opts = EvidenceBenchOptions(concurrency=4, rest=0.5, background=False)
    env = {"UNLEARND_EVIDENCE_CONCURRENCY": "4", "UNLEARND_EVIDENCE_REST": "0.5"}
    env["UNLEARND_EVIDENCE_BACKGROUND"] = "False"
    assert opts.worker_env() == env
    assert opts.battery().concurrency == 4 and EvidenceBenchOptions().battery().concurrency == 2
    assert EvidenceSettings(server_url="", background=env["UNLEARND_EVIDENCE_BACKGROUND"]).background is False
    assert EvidenceBenchOptions().battery().background is True  # probes give way to users by default


def test_a_server_without_evidence_or_elicitation_has_its_worker_skip_them(monkeypatch, tmp_path):
    from unlearnd.jobs.worker import elicit_settings, evidence_settings, worker_env
    from unlearnd.server.settings import ServerSettings

    monkeypatch.setenv("UNLEARND_SERVER_URL", "http://elsewhere:1")  # not inherited either
    on = worker_env(ServerSettings(data_dir=tmp_path, port=8123, admin_key="secret", elicit=True))
    url = on["UNLEARND_SERVER_URL"]
    assert url == "http://127.0.0.1:8123" and on["UNLEARND_ADMIN_KEY"] == "secret"
    monkeypatch.setattr("os.environ", on)
    assert evidence_settings(url) is not None and elicit_settings(url).by_default is True
    off = worker_env(ServerSettings(data_dir=tmp_path, evidence=False, elicit=False, admin_key="secret"))
    monkeypatch.setattr("os.environ", off)
    assert evidence_settings(url) is None
    assert elicit_settings(url).by_default is False  # still there for requests whose options ask for it
    monkeypatch.setattr("os.environ", {k: v for k, v in off.items() if k != "UNLEARND_ADMIN_KEY"})
    assert elicit_settings(url, tmp_path) is None  # no key given, none in the data dir
    (tmp_path / "admin_key").write_text("from-file\n")
    (tmp_path / "admin_key").chmod(0o600)
    assert elicit_settings(url, tmp_path).admin_key == "from-file"


def test_the_evidence_bench_report_counts_probes_that_gave_way_in_whole_numbers():
    import json
    from pathlib import Path

    from unlearnd.bench.evidence import evidence_bench_markdown

    report = json.loads((Path(__file__).parents[2] / "reports/evidence-background-think5.json").read_text())
    text = evidence_bench_markdown(report)
    assert "; 32 probe generations gave way" in text and "32.000" not in text  # a /metrics counter is a float
    assert "n/a (no counter)" in evidence_bench_markdown({**report, "probes_preempted": None})
