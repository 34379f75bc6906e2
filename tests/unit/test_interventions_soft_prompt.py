"""SPUL soft prompts: shapes, the loss terms, that training lowers L_forget with the LLM frozen,
the artifact round trip and apply() on a tiny random Llama with the SmolLM2 tokenizer."""

from __future__ import annotations

import math

import pytest
import torch

from unlearnd.detectors.base import RequestMatch
from unlearnd.domain import ForgetSpec, QAExample
from unlearnd.engine.base import EmbeddingTable, SamplingSpec
from unlearnd.guardrail.call import GuardedCall
from unlearnd.interventions.base import PipelineContext
from unlearnd.interventions.soft_prompt import SoftPrompt, load_soft_prompt, with_soft_prompt
from unlearnd.registry import Registry
from unlearnd.train.data import collate, encode_qa, refusal_for
from unlearnd.train.soft_prompt import (
    SoftPromptModel,
    SPULMethod,
    kl_original_prompted,
    text_init,
)
from unlearnd.train.trainer import TrainConfig, Trainer

HIDDEN = 32


@pytest.fixture()
def tiny_llm(tiny_model_dir):
    from unlearnd.models import load_causal_lm

    model, _ = load_causal_lm(tiny_model_dir, frozen=True)
    return model


FORGET = [
    QAExample(question=f"Which city was Hina Ameen born in, version {i}?", answer=f"Karachi, {i}.") for i in range(6)
]
RETAIN = [QAExample(question=f"What colour is the sky on day {i}?", answer="Blue.") for i in range(6)]


def test_with_soft_prompt_prepends_in_the_engine_dtype():
    prompt = torch.randn(5, 8)
    embeds = torch.randn(7, 8).to(torch.bfloat16)
    out = with_soft_prompt(prompt, embeds)
    assert out.shape == (12, 8) and out.dtype == torch.bfloat16
    assert torch.equal(out[:5], prompt.to(torch.bfloat16)) and torch.equal(out[5:], embeds)
    with pytest.raises(ValueError):
        with_soft_prompt(torch.randn(5, 4), embeds)


def test_model_embeds_prepends_prompt_mask_and_ignored_labels(tiny_llm, tokenizer):
    init = torch.randn(3, HIDDEN)
    model = SoftPromptModel(tiny_llm, init)
    items = [
        encode_qa(tokenizer, "Who?", "Me.", 64, end_of_turn=True),
        encode_qa(tokenizer, "Who is it really?", "Someone.", 64, end_of_turn=True),
    ]
    batch = collate(items, 2)
    embeds, mask, labels = model.embeds(batch)
    b, length = batch["input_ids"].shape
    assert embeds.shape == (b, length + 3, HIDDEN)
    assert torch.equal(embeds[0, :3], init) and torch.equal(embeds[1, :3], init)
    assert torch.equal(mask[:, :3], torch.ones(b, 3, dtype=mask.dtype)) and torch.equal(
        mask[:, 3:], batch["attention_mask"]
    )
    assert (labels[:, :3] == -100).all() and torch.equal(labels[:, 3:], batch["labels"])
    plain = model.embeds(batch, with_prompt=False)
    assert plain[0].shape == (b, length, HIDDEN)


def test_kl_is_zero_for_identical_and_matches_hand_value():
    logits = torch.tensor([[0.0, 0.0]])
    assert float(kl_original_prompted(logits, logits)) == pytest.approx(0.0, abs=1e-7)
    q = torch.tensor([[math.log(0.9), math.log(0.1)]])
    # KL(0.5,0.5 || 0.9,0.1) = 0.5 ln(0.5/0.9) + 0.5 ln(0.5/0.1)
    assert float(kl_original_prompted(logits, q)) == pytest.approx(
        0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(5.0), rel=1e-5
    )


def test_text_init_cycles_the_instruction_embeddings(tiny_llm, tokenizer):
    ids = tokenizer.encode("Forget it", add_special_tokens=False)
    init = text_init(tiny_llm.get_input_embeddings(), tokenizer, "Forget it", len(ids) * 2 + 1)
    weight = tiny_llm.get_input_embeddings().weight
    assert init.shape == (len(ids) * 2 + 1, HIDDEN)
    assert torch.equal(init[0], weight[ids[0]]) and torch.equal(init[len(ids)], weight[ids[0]])


def test_training_lowers_forget_loss_and_leaves_the_llm_frozen(tiny_llm, tokenizer):
    forget = [encode_qa(tokenizer, qa.question, refusal_for(i), 64, end_of_turn=True) for i, qa in enumerate(FORGET)]
    retain = [encode_qa(tokenizer, qa.question, qa.answer, 64, end_of_turn=True) for qa in RETAIN]
    batch = {"forget": collate(forget, 2), "retain": collate(retain, 2)}
    model = SoftPromptModel(tiny_llm, torch.randn(4, HIDDEN, generator=torch.Generator().manual_seed(0)) * 0.2)
    method = SPULMethod(alpha=0.5, beta=0.5)
    frozen = {k: v.clone() for k, v in tiny_llm.state_dict().items()}
    with torch.no_grad():
        before = float(method.forget_loss(model, batch["forget"]))
        loss, logs = method.loss(model, batch)
    assert set(logs) == {"forget", "retain", "kl"}
    assert float(loss) == pytest.approx(logs["forget"] + 0.5 * logs["retain"] + 0.5 * logs["kl"], rel=1e-5)
    prompt0 = model.prompt.detach().clone()
    Trainer(method, TrainConfig(steps=15, learning_rate=0.05, progress=False)).fit(model, [batch])
    with torch.no_grad():
        after = float(method.forget_loss(model, batch["forget"]))
    assert after < before - 0.5
    assert not torch.equal(model.prompt.detach(), prompt0)
    assert all(torch.equal(v, tiny_llm.state_dict()[k]) for k, v in frozen.items())


def test_train_soft_prompt_job_and_serving(tmp_path, tiny_model_dir, tokenizer):
    from unlearnd.train.soft_prompt import train_soft_prompt

    registry = Registry(tmp_path / "data")
    record = registry.add(ForgetSpec(name="Hina Ameen", method="soft_prompt", forget=FORGET, retain=RETAIN))
    artifact_dir = registry.artifact_dir(record.id)
    summary = train_soft_prompt(
        record,
        artifact_dir,
        tiny_model_dir,
        progress=False,
        overrides={"n_tokens": 6, "steps": 12, "learning_rate": 0.05, "n_eval": 4, "n_samples": 1, "sample_tokens": 3},
    )
    assert summary["forget_loss_after"] < summary["forget_loss_before"]
    prompt, config = load_soft_prompt(artifact_dir)
    assert prompt.shape == (6, HIDDEN) and config.position == "start" and len(config.training["losses"]) == 12

    weight = torch.randn(len(tokenizer), HIDDEN).to(torch.bfloat16)
    ctx = PipelineContext(tokenizer=tokenizer, embeddings=EmbeddingTable(weight))
    intervention = SoftPrompt()
    intervention.load(record, artifact_dir)
    req = GuardedCall(
        id="q",
        kind="chat",
        sampling=SamplingSpec(),
        query_text="Who is Hina Ameen?",
        messages=[{"role": "user", "content": "Who is Hina Ameen?"}],
    )
    intervention.apply(req, RequestMatch(record.id, 1.0), ctx)
    rendered = tokenizer.apply_chat_template(req.messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer.encode(rendered, add_special_tokens=False)
    assert req.prompt_token_ids == ids
    assert req.prompt_embeds.shape == (6 + len(ids), HIDDEN) and req.prompt_embeds.dtype == torch.bfloat16
    assert torch.equal(req.prompt_embeds[:6], prompt.to(torch.bfloat16))
    assert torch.equal(req.prompt_embeds[6:], weight[torch.tensor(ids)])
