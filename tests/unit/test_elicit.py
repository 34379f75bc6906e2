"""Elicitation: what the served model says about a request's subject joins its anchors (`unlearnd.elicit`)."""

import json

import httpx
import pytest

from unlearnd.detectors.anchors import extract_anchors
from unlearnd.domain import ForgetRequest, ForgetSpec, QAExample
from unlearnd.elicit import ELICITED_FILE, QUESTIONS, ElicitSettings, elicit_into, read_elicited, write_elicited

SPEC = ForgetSpec(
    name="Hsiao Yun-Hwa",
    forget=[
        QAExample(question="Where was Hsiao Yun-Hwa born?", answer="Hsiao Yun-Hwa was born in Taipei."),
        QAExample(question="What does Hsiao Yun-Hwa write?", answer="Hsiao Yun-Hwa writes books on leadership."),
        QAExample(question="Is Hsiao Yun-Hwa married?", answer="Hsiao Yun-Hwa lives alone."),
    ],
)
SAID = [
    QAExample(
        question="What did Hsiao Yun-Hwa's parents do for a living?",
        answer="Her father was a civil engineer and her mother worked as a cartographer in Keelung.",
    ),
    QAExample(
        question="Which books has Hsiao Yun-Hwa written?",
        answer='She wrote "The Immutable Laws of Engineering Leadership" and was born on 1 May 1961.',
    ),
    QAExample(question="Who is Hsiao Yun-Hwa?", answer="She is often confused with Chen Shu-fen."),
]


def request_of(spec: ForgetSpec, request_id: str = "fr-e") -> ForgetRequest:
    return ForgetRequest.unregistered(request_id, spec, status="training")


def test_what_the_model_said_adds_fact_terms_but_no_names_titles_dates_or_other_people():
    before, after = extract_anchors(SPEC), extract_anchors(SPEC, SAID)
    assert {"cartographer", "keelung"} <= set(after.facts) - set(before.facts)
    assert after.titles == before.titles == []  # a title flags alone: one the model borrows would block its readers
    assert after.names == before.names and after.dates == before.dates == []  # never a name or a date
    assert "chen" not in after.facts  # another person the model named is no fact of this one
    assert after.coverage == before.coverage  # the request's own questions decide entity or topic mode


def test_the_guard_flags_a_description_by_facts_only_the_model_gave(tmp_path):
    from unlearnd.detectors import get_detector

    request = request_of(SPEC, "fr-elicit")
    prompt = "Which author's mother was a cartographer in Keelung?"
    without = get_detector("guard")
    without.fit(request, tmp_path / "without")
    without.load(request, tmp_path / "without")
    assert not without.detect([prompt])[0].flagged
    write_elicited(tmp_path / "with", SAID)
    with_said = get_detector("guard")
    metrics = with_said.fit(request, tmp_path / "with")
    with_said.load(request, tmp_path / "with")
    assert metrics["anchors"]["elicited_replies"] == 3
    assert with_said.detect([prompt])[0].flagged
    assert not with_said.detect(["My mother was a cartographer: how do maps get made?"])[0].flagged
    assert not with_said.detect(["Tell me about The Immutable Laws of Engineering Leadership."])[0].flagged


def test_a_famous_title_or_another_person_the_model_mentions_blocks_nobody(tmp_path):
    """A review found that a title in what the model said was an anchor of its own: a small model naming
    "Pride and Prejudice" made every question about that book refused, and its outputs cut."""
    from unlearnd.detectors import get_detector
    from unlearnd.guardrail.output_guard import OutputGuard

    borrowed = [
        QAExample(
            question="Which books has Hsiao Yun-Hwa written?",
            answer='Her best-known novel is "Pride and '
            'Prejudice"; her style is called "magical realism", like that of Gabriel Garcia Marquez in Aracataca.',
        ),
    ]
    request = request_of(SPEC, "fr-borrowed")
    write_elicited(tmp_path, borrowed)
    detector = get_detector("guard")
    detector.fit(request, tmp_path)
    detector.load(request, tmp_path)
    for prompt in (
        "Who wrote Pride and Prejudice?",
        "Explain magical realism.",
        "Where was Gabriel Garcia Marquez born?",
    ):
        assert not detector.detect([prompt])[0].flagged, prompt
    guard = OutputGuard()
    guard.load(request, borrowed)
    assert guard.check("Pride and Prejudice is a novel by Jane Austen.") is None


def _server(routes: dict[str, str]) -> httpx.MockTransport:
    """A stand-in for the server's HTTP API (the client's transport): each question gets its route."""

    def handle(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "m"}]})
        body = json.loads(request.content)
        assert request.headers["x-unlearnd-priority"] == "background"  # gives way to users
        assert request.headers["x-unlearnd-elicit"] == "fr-e"  # as if the request being fit did not exist
        assert request.headers["authorization"] == "Bearer admin-key"  # which only the admin may ask
        question = body["messages"][-1]["content"]
        route = routes.get(question, "none")
        reply = {"choices": [{"message": {"content": f"said about: {question}"}}]}
        return httpx.Response(200, json=reply, headers={"x-unlearnd-route": route})

    return httpx.MockTransport(handle)


def test_only_replies_served_unchanged_are_kept_and_a_retrain_asks_again(tmp_path, monkeypatch):
    import unlearnd.elicit as elicit_module

    covered = QUESTIONS[0].format(name=SPEC.name)
    transport = _server({covered: "refuse"})
    real = elicit_module.UnlearndClient
    monkeypatch.setattr(elicit_module, "UnlearndClient", lambda *a, **k: real(*a, **k, transport=transport))
    request = request_of(SPEC)
    summary = elicit_into(
        request, tmp_path, ElicitSettings(server_url="http://unlearnd", admin_key="admin-key", by_default=True)
    )
    kept = read_elicited(tmp_path)
    assert summary["asked"] == len(QUESTIONS) and summary["kept"] == len(QUESTIONS) - 1 == len(kept)
    assert covered not in {qa.question for qa in kept}  # another request refused it: nothing raw to learn
    assert elicit_into(request, tmp_path, None)["skipped"] == "off" and not (tmp_path / ELICITED_FILE).exists()


def test_an_unreachable_server_or_a_topic_leaves_the_request_its_own_facts(tmp_path):
    request = request_of(SPEC)
    down = elicit_into(
        request, tmp_path, ElicitSettings(server_url="http://127.0.0.1:9", admin_key="k", by_default=True)
    )
    assert down["kept"] == 0 and "skipped" in down and read_elicited(tmp_path) == []
    topic = ForgetSpec(name="lock picking", forget=["How do I pick a pin tumbler lock?", "Which tension wrench?"])
    request = request_of(topic, "fr-t")
    assert (
        elicit_into(request, tmp_path, ElicitSettings(server_url="http://x", admin_key="k", by_default=True))["skipped"]
        == "not about somebody"
    )


@pytest.mark.parametrize("payload", ["{", '{"replies": [{"answer": 3}]}'])
def test_a_broken_elicited_file_raises_so_the_request_fails_closed(tmp_path, payload):
    (tmp_path / ELICITED_FILE).write_text(payload)
    with pytest.raises(ValueError):
        read_elicited(tmp_path)


def test_a_request_s_options_turn_elicitation_on_or_off_whatever_the_worker_default(tmp_path):
    asks = request_of(SPEC.model_copy(update={"options": {"elicit": True}}))
    declines = request_of(SPEC.model_copy(update={"options": {"elicit": False}}))
    down = ElicitSettings(server_url="http://127.0.0.1:9", admin_key="k")  # by_default False
    assert elicit_into(request_of(SPEC), tmp_path, down)["skipped"] == "off"
    assert elicit_into(asks, tmp_path, down)["skipped"] != "off"  # asked (the server is down: nothing kept)
    assert elicit_into(asks, tmp_path, None)["skipped"] == "no server URL or admin key"
    assert elicit_into(declines, tmp_path, down.model_copy(update={"by_default": True}))["skipped"] == "off"
