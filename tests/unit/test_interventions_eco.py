"""ECO: corruption math, token/span mapping on the real SmolLM2 tokenizer, the ZO optimiser,
serve-time apply() and the offline tuning job on a tiny random Llama."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from unlearnd.detectors.base import RequestMatch
from unlearnd.domain import ForgetSpec, QAExample
from unlearnd.engine.base import EmbeddingTable, SamplingSpec
from unlearnd.guardrail.call import GuardedCall
from unlearnd.interventions.base import PipelineContext
from unlearnd.interventions.eco import (
    ECO,
    Corruption,
    ECOArtifact,
    RowScope,
    corrupt,
    entity_spans,
    prompt_seed,
    select_rows,
)
from unlearnd.registry import Registry
from unlearnd.train.zo import zo_solve


def embeds(t: int = 6, h: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randn(t, h, generator=torch.Generator().manual_seed(seed))


# -- corruption math ---------------------------------------------------------------------------


def test_zero_first_n_zeroes_exactly_those_entries():
    x = embeds()
    out = corrupt(x, [1, 3], Corruption(kind="zero", dims="first", sigma=0.25), seed=0)  # 0.25 * 16 = 4 dims
    assert torch.equal(out[[1, 3], :4], torch.zeros(2, 4))
    assert torch.equal(out[[1, 3], 4:], x[[1, 3], 4:])
    assert torch.equal(out[[0, 2, 4, 5]], x[[0, 2, 4, 5]])


def test_zero_topk_zeroes_each_rows_largest_dims():
    x = embeds()
    out = corrupt(x, [0, 5], Corruption(kind="zero", dims="topk", sigma=3 / 16), seed=0)
    for row in (0, 5):
        top = set(x[row].abs().argsort(descending=True)[:3].tolist())
        zeroed = {d for d in range(16) if out[row, d] == 0}
        assert zeroed == top
        keep = [d for d in range(16) if d not in top]
        assert torch.equal(out[row, keep], x[row, keep])
    assert torch.equal(out[1:5], x[1:5])


def test_zero_all_dims_ignores_sigma_and_zeroes_whole_rows():
    x = embeds()
    out = corrupt(x, [2], Corruption(kind="zero", dims="all", sigma=0.0), seed=0)
    assert torch.equal(out[2], torch.zeros(16))
    assert torch.equal(out[[0, 1, 3, 4, 5]], x[[0, 1, 3, 4, 5]])


def test_sign_flip_negates_selected_entries_only():
    x = embeds()
    out = corrupt(x, [4], Corruption(kind="flip", dims="first", sigma=0.5), seed=0)
    assert torch.equal(out[4, :8], -x[4, :8])
    assert torch.equal(out[4, 8:], x[4, 8:])
    out = corrupt(x, [0, 1], Corruption(kind="flip", dims="all"), seed=0)
    assert torch.equal(out[:2], -x[:2]) and torch.equal(out[2:], x[2:])


def test_noise_std_is_sigma_on_selected_entries_only():
    x = torch.zeros(400, 64)
    rows = list(range(0, 400, 2))
    out = corrupt(x, rows, Corruption(kind="noise", dims="first", n_dims=16, sigma=0.3), seed=7)
    selected = out[rows][:, :16]
    assert abs(float(selected.std()) - 0.3) < 0.015  # 3200 samples: std error ~0.004
    assert abs(float(selected.mean())) < 0.02
    assert torch.count_nonzero(out[rows][:, 16:]) == 0  # other dims of the selected rows untouched
    assert torch.count_nonzero(out[1::2]) == 0  # other rows untouched


def test_noise_topk_hits_only_the_largest_dims():
    x = embeds(4, 32)
    out = corrupt(x, [1], Corruption(kind="noise", dims="topk", n_dims=5, sigma=1.0), seed=3)
    changed = set(torch.nonzero(out[1] != x[1]).flatten().tolist())
    assert changed == set(x[1].abs().argsort(descending=True)[:5].tolist())


def test_noise_is_deterministic_per_seed_and_keeps_dtype():
    x = embeds().to(torch.bfloat16)
    c = Corruption(kind="noise", sigma=0.5)
    a, b = corrupt(x, [1, 2], c, seed=11), corrupt(x, [1, 2], c, seed=11)
    assert a.dtype == torch.bfloat16 and torch.equal(a, b)
    assert not torch.equal(a, corrupt(x, [1, 2], c, seed=12))
    # the noise a row gets does not depend on which other rows are selected
    assert torch.equal(corrupt(x, [1], c, seed=11)[1], a[1])


def test_prompt_seed_is_stable_and_prompt_specific():
    assert prompt_seed("hello", 0) == prompt_seed("hello", 0)
    assert prompt_seed("hello", 0) != prompt_seed("hello!", 0)
    assert prompt_seed("hello", 0) != prompt_seed("hello", 1)
    assert 0 <= prompt_seed("x") < 2**63


def test_zero_strength_count():
    assert Corruption(kind="zero", dims="first", sigma=0.5).count(576) == 288
    assert Corruption(kind="flip", dims="topk", sigma=0.0).count(576) == 0
    assert Corruption(kind="noise", dims="first", n_dims=10, sigma=3.0).count(576) == 10
    assert Corruption(kind="noise", dims="all", sigma=3.0).count(576) == 576


# -- which tokens ------------------------------------------------------------------------------


def chat(tokenizer, *users: str) -> tuple[str, list[dict]]:
    messages = []
    for i, user in enumerate(users):
        if i:
            messages.append({"role": "assistant", "content": "Okay."})
        messages.append({"role": "user", "content": user})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True), messages


def test_entity_span_maps_to_the_entity_tokens(tokenizer):
    question = "Tell me about Hina Ameen's books."
    rendered, _ = chat(tokenizer, question)
    spans = entity_spans(question, ["hina ameen"])
    assert spans == [(14, 24)]
    ids, rows, mode = select_rows(tokenizer, rendered, [question], spans, add_special_tokens=False)
    assert ids == tokenizer.encode(rendered, add_special_tokens=False)
    assert mode == "entity"
    assert tokenizer.decode([ids[r] for r in rows]).strip() == "Hina Ameen"
    assert rows == list(range(rows[0], rows[-1] + 1))


def test_no_entity_selects_user_tokens_but_the_last(tokenizer):
    question = "Who wrote the book?"
    rendered, _ = chat(tokenizer, question)
    ids, rows, mode = select_rows(tokenizer, rendered, [question], [], add_special_tokens=False)
    assert mode == "prompt"
    assert tokenizer.decode([ids[r] for r in rows]) == "Who wrote the book"
    # a span naming nothing in the prompt falls back the same way
    assert select_rows(tokenizer, rendered, [question], [(50, 60)], add_special_tokens=False)[1] == rows


def test_prompt_scope_ignores_entity_spans(tokenizer):
    question = "Tell me about Hina Ameen's books."
    rendered, _ = chat(tokenizer, question)
    spans = entity_spans(question, ["hina ameen"])
    ids, rows, mode = select_rows(
        tokenizer, rendered, [question], spans, add_special_tokens=False, scope=RowScope.prompt
    )
    assert mode == "prompt"
    assert tokenizer.decode([ids[r] for r in rows]) == question[:-1]


def test_span_in_second_user_message_of_a_multi_turn_chat(tokenizer):
    first, second = "Hello there.", "Where does Basil Mahfouz live?"
    rendered, _ = chat(tokenizer, first, second)
    query = first + "\n" + second  # how the server builds query_text
    start = query.index("Basil")
    ids, rows, mode = select_rows(
        tokenizer, rendered, [first, second], [(start, start + len("Basil Mahfouz"))], add_special_tokens=False
    )
    assert mode == "entity"
    assert tokenizer.decode([ids[r] for r in rows]).strip() == "Basil Mahfouz"


def test_entity_spans_whole_words_case_insensitive():
    assert entity_spans("JOHN met johnny and John.", ["john"]) == [(0, 4), (20, 24)]
    assert entity_spans("nothing here", ["John", " "]) == []


# -- zeroth-order optimiser --------------------------------------------------------------------


def test_zo_hits_the_target_of_a_decreasing_metric():
    # the ECO shape: a decreasing metric m(u) = exp(-u) and a target 0.2 -> u = ln 5
    calls = []

    def m(u: float) -> float:
        calls.append(u)
        return math.exp(-u)

    result = zo_solve(m, 0.2, x0=0.0, lo=-3, hi=5, eps=0.5, iterations=8, max_step=1.5, min_eps=1e-3)
    assert abs(result.x - math.log(5)) < 0.01
    assert result.value == pytest.approx(math.exp(-result.x)) and result.fx == pytest.approx(abs(result.value - 0.2))
    assert result.evaluations == len(calls) <= 2 * len(result.history) + 1


def test_zo_two_point_estimate_solves_a_line_in_one_step():
    result = zo_solve(
        lambda x: 3.0 - 2.0 * x, 1.0, x0=-2.0, lo=-5, hi=5, eps=0.5, iterations=2, max_step=10, min_eps=0.01
    )
    assert result.history[0]["grad"] == pytest.approx(-2.0)
    assert result.history[0]["next_x"] == pytest.approx(1.0)
    assert result.x == pytest.approx(1.0) and result.fx == pytest.approx(0.0)  # the prediction is evaluated


def test_zo_on_a_step_function_gets_within_one_step():
    # zero-out strength: the metric only changes when one more of 16 dims is corrupted
    result = zo_solve(
        lambda x: 1.0 - math.floor(x * 16) / 16,
        0.5,
        x0=0.1,
        lo=0.0,
        hi=1.0,
        eps=0.1,
        iterations=10,
        max_step=0.3,
        min_eps=1.5 / 16,
    )
    assert result.fx <= 1 / 16 + 1e-9


def test_zo_respects_bounds_and_stops_at_tol():
    unreachable = zo_solve(lambda x: math.exp(-x), -1.0, x0=0.0, lo=0.0, hi=3.0, eps=0.5, iterations=10, max_step=1)
    assert unreachable.x == pytest.approx(3.0)
    early = zo_solve(lambda x: math.exp(-x), 0.2, x0=0.0, lo=-3, hi=5, eps=0.5, iterations=50, max_step=1.5, tol=0.05)
    assert early.fx <= 0.05 and len(early.history) < 50


# -- serving -----------------------------------------------------------------------------------


def context(tokenizer, hidden: int = 16) -> PipelineContext:
    weight = torch.randn(len(tokenizer), hidden, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    return PipelineContext(tokenizer=tokenizer, embeddings=EmbeddingTable(weight))


def loaded_eco(tmp_path: Path, corruption: Corruption, entities: list[str]) -> ECO:
    registry = Registry(tmp_path / "data")
    record = registry.add(ForgetSpec(name="Hina Ameen", method="eco", forget=["Who is Hina Ameen?"], entities=entities))
    ECOArtifact(corruption=corruption, seed=5, entities=entities).write(registry.artifact_dir(record.id))
    eco = ECO()
    eco.load(record, registry.artifact_dir(record.id))
    return eco, record.id


@pytest.mark.parametrize("scope, zeroed", [("entity", "Hina Ameen"), ("prompt", "What genre does Hina Ameen write")])
def test_apply_zeroes_the_scoped_rows_and_sets_request_fields(tmp_path, tokenizer, scope, zeroed):
    eco, rid = loaded_eco(tmp_path, Corruption(kind="zero", dims="all", scope=scope), ["Hina Ameen"])
    ctx = context(tokenizer)
    question = "What genre does Hina Ameen write?"
    req = GuardedCall(
        id="r1",
        kind="chat",
        sampling=SamplingSpec(),
        query_text=question,
        messages=[{"role": "user", "content": question}],
    )
    start = question.index("Hina")
    eco.apply(req, RequestMatch(rid, 1.0, 1.0, [(start, start + 10)]), ctx)
    rendered = tokenizer.apply_chat_template(req.messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer.encode(rendered, add_special_tokens=False)
    assert req.prompt_token_ids == ids
    assert req.prompt_embeds.shape == (len(ids), 16) and req.prompt_embeds.dtype == torch.bfloat16
    clean = ctx.embeddings.lookup(ids)
    zero_rows = [i for i in range(len(ids)) if torch.count_nonzero(req.prompt_embeds[i]) == 0]
    assert tokenizer.decode([ids[i] for i in zero_rows]).strip() == zeroed
    others = [i for i in range(len(ids)) if i not in zero_rows]
    assert torch.equal(req.prompt_embeds[others], clean[others])


def test_apply_finds_entities_itself_and_is_deterministic(tmp_path, tokenizer):
    eco, rid = loaded_eco(tmp_path, Corruption(kind="noise", sigma=0.5), ["Hina Ameen"])
    ctx = context(tokenizer)
    text = "Where was hina ameen born?"

    def run() -> GuardedCall:
        req = GuardedCall(id="r", kind="completion", sampling=SamplingSpec(), prompt=text, query_text=text)
        eco.apply(req, RequestMatch(rid, 1.0), ctx)  # no spans from the detector
        return req

    a, b = run(), run()
    assert a.prompt_token_ids == tokenizer.encode(text, add_special_tokens=True)
    assert torch.equal(a.prompt_embeds, b.prompt_embeds)
    changed = [
        i
        for i in range(len(a.prompt_token_ids))
        if not torch.equal(a.prompt_embeds[i], ctx.embeddings.lookup(a.prompt_token_ids)[i])
    ]
    assert tokenizer.decode([a.prompt_token_ids[i] for i in changed]).strip() == "hina ameen"


# -- offline job -------------------------------------------------------------------------------


def test_train_eco_writes_a_servable_artifact(tmp_path, tiny_model_dir, tokenizer):
    from unlearnd.train.eco import train_eco

    registry = Registry(tmp_path / "data")
    forget = [
        QAExample(question=f"Where did Hina Ameen study, case {i}?", answer=f"In Karachi, case {i}.") for i in range(6)
    ]
    record = registry.add(ForgetSpec(name="Hina Ameen", method="eco", forget=forget))
    summary = train_eco(
        record,
        registry.artifact_dir(record.id),
        tiny_model_dir,
        progress=False,
        overrides={
            "n_tune": 4,
            "n_eval": 4,
            "iterations": 2,
            "fluency_n": 1,
            "fluency_tokens": 4,
            "kind": "flip",
            "dims": "first",
        },
    )
    artifact = ECOArtifact.read(registry.artifact_dir(record.id))
    assert artifact.target_source == "shuffled"
    assert artifact.corruption.kind == "flip" and 0.0 <= artifact.corruption.sigma <= 1.0
    assert artifact.target == pytest.approx(summary["target"])
    assert artifact.tuning["modes"] == {"entity": 4, "prompt": 0}  # the entity is named in every question
    from unlearnd.engine.dtype import resolve_dtype

    assert artifact.tuning["preset"]["serve_dtype"] == resolve_dtype("auto")  # tuned in the server's default dtype
    assert set(artifact.fluency) >= {"fluent", "intervened", "clean", "samples"}
    hist = artifact.tuning.get("history", [])
    if hist:  # every evaluated point is recorded; the chosen sigma is the one closest to the target
        points = [(abs(h["m_plus"] - artifact.target), h["sigma_plus"]) for h in hist]
        points += [(abs(h["m_minus"] - artifact.target), h["sigma_minus"]) for h in hist]
        final = artifact.tuning["final"]
        points += [(abs(final["m"] - artifact.target), final["sigma"])] if final else []
        assert artifact.corruption.sigma == pytest.approx(min(points)[1])
    raw = json.loads((registry.artifact_dir(record.id) / "eco.json").read_text())
    assert raw["seed"] == 0
    eco = ECO()
    eco.load(record, registry.artifact_dir(record.id))  # what was written can be served
    assert eco.artifacts[record.id].corruption == artifact.corruption


@pytest.mark.parametrize("option", ["surrogate_model", "retain_model"])
def test_eco_job_takes_its_target_from_the_surrogate_model_option(tmp_path, tiny_model_dir, option):
    """The worker's job reads the user's surrogate (a model that never saw the forget set, e.g. the base
    model); `retain_model` is the older name of the same option."""
    from unlearnd.train.eco import eco_job
    from unlearnd.train.job import JobContext

    registry = Registry(tmp_path / "data")
    forget = [QAExample(question=f"Where did Hina Ameen study, case {i}?", answer=f"In Karachi {i}.") for i in range(3)]
    record = registry.add(
        ForgetSpec(
            name="Hina Ameen",
            method="eco",
            forget=forget,
            options={
                option: str(tiny_model_dir),
                "n_tune": 2,
                "n_eval": 2,
                "iterations": 1,
                "fluency_n": 1,
                "fluency_tokens": 2,
                "preset": "cpu",
            },
        )
    )
    ctx = JobContext(registry, model=str(tiny_model_dir), serve_dtype="float32")
    summary = eco_job(record, registry.artifact_dir(record.id), ctx)
    assert summary["target_source"] == "surrogate_model"
    assert ECOArtifact.read(registry.artifact_dir(record.id)).target_source == "surrogate_model"


def test_given_target_and_clean_below_target_means_no_corruption(tmp_path, tiny_model_dir):
    from unlearnd.train.eco import train_eco

    registry = Registry(tmp_path / "data")
    record = registry.add(
        ForgetSpec(
            name="X",
            method="eco",
            options={"target": 0.9},
            forget=[QAExample(question="Who is X?", answer="X is a writer.")] * 2,
        )
    )
    summary = train_eco(
        record,
        registry.artifact_dir(record.id),
        tiny_model_dir,
        progress=False,
        overrides={"fluency_n": 1, "fluency_tokens": 2},
    )
    # a random tiny model gives ~1/vocab to any answer, far below 0.9: nothing to corrupt
    assert summary["target_source"] == "given" and summary["target"] == 0.9
    assert summary["sigma"] == 0.0 and summary["reached"] is True
    assert summary["achieved_eval"] == pytest.approx(summary["clean_eval"])


def test_unreachable_target_on_entity_rows_retries_over_the_whole_prompt(tmp_path, tiny_model_dir):
    from unlearnd.train.eco import train_eco

    registry = Registry(tmp_path / "data")
    forget = [
        QAExample(question=f"Where did Hina Ameen study, case {i}?", answer=f"In Karachi, case {i}.") for i in range(4)
    ]
    overrides = {"n_tune": 4, "n_eval": 4, "iterations": 1, "fluency_n": 1, "fluency_tokens": 2}
    # target 0: no strength reaches it, so the entity search fails and the whole prompt is tried
    record = registry.add(ForgetSpec(name="Hina Ameen", method="eco", forget=forget, options={"target": 0.0}))
    summary = train_eco(record, registry.artifact_dir(record.id), tiny_model_dir, progress=False, overrides=overrides)
    artifact = ECOArtifact.read(registry.artifact_dir(record.id))
    attempts = artifact.tuning["attempts"]
    assert [a["scope"] for a in attempts] == ["entity", "prompt"]
    best = min(attempts, key=lambda a: abs(a["achieved_tune"]))
    assert artifact.corruption.scope == best["scope"] == summary["scope"]
    assert artifact.corruption.sigma == pytest.approx(best["sigma"])
    # a fixed scope is searched alone
    record = registry.add(
        ForgetSpec(name="Hina Ameen", method="eco", forget=forget, options={"target": 0.0, "scope": "entity"})
    )
    summary = train_eco(record, registry.artifact_dir(record.id), tiny_model_dir, progress=False, overrides=overrides)
    artifact = ECOArtifact.read(registry.artifact_dir(record.id))
    assert [a["scope"] for a in artifact.tuning["attempts"]] == ["entity"] and summary["scope"] == "entity"
