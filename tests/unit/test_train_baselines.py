"""Each finetuning baseline moves its objective the right way on a tiny random model in a few steps."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from transformers import LlamaForCausalLM

from tests.helpers import tiny_llama
from unlearnd.train import baselines as B
from unlearnd.train.data import IGNORE_INDEX, EncodedQA, collate
from unlearnd.train.objectives import OBJECTIVES, Finetune, mean_nll
from unlearnd.train.trainer import TrainConfig, Trainer

VOCAB = 64


def tiny_model(seed: int = 0) -> LlamaForCausalLM:
    return tiny_llama(VOCAB, seed, max_position_embeddings=64, pad_token_id=0, tie_word_embeddings=False).train()


def qa_batch(seed: int, n: int = 4, prompt: int = 4, answer: int = 6) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        p = torch.randint(3, VOCAB, (prompt,), generator=g).tolist()
        a = torch.randint(3, VOCAB, (answer,), generator=g).tolist()
        rows.append(EncodedQA("q", p, a))
    return collate(rows, pad_id=0)


FORGET = qa_batch(1)
RETAIN = qa_batch(2)
IDK = qa_batch(3)


@pytest.fixture(scope="module")
def memorised() -> LlamaForCausalLM:
    """A tiny 'target': finetuned until it knows both the forget and the retain batch (as TOFU's target)."""
    model = tiny_model()
    Trainer(Finetune(), TrainConfig(steps=40, learning_rate=1e-2, progress=False)).fit(model, [FORGET, RETAIN])
    assert nll(model, FORGET) < 1.0
    return model


@torch.no_grad()
def nll(model, batch) -> float:
    return float(mean_nll(model.eval(), batch))


def fit(method, model, batches, steps=8, lr=3e-3):
    return Trainer(method, TrainConfig(steps=steps, learning_rate=lr, progress=False)).fit(model, batches)


def test_all_baselines_are_registered():
    for name in (*B.BASELINES, "finetune"):
        assert name in OBJECTIVES


def test_finetune_lowers_nll():
    model = tiny_model()
    before = nll(model, FORGET)
    fit(Finetune(), model, [FORGET])
    assert nll(model, FORGET) < before - 0.5


def test_grad_ascent_raises_forget_nll():
    model = tiny_model()
    before = nll(model, FORGET)
    result = fit(B.GradAscent(), model, [{"forget": FORGET}])
    assert nll(model, FORGET) > before + 0.5
    assert result.losses[-1] < result.losses[0]  # the loss is -NLL: it goes down as NLL goes up


@pytest.mark.parametrize("method", [B.GradDiff(), B.NPO(beta=0.1), B.SimNPO()], ids=["grad_diff", "npo", "simnpo"])
def test_retain_methods_raise_forget_nll_more_than_retain(method, memorised):
    model = copy.deepcopy(memorised)
    f0, r0 = nll(model, FORGET), nll(model, RETAIN)
    fit(method, model, [{"forget": FORGET, "retain": RETAIN}], steps=10)
    df, dr = nll(model, FORGET) - f0, nll(model, RETAIN) - r0
    assert df > 0.3
    assert df > dr


def test_npo_loss_matches_closed_form():
    nll_t = torch.tensor([3.0, 1.0])
    ref_t = torch.tensor([2.0, 2.0])
    beta = 0.1
    # log ratio log(pi/pi_ref) = -(nll - ref) = [-1, 1]; loss = -(2/beta) mean log sigmoid(-beta * ratio)
    expected = -(2 / beta) * (math.log(1 / (1 + math.exp(-0.1))) + math.log(1 / (1 + math.exp(0.1)))) / 2
    assert float(B.npo_loss(nll_t, ref_t, beta)) == pytest.approx(expected, rel=1e-6)
    # SimNPO: -(2/beta) log sigmoid(beta * (nll/len - delta))
    got = float(B.simnpo_loss(torch.tensor([6.0]), torch.tensor([3]), beta=2.0, delta=1.0))
    assert got == pytest.approx(-(2 / 2.0) * math.log(1 / (1 + math.exp(-2.0 * (2.0 - 1.0)))), rel=1e-6)


def test_npo_reference_is_the_frozen_start():
    model = tiny_model()
    method = B.NPO()
    fit(method, model, [{"forget": FORGET, "retain": RETAIN}], steps=3)
    start = tiny_model()
    for p_ref, p_start in zip(method.ref.parameters(), start.parameters()):
        assert torch.equal(p_ref, p_start)
        assert not p_ref.requires_grad


def test_idk_dpo_prefers_idk_over_forget_answer(memorised):
    model = copy.deepcopy(memorised)

    def margin(m) -> float:
        with torch.no_grad():
            win, _ = B.sequence_nll(m.eval(), IDK)
            lose, _ = B.sequence_nll(m.eval(), FORGET)
        return float((lose - win).mean())  # log p(idk) - log p(forget)

    before = margin(model)
    fit(B.IdkDPO(), model, [{"forget": FORGET, "idk": IDK, "retain": RETAIN}], steps=10)
    assert margin(model) > before + 1.0


def test_rmu_steers_forget_activations_and_trains_only_down_proj():
    model = tiny_model()
    start = copy.deepcopy(model)
    method = B.RMU(layer=1, steering_coeff=5.0, alpha=0.1)
    mask = FORGET["labels"] != IGNORE_INDEX

    method.setup(copy.deepcopy(model))  # same seed -> same control vector as the run below
    control = method.control.clone()
    with torch.no_grad():
        before = float(B.masked_activation_mse(B.layer_activations(model, FORGET, 1), control, mask))
    fit(B.RMU(layer=1, steering_coeff=5.0, alpha=0.1), model, [{"forget": FORGET, "retain": RETAIN}], steps=20, lr=3e-2)
    with torch.no_grad():
        after = float(B.masked_activation_mse(B.layer_activations(model, FORGET, 1), control, mask))
    assert after < before * 0.7
    changed = {n for (n, p), (_, q) in zip(model.named_parameters(), start.named_parameters()) if not torch.equal(p, q)}
    assert changed == {"model.layers.0.mlp.down_proj.weight", "model.layers.1.mlp.down_proj.weight"}


def test_rmu_retain_term_is_zero_at_start():
    model = tiny_model()
    method = B.RMU(layer=1, steering_coeff=5.0, alpha=1.0)
    method.setup(model)
    _, logs = method.loss(model, {"forget": FORGET, "retain": RETAIN})
    assert logs["retain"] == pytest.approx(0.0, abs=1e-10)
    assert logs["forget"] > 0


def test_idk_answers_are_deterministic_and_varied():
    a = B.IdkDPO.idk_answers(50, seed=1)
    assert a == B.IdkDPO.idk_answers(50, seed=1)
    assert len(set(a)) > 5 and all(x in B.IDK_ANSWERS for x in a)


def test_unknown_options_are_rejected():
    with pytest.raises(TypeError):
        B.GradDiff(bogus=1)
    with pytest.raises(ValueError):
        B.GradDiff(retain_loss="L2")


def test_sequence_nll_equals_the_model_loss():
    model = tiny_model().eval()
    with torch.no_grad():
        total, counts = B.sequence_nll(model, FORGET)
        hf = model(**FORGET).loss  # HF: mean over labelled tokens
    assert counts.tolist() == [6, 6, 6, 6]
    assert float(total.sum() / counts.sum()) == pytest.approx(float(hf), rel=1e-5)
