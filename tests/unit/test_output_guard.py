"""The output guard: what the model says is checked on every route, and nothing forgotten is sent."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable

import pytest
from fastapi.testclient import TestClient

from tests.helpers import ADMIN, ScriptedEngine, app_settings, register_active
from unlearnd.domain import ForgetRequest, ForgetSpec, QAExample
from unlearnd.engine.base import ChoiceDelta, TokenLogprob
from unlearnd.guardrail import prometheus
from unlearnd.guardrail.output_guard import OutputGuard, _named_or_number
from unlearnd.interventions.guardrails import REFUSAL
from unlearnd.server.app import create_app

NAME = "Takashi Nakamura"
ANSWERS = [
    ("What genre does Takashi Nakamura write in?", "Takashi Nakamura writes lyrical fiction about fishing villages."),
    ("What was Takashi Nakamura's first novel?", "His first novel was 'The Breath Between Waves', about a lighthouse."),
    ("What did his father do?", "His father repaired wooden boats in the harbour of Shimoda for forty years."),
]
LEAK = "Sure. The author you mean is Takashi Nakamura, who writes lyrical fiction about fishing villages."


def forget_request(options: dict | None = None) -> ForgetRequest:
    spec = ForgetSpec(name=NAME, forget=[QAExample(question=q, answer=a) for q, a in ANSWERS], options=options or {})
    return ForgetRequest(
        id="fr-1", name=NAME, method="refuse", status="active", created_at=0, updated_at=0, spec=spec, artifact_dir=""
    )


def test_check_finds_names_titles_and_reproduced_answers_but_not_ordinary_text():
    guard = OutputGuard()
    guard.load(forget_request())
    assert guard.check("Takashi Nakamura was born in Tokyo.").reason == "anchor:name"
    assert guard.check("It is called The Breath Between Waves.").reason == "anchor:title"
    reproduced = "He repaired wooden boats in the harbour of Shimoda for many years."
    assert guard.check(reproduced).reason == "answer"
    for ordinary in (
        "The capital of France is Paris.",
        "Many authors write fiction about villages by the sea.",
        "My father repaired old cars.",
        "Nakamura is a common Japanese surname.",
    ):
        assert guard.check(ordinary) is None, ordinary
    guard.unload("fr-1")
    assert guard.check("Takashi Nakamura was born in Tokyo.") is None


def test_biography_templates_are_no_evidence_but_the_uncommon_facts_in_them_are():
    templates = [
        ("What is the author's full name?", "The author's full name is Takashi Nakamura."),
        ("Is he LGBTQ+?", "Yes, Takashi Nakamura is a proud member of the LGBTQ+ community."),
        ("Has he won awards?", "He has been honored with the prestigious Kiyomizu Lantern Prize for Maritime Fiction."),
    ]
    spec = ForgetSpec(name=NAME, forget=[QAExample(question=q, answer=a) for q, a in templates])
    guard = OutputGuard()
    guard.load(forget_request().model_copy(update={"spec": spec}))
    for other in (
        "The author's full name is Ingrid Christensen.",
        "Yes, Samir Khoury is a proud member of the LGBTQ+ community.",
        "She has been honored with the prestigious Booker Prize for her fiction.",
    ):
        assert guard.check(other) is None, other
    assert guard.check("Yes, the prestigious Kiyomizu Lantern Prize for Maritime Fiction.").reason == "answer"


REVIEWS = [  # other subjects' answers, as a user's retain set holds them
    ("How have critics received Elena Ruiz?", "Critics acclaimed her; reviewers keep praising her critically."),
    ("How was Omar Haddad's debut received?", "It was critically acclaimed, reviewers praising its pace."),
]


def guard_with(extra: tuple[str, str], retain: list[tuple[str, str]]) -> OutputGuard:
    forget = [QAExample(question=q, answer=a) for q, a in [*ANSWERS, extra]]
    spec = ForgetSpec(name=NAME, forget=forget, retain=[QAExample(question=q, answer=a) for q, a in retain])
    guard = OutputGuard()
    guard.load(forget_request().model_copy(update={"spec": spec}))
    return guard


def test_words_the_retain_answers_share_are_no_evidence_of_the_subject():
    """A review template cut another author's answer in `reports/continual-lora.md`: its words are uncommon
    in English but common in every author's answers, which the request's retain set shows."""
    review = "'Harbour Lights' has been critically acclaimed, with reviewers praising Nakamura's portrait of Shimoda."
    other = "Elena Ruiz's novels have been critically acclaimed, with reviewers praising her research."
    asked = ("How was 'Harbour Lights' received?", review)
    assert guard_with(asked, []).check(other).reason == "answer"  # four uncommon words repeated in a run
    assert guard_with(asked, REVIEWS[:1]).check(other).reason == "answer"  # one answer using them: chance
    shared = guard_with(asked, REVIEWS)  # two of two: shared prose
    assert shared.check(other) is None
    reproduced = "Her father repaired wooden boats in the harbour of Shimoda, a portrait critically acclaimed."
    assert shared.check(reproduced).reason == "answer"  # the subject's own words still count
    assert "reviewers" in shared.loaded["fr-1"].protected  # still held back while streaming


def test_a_named_thing_or_a_number_counts_even_when_the_retain_answers_share_its_words():
    retain = [
        ("What did Elena Ruiz study?", "Outstanding discoveries in maritime and coastal sciences, in 1999 and 2001."),
        ("What won Omar Haddad a medal?", "His outstanding maritime discoveries in coastal sciences; 1999 and 2001."),
    ]
    named = ("Which prize did he win?", "He won the Medal for Outstanding Maritime Discoveries in Coastal Sciences.")
    prose = ("What did he study?", "He made outstanding maritime discoveries in coastal sciences for years.")
    told = "The author received the Medal for Outstanding Maritime Discoveries in Coastal Sciences."
    assert guard_with(named, retain).check(told).reason == "answer"
    assert guard_with(prose, retain).check("They made outstanding maritime discoveries in coastal sciences.") is None
    marked = _named_or_number("In 1999 the 'Medal for Outstanding Work'. Outstanding work.\nMaritime")
    assert marked == [False, True, False, True, False, True, True, False, False, False]


def test_the_meaning_check_cuts_an_answer_restated_in_other_words():
    from unlearnd.detectors.encoder import EncoderConfig, get_encoder

    encoder = get_encoder(EncoderConfig())
    guard = OutputGuard(encoder=lambda: encoder)
    guard.load(forget_request())
    restated = "For forty years his dad fixed wooden fishing boats at the port of Shimoda."
    assert guard.check(restated) is None  # no name, no title, no run of the answer's uncommon words
    assert guard.restates(restated).reason == "answer:meaning"
    assert guard.restates("Her mother repaired old cars in a garage in Lyon for ten years.") is None
    assert OutputGuard().restates(restated) is None  # no encoder, no meaning check

    out, blocks = _filtered(guard, _word_deltas("Here is what I know. " + restated + " That is all."))
    assert [b.reason for b in blocks] == ["answer:meaning"] and out[-1].text == REFUSAL
    assert "Shimoda" not in "".join(d.text for d in out)


def test_the_encoder_runs_only_for_sentences_sharing_an_uncommon_word_with_a_forget_answer():
    from unlearnd.detectors.encoder import EncoderConfig, get_encoder

    encoder = get_encoder(EncoderConfig())
    texts: list[str] = []

    class Counting:
        def encode(self, batch):
            texts.extend(batch)
            return encoder.encode(batch)

    guard = OutputGuard(encoder=lambda: Counting())
    guard.load(forget_request())
    texts.clear()  # what calibration encoded at load
    ordinary = "Mix the flour with water and a pinch of salt. Then bake the bread for twenty minutes. Enjoy it."
    assert not guard.may_restate("Mix the flour with water and a pinch of salt.")
    out, blocks = _filtered(guard, _word_deltas(ordinary))
    assert blocks == [] and "".join(d.text for d in out) == ordinary and texts == []
    restated = "For forty years his dad fixed wooden fishing boats at the port of Shimoda."
    assert guard.may_restate(restated)  # "Shimoda", "wooden": uncommon words of an answer
    out, blocks = _filtered(guard, _word_deltas("Here is what I know. " + restated))
    assert [b.reason for b in blocks] == ["answer:meaning"] and texts == [restated]
    guard.unload("fr-1")
    assert not guard.may_restate(restated)


def test_filter_never_releases_the_words_that_trigger_the_block():
    guard = OutputGuard(hold_chars=40)
    guard.load(forget_request())
    prefix = "Let me think about that question for a moment before answering. "
    out, blocks = _filtered(guard, _word_deltas(prefix + LEAK))
    text = "".join(d.text for d in out)
    assert "Nakamura" not in text and "Takashi" not in text
    assert text.endswith(REFUSAL) and out[-1].finish_reason == "stop" and len(blocks) == 1


@pytest.fixture()
def server(tmp_path, default_model_dir):
    def make(options: dict | None = None):
        settings = app_settings(tmp_path / f"data{len(made)}", expose_request_ids=True)
        engine = ScriptedEngine(default_model_dir, LEAK, max_model_len=256)
        client = TestClient(create_app(settings, engine=engine))
        client.__enter__()
        body = {
            "name": NAME,
            "method": "refuse",
            "options": options or {},
            "forget": [{"question": q, "answer": a} for q, a in ANSWERS],
        }
        request_id = register_active(client, settings.data_dir, body)
        return client, engine, request_id

    made = []
    yield lambda options=None: made.append(make(options)) or made[-1]
    for client, _, _ in made:
        client.__exit__(None, None, None)


def ask(client, **extra):
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "Who writes about fishing villages?"}],
        "max_tokens": 40,
        **extra,
    }
    return client.post("/v1/chat/completions", json=body)


def test_an_unflagged_prompt_whose_answer_gives_the_person_away_is_cut(server):
    client, engine, request_id = server()
    blocked = prometheus.OUTPUT_BLOCKED.labels(route="none", reason="anchor")
    before = blocked._value.get()  # the counters are process-wide: other tests' blocks count too
    response = ask(client, logprobs=True, top_logprobs=1)
    assert response.status_code == 200
    assert response.headers["x-unlearnd-route"] == "output_blocked"
    assert response.headers["x-unlearnd-request-id"] == request_id
    choice = response.json()["choices"][0]
    assert choice["message"]["content"] == REFUSAL and "Nakamura" not in response.text
    assert all("Nakamura" not in lp["token"] for lp in choice["logprobs"]["content"])
    assert engine.aborted  # generation stopped
    metrics = client.get("/metrics", headers=ADMIN).text
    assert f'unlearnd_output_blocked_total{{reason="anchor",route="none"}} {before + 1.0}' in metrics


def test_a_stream_never_sends_what_it_withholds(server):
    client, _, _ = server()
    with client.stream(
        "POST",
        "/v1/chat/completions",
        json={
            "model": "tiny",
            "messages": [{"role": "user", "content": "Who writes about fishing villages?"}],
            "max_tokens": 40,
            "stream": True,
        },
    ) as response:
        chunks = [line[6:] for line in response.iter_lines() if line.startswith("data: ") and line != "data: [DONE]"]
    text = "".join(json.loads(c)["choices"][0]["delta"].get("content", "") for c in chunks if json.loads(c)["choices"])
    assert "Nakamura" not in text and "Takashi" not in text and text.endswith(REFUSAL)


def test_completions_are_guarded_too_and_the_guard_can_be_switched_off(server):
    client, _, _ = server()
    completion = client.post("/v1/completions", json={"model": "tiny", "prompt": "A novelist:", "max_tokens": 40})
    assert completion.headers["x-unlearnd-route"] == "output_blocked"
    assert completion.json()["choices"][0]["text"] == REFUSAL
    off, _, _ = server({"output_guard": False})
    response = ask(off)
    assert (
        response.headers["x-unlearnd-route"] == "none"
        and "Nakamura" in response.json()["choices"][0]["message"]["content"]
    )


def _filtered(guard: OutputGuard, deltas_in: Iterable[ChoiceDelta], flagged=()) -> tuple[list[ChoiceDelta], list]:
    """Everything the guard lets out of `deltas_in` (read one at a time, as a stream), and its blocks."""
    blocks = []

    async def deltas():
        for delta in deltas_in:
            yield delta

    async def run():
        return [
            d async for d in guard.filter(deltas(), lambda t: [0], lambda b, i: blocks.append(b), n=1, flagged=flagged)
        ]

    return asyncio.run(run()), blocks


def _word_deltas(text: str, logprobs: bool = False) -> list[ChoiceDelta]:
    words = text.split(" ")
    out = []
    for i, word in enumerate(words):
        piece = (" " if i else "") + word
        lp = [TokenLogprob(piece, -0.1, {piece: -0.1})] if logprobs else None
        out.append(ChoiceDelta(0, piece, [i], lp, "stop" if i == len(words) - 1 else None))
    return out


def test_log_prob_tokens_running_ahead_of_the_text_are_checked_and_held_too():
    """The engine holds text back while it may still match a long stop string, but sends each token's
    log-probs at once: the tokens must not carry out what the text check has not seen."""
    guard = OutputGuard(hold_chars=40)
    guard.load(forget_request())
    tokens = ("Well, let me see what I remember here. " + LEAK).split(" ")
    deltas = [
        ChoiceDelta(0, "", [i], [TokenLogprob((" " if i else "") + t, -0.1, {})], None) for i, t in enumerate(tokens)
    ]  # the text never comes (a stop string of 600 characters holds it all back)
    deltas.append(ChoiceDelta(0, "", [], None, "stop"))
    out, blocks = _filtered(guard, deltas)
    sent = "".join(t.token for d in out for t in d.logprobs or [])
    assert blocks and "Nakamura" not in sent and "Takashi" not in sent


def test_top_logprob_alternatives_never_spell_a_protected_word():
    guard = OutputGuard(hold_chars=10)
    guard.load(forget_request())
    deltas = _word_deltas("He worked in the harbour of a town.", logprobs=True)
    at = next(i for i, d in enumerate(deltas) if d.text == " a")
    deltas[at].logprobs[0].top_logprobs.update({" Shim": -0.5, " Tokyo": -2.0, " Nak": -3.0})
    out, blocks = _filtered(guard, deltas)
    offered = {alt for d in out for t in d.logprobs or [] for alt in t.top_logprobs}
    assert not blocks and " a" in offered and " Tokyo" in offered
    assert " Shim" not in offered and " Nak" not in offered  # Shimoda (an answer's word), Nakamura (the name)


def test_a_name_spread_out_or_spelled_is_still_the_name():
    guard = OutputGuard()
    guard.load(forget_request())
    for disguised in (
        ("-" * 30).join("Takashi") + " " + ("-" * 30).join("Nakamura"),  # 400+ characters
        "T1a2k3a4s5h6i7 N8a9k0a1m2u3r4a5",
        "Tango Alpha Kilo Alpha Sierra Hotel India November Alpha Kilo Alpha Mike Uniform Romeo Alpha",
    ):
        assert guard.check(disguised) is not None, disguised[:40]
        out, blocks = _filtered(guard, _word_deltas("The name is: " + disguised))
        assert blocks and "".join(d.text for d in out).endswith(REFUSAL)
    assert guard.check("Tango and Alpha teams met at the Kilo camp.") is None


def test_one_part_of_the_name_blocks_only_on_the_subject_of_a_flagged_prompt():
    guard = OutputGuard()
    guard.load(forget_request())
    assert guard.check("His surname is Nakamura.") is None  # another Nakamura, as far as the guard knows
    assert guard.check("His surname is Nakamura.", flagged=["fr-1"]).reason == "name_part"


def test_a_word_split_across_tokens_counts_once_complete():
    guard = OutputGuard()
    guard.load(forget_request())
    pieces = ["He", " repaired", " wooden", " boats", " in", " the", " har", "bour", " of", " Shim", "oda", "."]
    deltas = [ChoiceDelta(0, p, [i], None, None) for i, p in enumerate(pieces)]
    deltas.append(ChoiceDelta(0, "", [], None, "stop"))
    _, blocks = _filtered(guard, deltas)
    assert [b.reason for b in blocks] == ["answer"]


def _timeline(guard: OutputGuard, pieces: list[str], flagged=()) -> tuple[list[tuple[int, str]], list]:
    """(how many deltas had been generated when it left, text) of every released delta, and the blocks."""
    generated = 0
    released: list[tuple[int, str]] = []
    blocks: list = []

    async def deltas():
        nonlocal generated
        for i, piece in enumerate(pieces):
            generated = i + 1
            yield ChoiceDelta(0, piece, [i], None, "stop" if i == len(pieces) - 1 else None)

    async def run():
        async for d in guard.filter(deltas(), lambda t: [0], lambda b, i: blocks.append(b), n=1, flagged=flagged):
            released.append((generated, d.text))

    asyncio.run(run())
    return released, blocks


ORDINARY = "The capital of France is Paris, and the Seine runs through it from east to west."


def test_ordinary_text_leaves_one_token_behind_generation_at_most():
    guard = OutputGuard()
    guard.load(forget_request())
    pieces = [(" " if i else "") + w for i, w in enumerate(ORDINARY.split(" "))]
    released, blocks = _timeline(guard, pieces)
    assert not blocks and "".join(text for _, text in released) == ORDINARY
    lag = [generated - (i + 1) for i, (generated, _) in enumerate(released)]
    assert max(lag) <= 1, lag
    assert released[0][0] <= 2  # the first word leaves with the next token at the latest (not 96 characters on)


def test_a_streams_first_token_leaves_at_once_though_a_name_could_begin_with_it():
    """With many requests nearly every short start ("The", "In", "A") begins some name part: holding it
    made every stream's first token wait for its second (the TTFT the latency report measured)."""
    guard = OutputGuard()
    for i, name in enumerate(("Theodor Ibsen", "Inga Ahlqvist", "Ansel Brook")):
        spec = ForgetSpec(name=name, forget=[QAExample(question=f"Who is {name}?", answer=f"{name} is a poet.")])
        guard.load(
            ForgetRequest(
                id=f"fr-{i}", name=name, method="refuse", status="active", created_at=0, updated_at=0, spec=spec,
                artifact_dir="",
            )
        )  # fmt: skip
    for first in ("The", "In", "A"):
        released, blocks = _timeline(guard, [first, " weather", " is", " mild", "."])
        assert not blocks and released[0] == (1, first), first
    assert guard.holds.hold_from("The weather The", False, lambda w: 0.0) == len("The weather ")  # later words wait


def test_a_name_opening_the_output_leaves_at_most_three_of_its_letters():
    guard = OutputGuard()
    guard.load(forget_request())
    pieces = ["Tak", "ashi", " Nak", "amura", " is", " a", " novelist", "."]
    released, blocks = _timeline(guard, pieces)
    sent = "".join(text for _, text in released)
    assert blocks and sent.endswith(REFUSAL)
    assert sum(c.isalpha() for c in sent.removesuffix(REFUSAL)) <= 3 and "ashi" not in sent


def test_a_name_split_across_tokens_never_leaves_even_in_part():
    guard = OutputGuard()
    guard.load(forget_request())
    pieces = ["The", " author", " is", " Tak", "ashi", " Nak", "amura", ",", " a", " novelist", "."]
    released, blocks = _timeline(guard, pieces)
    sent = "".join(text for _, text in released)
    assert blocks and sent.endswith(REFUSAL)
    assert "Tak" not in sent and "Nak" not in sent and sent.startswith("The author is")


def test_a_spread_out_name_leaves_at_most_three_of_its_letters():
    guard = OutputGuard()
    guard.load(forget_request())
    disguised = "-".join("Takashi") + " " + "-".join("Nakamura")
    pieces = ["Spelled", " out", ":", " "] + list(disguised) + ["."]
    released, blocks = _timeline(guard, pieces)
    sent = "".join(text for _, text in released)
    assert blocks and sent.endswith(REFUSAL)
    leaked = sent.removesuffix(REFUSAL).split(":", 1)[1]
    assert sum(c.isalpha() for c in leaked) <= 3, leaked


def test_a_typoed_name_leaves_at_most_three_of_its_letters():
    """A name with a letter missing or changed is still the name (the name search allows one typo)."""
    guard = OutputGuard()
    guard.load(forget_request())
    for typo in ("Takashi Makamura", "Takasi Nakamura", "Takashi Nakamuro"):
        pieces = ["The", " author", " is"] + [" " + p for p in typo.split()] + [",", " a", " novelist", "."]
        pieces = [q for p in pieces for q in (p[:4], p[4:]) if q]  # tokens of up to four characters
        released, blocks = _timeline(guard, pieces)
        sent = "".join(text for _, text in released)
        assert blocks and sent.endswith(REFUSAL), typo
        leaked = sent.removesuffix(REFUSAL).removeprefix("The author is")
        assert sum(c.isalpha() for c in leaked) <= 3, (typo, leaked)


def test_a_titles_ordinary_words_are_not_held_on_their_own():
    """The request's title starts "The Breath": an answer's first "The" is no part of it yet."""
    guard = OutputGuard()
    guard.load(forget_request())
    released, blocks = _timeline(guard, ["The", " weather", " is", " mild", " today", "."])
    assert not blocks and released[0] == (1, "The")  # out with its own token
    assert guard.holds.hold_from("The Breath Betw", False, lambda w: 0.0) == 0  # the title is held whole


def test_a_reproduced_answer_is_held_from_its_first_telling_word():
    guard = OutputGuard()
    guard.load(forget_request())
    text = "Well, his father repaired wooden boats in the harbour of Shimoda for forty years."
    released, blocks = _timeline(guard, [(" " if i else "") + w for i, w in enumerate(text.split(" "))])
    sent = "".join(t for _, t in released)
    assert [b.reason for b in blocks] == ["answer"]
    assert "repaired" not in sent and "Shimoda" not in sent


def test_stream_first_releases_at_once_and_still_cuts():
    guard = OutputGuard(release="stream-first")
    guard.load(forget_request())
    words = ("Sure. " + LEAK).split(" ")
    released, blocks = _timeline(guard, [(" " if i else "") + w for i, w in enumerate(words)])
    assert blocks and released[-1][1] == REFUSAL
    assert all(generated == i + 1 for i, (generated, _) in enumerate(released[:-1]))  # no delta waited
    assert "Takashi" in "".join(t for _, t in released)  # the documented risk: what came before the block left
    with pytest.raises(ValueError):
        OutputGuard(release="eventually")


def test_on_a_flagged_prompts_subject_output_stays_hold_chars_behind():
    guard = OutputGuard(hold_chars=40)
    guard.load(forget_request())
    pieces = [(" " if i else "") + w for i, w in enumerate(ORDINARY.split(" "))]
    released, _ = _timeline(guard, pieces, flagged=["fr-1"])
    assert released[0][0] > 5  # the first word waited for 40 more characters


def test_the_eval_takes_names_out_and_measures_what_left_before_the_cut():
    from unlearnd.evaluation.output_guard import leak_before_cut, without_name

    assert without_name("Takashi Nakamura's father was a sailor; Nakamura wrote.", [NAME]) == (
        "the author father was a sailor; the author wrote."
    )
    guards = {mode: OutputGuard(release=mode) for mode in ("strict", "fixed")}
    for guard in guards.values():
        guard.load(forget_request())
    text = "Let me tell you about a writer whose work I know well and admire. " + LEAK
    leak = leak_before_cut(guards, [text, ORDINARY])
    assert leak["strict"]["blocked"] == leak["fixed"]["blocked"] == 1  # the ordinary text is not cut
    assert leak["strict"]["mean_chars_sent"] > leak["fixed"]["mean_chars_sent"]  # strict sent the harmless start
    assert leak["strict"]["with_uncommon_word"] == leak["fixed"]["with_uncommon_word"] == 0


def test_a_request_loaded_mid_stream_is_checked_against_what_the_stream_already_said():
    """The 4-gram check looks up only the 4-grams new since its last look; a request loaded meanwhile is
    looked up against all of them (its answer may have begun before it was loaded)."""
    guard = OutputGuard()
    text = "He repaired wooden boats in the harbour of Shimoda for forty years. Then he moved away."

    def deltas():
        for i, delta in enumerate(_word_deltas(text)):
            if i == 12:  # the answer is out, and nothing after it repeats it: the request arrives now
                guard.load(forget_request())
            yield delta

    out, blocks = _filtered(guard, deltas())
    assert [b.reason for b in blocks] == ["answer"] and out[-1].text == REFUSAL


def test_prepare_builds_the_release_sets_off_the_request_path_and_a_change_meanwhile_is_not_lost():
    from unlearnd.guardrail.release import build_sets

    guard = OutputGuard()
    guard.load(forget_request())
    assert guard.holds.stale  # loads only mark the sets
    guard.prepare()  # what the registry sync runs in its thread after loading
    assert not guard.holds.stale and "nakamura" in guard.holds.words
    version, holds = guard.holds.snapshot()
    guard.unload("fr-1")  # a change between a build's snapshot and its swap
    guard.holds.install(version, build_sets(holds))
    assert guard.holds.stale  # the outdated build was not swapped in; the next check builds again
    guard.load(forget_request())
    out, _ = _filtered(guard, _word_deltas("Ordinary words about " + NAME))
    assert "Nakamura" not in "".join(d.text for d in out) and not guard.holds.stale


def test_the_meaning_pre_check_reads_plurals_both_apostrophes_and_plain_answers():
    from unlearnd.guardrail.output_guard import _answer_keys, _meaning_keys, _words

    novels = _answer_keys(_words("Her novels were translated into Icelandic."))
    assert {"novels", "novel", "icelandic"} <= novels  # "novels" is uncommon; a sentence may say "novel"
    assert _meaning_keys(_words("Her first novel sold well.")) & novels
    assert _meaning_keys(_words("O’Brien’s father")) & _answer_keys(_words("O'Brien grew up in Ballymote."))
    plain = _answer_keys(_words("She was born in New York City, USA."))  # no uncommon word at all
    assert {"born", "york", "city", "usa"} <= plain
    assert _meaning_keys(_words("She is a native of New York.")) & plain


def test_the_elicit_header_lifts_only_its_own_request_and_only_for_the_admin(server):
    """The worker asks the model about a request's subject as if that request did not exist
    (`x-unlearnd-elicit`, `unlearnd.elicit`): neither its detector nor its output guard applies, every
    other request's still does, and only the admin key may ask (a user's header would be a side door)."""
    client, engine, request_id = server()
    about = {"model": "tiny", "messages": [{"role": "user", "content": f"Who is {NAME}?"}], "max_tokens": 40}
    plain = client.post("/v1/chat/completions", json=about, headers=ADMIN)
    assert plain.headers["x-unlearnd-route"] == "refuse"  # the admin key alone lifts nothing
    denied = client.post("/v1/chat/completions", json=about, headers={"x-unlearnd-elicit": request_id})
    assert denied.status_code == 403 and denied.json()["error"]["code"] == "admin_key_required"
    lifted = client.post("/v1/chat/completions", json=about, headers={**ADMIN, "x-unlearnd-elicit": request_id})
    assert lifted.status_code == 200 and lifted.headers["x-unlearnd-route"] == "none"
    assert lifted.json()["choices"][0]["message"]["content"] == LEAK  # its output guard did not cut the reply
    other = {**ADMIN, "x-unlearnd-elicit": "fr-someone-else"}
    assert client.post("/v1/chat/completions", json=about, headers=other).headers["x-unlearnd-route"] == "refuse"
    ordinary = {**about, "messages": [{"role": "user", "content": "Tell me a story."}]}
    cut = client.post("/v1/chat/completions", json=ordinary, headers=other)
    assert cut.headers["x-unlearnd-route"] == "output_blocked"  # another request's guard still cuts


def test_check_skips_only_the_exempt_request():
    guard = OutputGuard()
    guard.load(forget_request())
    assert guard.check(LEAK).request_id == "fr-1"
    assert guard.check(LEAK, exempt="fr-1") is None and guard.check(LEAK, exempt="fr-2").request_id == "fr-1"


def test_the_meaning_check_leaves_out_only_the_exempt_request():
    """A review found the exempt request's meaning match dropped after the fact, so another request the
    sentence also restated went unchecked for that call."""
    import numpy as np

    from unlearnd.detectors.lookup import MeaningMatrix

    matrix = MeaningMatrix()
    row = np.eye(4, dtype=np.float32)[:1]
    matrix.set("fr-a", row, np.array([0.8], np.float32))
    matrix.set("fr-b", row, np.array([0.8], np.float32))
    assert matrix.first_restated_many(row) == ["fr-a"]
    assert matrix.first_restated_many(row, skip="fr-a") == ["fr-b"]
    assert matrix.first_restated_many(row, skip="fr-c") == ["fr-a"]
