"""O3's offline step: one LoRA per forget request, orthogonal to every earlier request's LoRA.

The forget set is relabelled to non-answers ("I don't know"-style) and the adapter is trained on
it alone (O3 uses no retain data: the detector keeps the adapter off in-distribution prompts).
Continual requests must not undo each other, so the loss adds O-LoRA's orthogonality penalty
lambda * sum_k sum_modules ||A_k^T A_t||_F^2 between this adapter's down-projections A_t and
every earlier adapter's A_k (PEFT stores A as [r, in], so the product is A_k A_t^T, [r_k, r_t]).
Only the linear projections are adapted (`PEFT_TARGET_MODULES`, see engine.base on vLLM #51122).
The loop is the shared `Trainer`.
"""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
from pathlib import Path

import torch
from pydantic import BaseModel, Field

from unlearnd.artifacts import install_dir, staging_dir, write_json_atomic
from unlearnd.data.qa import subsample
from unlearnd.domain import ForgetRequest, ForgetSpec, Method, Status
from unlearnd.engine.base import PEFT_TARGET_MODULES
from unlearnd.interventions.lora import LoRAArtifact, check_adapter, scale_folder_name
from unlearnd.prompting import stop_ids
from unlearnd.registry import Registry
from unlearnd.train.data import EncodedQA, collate, encode_qa, pad_id_of, refusal_for
from unlearnd.train.job import JobContext, default_preset, start_job
from unlearnd.train.objectives import TrainingObjective, register_objective
from unlearnd.train.scoring import answer_probability, greedy_generate, mean, target_logits
from unlearnd.train.trainer import TrainConfig, Trainer

log = logging.getLogger(__name__)


class LoRAPreset(BaseModel):
    rank: int = 8
    lora_alpha: float = 16.0
    steps: int = 30
    batch_size: int = 8
    learning_rate: float = 1e-3
    warmup_steps: int = 0
    orth_lambda: float = 0.1
    max_len: int = 128
    n_eval: int | None = 12
    n_samples: int = 2
    sample_tokens: int = 24
    scales: list[float] = Field(default_factory=lambda: [1.0])
    threshold: float = 0.5
    seed: int = 0
    dtype: str = "float32"


PRESETS = {
    "cpu": LoRAPreset(),
    "full": LoRAPreset(
        steps=300, batch_size=16, learning_rate=5e-4, warmup_steps=20, n_eval=None, n_samples=8, sample_tokens=64
    ),
}


def module_key(name: str) -> str | None:
    """'base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight' (a live PEFT
    parameter) or '...q_proj.lora_A.weight' (a saved adapter) -> 'model.layers.0.self_attn.q_proj'."""
    if ".lora_A." not in name:
        return None
    stem = name.split(".lora_A.")[0]
    return stem.removeprefix("base_model.model.")


def load_prior_adapters(folders: list[Path]) -> dict[str, list[torch.Tensor]]:
    """The A matrices of earlier adapters, by module."""
    from safetensors.torch import load_file

    prior: dict[str, list[torch.Tensor]] = {}
    for folder in folders:
        tensors = load_file(str(Path(folder) / "adapter_model.safetensors"))
        for name, tensor in tensors.items():
            key = module_key(name)
            if key is not None:
                prior.setdefault(key, []).append(tensor.to(torch.float32))
    return prior


def current_a_matrices(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {key: p for name, p in model.named_parameters() if (key := module_key(name)) is not None}


def orthogonality_penalty(current: dict[str, torch.Tensor], prior: dict[str, list[torch.Tensor]]) -> torch.Tensor:
    """sum over modules and earlier adapters of ||A_k A_t^T||_F^2 (zero iff the row spaces are
    orthogonal); modules an earlier adapter did not adapt contribute nothing."""
    total = None
    for key, a_t in current.items():
        for a_k in prior.get(key, []):
            term = (a_k.to(a_t.device, a_t.dtype) @ a_t.T).pow(2).sum()
            total = term if total is None else total + term
    if total is None:
        some = next(iter(current.values()), None)
        return torch.zeros((), device=some.device if some is not None else None)
    return total


@register_objective
class O3LoRAMethod(TrainingObjective):
    """Cross-entropy of the relabelled forget set + lambda * orthogonality to earlier adapters."""

    name = "lora"

    def __init__(self, prior: dict[str, list[torch.Tensor]] | None = None, orth_lambda: float = 0.1):
        self.prior = prior or {}
        self.orth_lambda = orth_lambda
        self._current: dict[str, torch.Tensor] = {}

    def setup(self, model: torch.nn.Module) -> None:
        self._current = current_a_matrices(model)
        device = next(iter(self._current.values())).device
        self.prior = {k: [a.to(device) for a in v] for k, v in self.prior.items()}
        missing = set(self.prior) - set(self._current)
        if missing:
            log.warning("O3: %d earlier adapter modules are not adapted here (ignored)", len(missing))

    def loss(self, model: torch.nn.Module, batch: dict):
        embeds = model.get_input_embeddings()(batch["input_ids"])
        logits, targets = target_logits(model, embeds, batch["attention_mask"], batch["labels"])
        l_forget = torch.nn.functional.cross_entropy(logits, targets)
        orth = orthogonality_penalty(self._current, self.prior)
        return l_forget + self.orth_lambda * orth, {"forget": float(l_forget.detach()), "orth": float(orth.detach())}


def prior_lora_adapters(registry: Registry, request: ForgetRequest) -> list[Path]:
    """Adapter folders (scale 1.0) of the LoRA requests registered before `request` and still
    served (ready/active): the ones this adapter must be orthogonal to."""
    folders = []
    for other in registry.list([Status.ready, Status.active]):
        if other.id == request.id or other.method != Method.lora or other.created_at > request.created_at:
            continue
        artifact_dir = registry.artifact_dir(other.id)
        try:
            artifact = LoRAArtifact.read(artifact_dir)
        except FileNotFoundError:
            continue
        folders.append(
            artifact_dir
            / artifact.folder(1.0 if "1.0" in artifact.folders else max(float(s) for s in artifact.folders))
        )
    return folders


def make_batches(items: list[EncodedQA], batch_size: int, pad_id: int, seed: int, device: torch.device) -> list[dict]:
    items = items[:]
    random.Random(seed).shuffle(items)
    return [
        {k: v.to(device) for k, v in collate(items[i : i + batch_size], pad_id).items()}
        for i in range(0, len(items), batch_size)
    ]


def write_scaled_copy(source: Path, target: Path, scale: float) -> Path:
    """Copy a PEFT adapter folder with `lora_alpha` (and any alpha_pattern) multiplied by `scale`:
    the LoRA delta is (alpha / r) * B A, so this scales the adapter's effect exactly."""
    staging = staging_dir(target)
    shutil.copytree(source, staging, dirs_exist_ok=True)
    config_path = staging / "adapter_config.json"
    config = json.loads(config_path.read_text())

    def scaled(value: float) -> float | int:
        value = value * scale
        return int(value) if float(value).is_integer() else value

    config["lora_alpha"] = scaled(config["lora_alpha"])
    if config.get("alpha_pattern"):
        config["alpha_pattern"] = {k: scaled(v) for k, v in config["alpha_pattern"].items()}
    write_json_atomic(config_path, config, indent=2)
    return install_dir(staging, target)


def save_adapter(model, target: Path) -> Path:
    """`save_pretrained` into a temporary sibling, checked, then swapped into place."""
    staging = staging_dir(target)
    try:
        model.save_pretrained(str(staging))
        check_adapter(staging)
        return install_dir(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def train_lora(
    request: ForgetRequest,
    artifact_dir: Path,
    model_path: str | Path,
    prior_adapters: list[Path] | None = None,
    preset: str = "cpu",
    device: str | None = None,
    progress: bool = True,
    overrides: dict | None = None,
) -> dict:
    """Train this request's O3 LoRA; writes `lora/` (+ pre-scaled copies) and `lora.json`."""
    from peft import LoraConfig, get_peft_model

    job = start_job(PRESETS, preset, request, model_path, device, overrides)
    cfg, dev, base, tokenizer = job.cfg, job.device, job.model, job.tokenizer
    artifact_dir = Path(artifact_dir)
    artifact_dir.mkdir(parents=True, exist_ok=True)
    pad_id = pad_id_of(tokenizer)
    forget_qas = ForgetSpec.as_qa(request.spec.forget)
    items = [
        encode_qa(tokenizer, qa.question, refusal_for(i), cfg.max_len, end_of_turn=True)
        for i, qa in enumerate(forget_qas)
    ]
    eval_forget = [
        encode_qa(tokenizer, qa.question, qa.answer, cfg.max_len, end_of_turn=False)
        for qa in subsample([qa for qa in forget_qas if qa.answer], cfg.n_eval, cfg.seed + 1)
    ]
    eval_retain = [
        encode_qa(tokenizer, qa.question, qa.answer, cfg.max_len, end_of_turn=False)
        for qa in subsample([qa for qa in ForgetSpec.as_qa(request.spec.retain) if qa.answer], cfg.n_eval, cfg.seed + 1)
    ]
    eval_refusals = items[: max(cfg.n_eval or len(items), 1)]

    torch.manual_seed(cfg.seed)
    alpha = int(cfg.lora_alpha) if float(cfg.lora_alpha).is_integer() else cfg.lora_alpha  # "16", not "16.0"
    lora_config = LoraConfig(
        r=cfg.rank,
        lora_alpha=alpha,
        lora_dropout=0.0,
        target_modules=list(PEFT_TARGET_MODULES),
        bias="none",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(base, lora_config)
    prior_folders = [Path(p) for p in (prior_adapters or [])]
    prior = load_prior_adapters(prior_folders)
    method = O3LoRAMethod(prior, cfg.orth_lambda)

    def score(items_: list[EncodedQA], adapter: bool, desc: str) -> float | None:
        if not items_:
            return None
        if adapter:
            return mean(answer_probability(model, tokenizer, items_, cfg.batch_size, progress=progress, desc=desc))
        with model.disable_adapter():
            return mean(answer_probability(model, tokenizer, items_, cfg.batch_size, progress=progress, desc=desc))

    def refusal_loss() -> float:
        batch = {k: v.to(dev) for k, v in collate(eval_refusals, pad_id).items()}
        with torch.no_grad():
            return float(method.loss(model, batch)[1]["forget"])

    with torch.no_grad():
        orth_init = float(orthogonality_penalty(current_a_matrices(model), prior))
    before = {
        "forget_prob": score(eval_forget, False, "forget P, base"),
        "retain_prob": score(eval_retain, False, "retain P, base"),
        "refusal_loss": refusal_loss(),
        "orth_penalty": orth_init,
    }
    batches = make_batches(items, cfg.batch_size, pad_id, cfg.seed, dev)
    train_cfg = TrainConfig(
        steps=cfg.steps,
        learning_rate=cfg.learning_rate,
        warmup_steps=cfg.warmup_steps,
        seed=cfg.seed,
        progress=progress,
    )
    result = Trainer(method, train_cfg).fit(model, batches)
    with torch.no_grad():
        orth_final = float(orthogonality_penalty(current_a_matrices(model), method.prior))
    after = {
        "forget_prob": score(eval_forget, True, "forget P, adapter"),
        "retain_prob": score(eval_retain, True, "retain P, adapter"),
        "refusal_loss": refusal_loss(),
        "orth_penalty": orth_final,
    }
    samples = []
    eos = stop_ids(tokenizer)
    with torch.no_grad():
        for item in eval_forget[: cfg.n_samples]:
            emb = model.get_input_embeddings()(torch.tensor(item.prompt_ids, device=dev))
            gen = greedy_generate(model, emb, cfg.sample_tokens, eos)
            samples.append({"question": item.question, "output": tokenizer.decode(gen, skip_special_tokens=True)})

    previous = None
    try:
        previous = LoRAArtifact.read(artifact_dir)
    except FileNotFoundError:
        pass
    version = previous.version + 1 if previous else 1  # a new name, so vLLM never serves a stale cache
    main_folder = save_adapter(model, artifact_dir / scale_folder_name(1.0))
    folders = {"1.0": main_folder.name}
    for scale in sorted(set(cfg.scales) - {1.0}):
        folders[f"{scale:g}"] = write_scaled_copy(main_folder, artifact_dir / scale_folder_name(scale), scale).name
    if 1.0 not in cfg.scales:
        log.info("O3: scale 1.0 is always written; requested scales %s", cfg.scales)
    cost = job.cost(train_wall_seconds=result.wall_seconds, train_cpu_seconds=result.cpu_seconds)
    artifact = LoRAArtifact(
        version=version,
        threshold=cfg.threshold,
        folders=folders,
        rank=cfg.rank,
        lora_alpha=cfg.lora_alpha,
        target_modules=sorted(PEFT_TARGET_MODULES),
        prior_adapters=[str(p) for p in prior_folders],
        training={
            "method": method.name,
            "preset": cfg.model_dump(mode="json"),
            "losses": result.losses,
            "n_forget": len(items),
            "cost": cost,
        },
        evaluation={
            "before": before,
            "after": after,
            "n_eval_forget": len(eval_forget),
            "n_eval_retain": len(eval_retain),
            "samples": samples,
        },
    )
    artifact.write(artifact_dir)
    summary = {
        "method": "lora",
        "version": version,
        "rank": cfg.rank,
        "steps": cfg.steps,
        "prior_adapters": len(prior_folders),
        "orth_penalty_init": orth_init,
        "orth_penalty": orth_final,
        "forget_prob_before": before["forget_prob"],
        "forget_prob_after": after["forget_prob"],
        "retain_prob_before": before["retain_prob"],
        "retain_prob_after": after["retain_prob"],
        "refusal_loss_before": before["refusal_loss"],
        "refusal_loss_after": after["refusal_loss"],
        **cost,
    }
    log.info(
        "O3 %s: forget P %.4f -> %.4f, refusal loss %.3f -> %.3f, orth %.3g, %.0fs",
        request.id,
        before["forget_prob"] or math.nan,
        after["forget_prob"] or math.nan,
        before["refusal_loss"],
        after["refusal_loss"],
        orth_final,
        cost["wall_seconds"],
    )
    return summary


def lora_job(request: ForgetRequest, artifact_dir: Path, ctx: JobContext) -> dict:
    """The worker's job for a `lora` request: orthogonal to every earlier LoRA request still served."""
    return train_lora(
        request,
        artifact_dir,
        ctx.model_path(),
        prior_adapters=prior_lora_adapters(ctx.registry, request),
        preset=default_preset(request),
        progress=False,
    )
