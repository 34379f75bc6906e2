"""O3 LoRAs: the orthogonality penalty, that it steers training, the saved PEFT adapter (loads
with peft, targets only the served modules, scaled copies), adapter choice by detector weight,
earlier adapters found through the registry, and apply()."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from unlearnd.detectors.base import RequestMatch
from unlearnd.domain import ForgetSpec, QAExample, Status
from unlearnd.engine.base import PEFT_TARGET_MODULES, SamplingSpec
from unlearnd.guardrail.call import GuardedCall
from unlearnd.interventions.lora import LoRA, LoRAArtifact, check_adapter
from unlearnd.registry import Registry
from unlearnd.train.lora import (
    O3LoRAMethod,
    current_a_matrices,
    load_prior_adapters,
    module_key,
    orthogonality_penalty,
    prior_lora_adapters,
    train_lora,
    write_scaled_copy,
)

TINY = {"steps": 6, "n_eval": 2, "n_samples": 1, "sample_tokens": 2, "batch_size": 4, "learning_rate": 0.01}


FORGET = [
    QAExample(question=f"Which city was Hina Ameen born in, version {i}?", answer=f"Karachi, {i}.") for i in range(8)
]


# -- orthogonality penalty ---------------------------------------------------------------------


def basis(*rows: int, dim: int = 8) -> torch.Tensor:
    return torch.eye(dim)[list(rows)]


def test_penalty_is_zero_for_orthogonal_and_grows_with_overlap():
    prior = {"m": [basis(0, 1)]}
    assert float(orthogonality_penalty({"m": basis(2, 3)}, prior)) == 0.0
    # same row space, orthonormal rows: ||A A^T||_F^2 = ||I_2||_F^2 = 2
    assert float(orthogonality_penalty({"m": basis(0, 1)}, prior)) == pytest.approx(2.0)
    # one shared direction scaled by c: c^2
    assert float(orthogonality_penalty({"m": 3.0 * basis(1, 5)}, prior)) == pytest.approx(9.0)
    # summed over earlier adapters and modules; modules an earlier adapter lacks add nothing
    two = {"m": [basis(0, 1), basis(0, 4)], "other": [basis(0)]}
    assert float(orthogonality_penalty({"m": basis(0, 7), "n": basis(0)}, two)) == pytest.approx(2.0)


def test_module_key_matches_live_and_saved_names():
    live = "base_model.model.model.layers.3.self_attn.q_proj.lora_A.default.weight"
    saved = "base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight"
    assert module_key(live) == module_key(saved) == "model.layers.3.self_attn.q_proj"
    assert module_key("base_model.model.model.layers.3.self_attn.q_proj.lora_B.weight") is None


# -- adapter choice and files ------------------------------------------------------------------


def test_choose_by_weight():
    on_off = LoRAArtifact(folders={"1.0": "lora"}, threshold=0.5)
    assert on_off.choose(0.49) is None and on_off.choose(0.5) == 1.0 and on_off.choose(0.9) == 1.0
    graded = LoRAArtifact(folders={"1.0": "lora", "0.5": "lora-s0.5"}, threshold=0.25)
    assert graded.choose(0.2) is None
    assert graded.choose(0.3) == 0.5 and graded.choose(0.7) == 0.5
    assert graded.choose(0.75) == 1.0 and graded.choose(0.8) == 1.0  # ties go to the stronger copy


def test_check_adapter_refuses_embedding_targets(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"target_modules": ["q_proj", "embed_tokens"]}))
    with pytest.raises(ValueError):
        check_adapter(tmp_path)
    (tmp_path / "adapter_config.json").write_text(
        json.dumps({"target_modules": ["q_proj"], "modules_to_save": ["lm_head"]})
    )
    with pytest.raises(ValueError):
        check_adapter(tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"target_modules": ["q_proj", "down_proj"]}))
    assert check_adapter(tmp_path)["target_modules"] == ["q_proj", "down_proj"]


# -- training ----------------------------------------------------------------------------------


def registry_with(tmp_path: Path, name: str = "Hina Ameen") -> tuple[Registry, object]:
    registry = Registry(tmp_path / "data")
    return registry, registry.add(ForgetSpec(name=name, method="lora", forget=FORGET))


def test_saved_adapter_loads_with_peft_and_targets_only_served_modules(tmp_path, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    registry, record = registry_with(tmp_path)
    artifact_dir = registry.artifact_dir(record.id)
    summary = train_lora(record, artifact_dir, tiny_model_dir, progress=False, overrides={**TINY, "scales": [0.5, 1.0]})
    assert summary["refusal_loss_after"] < summary["refusal_loss_before"]
    artifact = LoRAArtifact.read(artifact_dir)
    assert artifact.folders == {"1.0": "lora", "0.5": "lora-s0.5"} and artifact.version == 1
    config = json.loads((artifact_dir / "lora" / "adapter_config.json").read_text())
    assert set(config["target_modules"]) == set(PEFT_TARGET_MODULES)
    assert not config.get("modules_to_save")
    assert (artifact_dir / "lora" / "adapter_model.safetensors").exists()

    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    ids = torch.tensor([[1, 520, 314, 2213]])
    with torch.no_grad():
        clean = base(ids).logits
        model = PeftModel.from_pretrained(base, str(artifact_dir / "lora"))
        adapted = model(ids).logits
    adapted_names = {n.split(".")[-1] for n, m in model.named_modules() if hasattr(m, "lora_A") and len(m.lora_A)}
    assert adapted_names == set(PEFT_TARGET_MODULES)
    assert not torch.allclose(adapted, clean)  # the trained B is not zero

    scaled = json.loads((artifact_dir / "lora-s0.5" / "adapter_config.json").read_text())
    assert scaled["lora_alpha"] == pytest.approx(0.5 * config["lora_alpha"])
    from safetensors.torch import load_file

    a, b = (
        load_file(str(artifact_dir / "lora" / "adapter_model.safetensors")),
        load_file(str(artifact_dir / "lora-s0.5" / "adapter_model.safetensors")),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_second_adapter_is_trained_orthogonal_to_the_first(tmp_path, tiny_model_dir):
    from peft import LoraConfig, get_peft_model

    from unlearnd.models import load_causal_lm
    from unlearnd.train.data import collate, encode_qa, refusal_for
    from unlearnd.train.trainer import TrainConfig, Trainer

    registry, first = registry_with(tmp_path)
    train_lora(first, registry.artifact_dir(first.id), tiny_model_dir, progress=False, overrides=TINY)
    registry.set_status(first.id, Status.active)
    _, second = registry, registry.add(ForgetSpec(name="Basil Mahfouz", method="lora", forget=FORGET[:4]))
    priors = prior_lora_adapters(registry, second)
    assert priors == [registry.artifact_dir(first.id) / "lora"]
    assert prior_lora_adapters(registry, first) == []  # later requests are not priors
    prior = load_prior_adapters(priors)
    assert len(prior) == 2 * 7  # 2 layers x 7 projections

    def final_penalty(lam: float) -> tuple[float, float]:
        base, tok = load_causal_lm(tiny_model_dir, frozen=True)
        torch.manual_seed(1)
        model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=list(PEFT_TARGET_MODULES)))
        with torch.no_grad():
            start = float(orthogonality_penalty(current_a_matrices(model), prior))
        items = [encode_qa(tok, qa.question, refusal_for(i), 64, True) for i, qa in enumerate(FORGET)]
        Trainer(O3LoRAMethod(prior, lam), TrainConfig(steps=10, learning_rate=0.02, progress=False)).fit(
            model, [collate(items[:4], 2)]
        )
        with torch.no_grad():
            return start, float(orthogonality_penalty(current_a_matrices(model), prior))

    start, free = final_penalty(0.0)
    start_again, constrained = final_penalty(1.0)
    assert start == pytest.approx(start_again) and start > 0  # same init either way
    assert constrained < 0.5 * free

    summary = train_lora(
        second, registry.artifact_dir(second.id), tiny_model_dir, prior_adapters=priors, progress=False, overrides=TINY
    )
    assert summary["prior_adapters"] == 1 and summary["orth_penalty"] > 0


def test_retraining_bumps_the_version(tmp_path, tiny_model_dir):
    registry, record = registry_with(tmp_path)
    artifact_dir = registry.artifact_dir(record.id)
    train_lora(record, artifact_dir, tiny_model_dir, progress=False, overrides={**TINY, "steps": 1})
    assert (
        train_lora(record, artifact_dir, tiny_model_dir, progress=False, overrides={**TINY, "steps": 1})["version"] == 2
    )


# -- serving -----------------------------------------------------------------------------------


def test_apply_sets_the_lora_by_weight(tmp_path):
    artifact_dir = tmp_path / "fr-1"
    (artifact_dir / "lora").mkdir(parents=True)
    (artifact_dir / "lora" / "adapter_config.json").write_text(
        json.dumps({"target_modules": list(PEFT_TARGET_MODULES), "lora_alpha": 16, "r": 8})
    )
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    save_file(
        {f"{prefix}.lora_A.weight": torch.randn(8, 32), f"{prefix}.lora_B.weight": torch.zeros(32, 8)},
        str(artifact_dir / "lora" / "adapter_model.safetensors"),
    )
    write_scaled_copy(artifact_dir / "lora", artifact_dir / "lora-s0.5", 0.5)
    LoRAArtifact(folders={"1.0": "lora", "0.5": "lora-s0.5"}, threshold=0.25, version=3).write(artifact_dir)
    registry = Registry(tmp_path / "data")
    record = registry.add(ForgetSpec(name="X", method="lora", forget=["Who is X?"]))
    intervention = LoRA()
    intervention.load(record, artifact_dir)

    def run(weight: float) -> GuardedCall:
        req = GuardedCall(
            id="q",
            kind="chat",
            sampling=SamplingSpec(),
            query_text="Who is X?",
            messages=[{"role": "user", "content": "Who is X?"}],
        )
        intervention.apply(req, RequestMatch(record.id, 1.0, weight), ctx=None)
        return req

    full, half, off = run(0.95), run(0.4), run(0.1)
    assert full.lora.name == f"{record.id}-v3" and full.lora.path == str((artifact_dir / "lora").resolve())
    assert half.lora.name == f"{record.id}-v3-s0.5" and half.lora.path.endswith("lora-s0.5")
    assert off.lora is None
    for req in (full, half, off):  # the prompt itself is left to the pipeline
        assert req.prompt_token_ids == [] and req.prompt_embeds is None
