"""O3's offline step: one LoRA per forget request, orthogonal to every earlier request's LoRA.

The forget set is relabelled to non-answers ("I don't know"-style) and the adapter is trained on
it alone (O3 uses no retain data: the detector keeps the adapter off in-distribution prompts).
Continual requests must not undo each other, so the loss adds O-LoRA's orthogonality penalty
lambda * sum_k sum_modules ||A_k^T A_t||_F^2 between this adapter's down-projections A_t and
every earlier adapter's A_k (PEFT stores A as [r, in], so the product is A_k A_t^T, [r_k, r_t]).
Only the linear projections are adapted (`PEFT_TARGET_MODULES`, see engine.base on vLLM #51122).
The loop is the shared `Trainer`, the steps the per-request template (`O3Job`, a `RequestJob`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import shutil
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, Field

from unlearnd.artifacts import install_dir, staging_dir, write_json_atomic
from unlearnd.data.qa import subsample
from unlearnd.domain import ForgetRequest, ForgetSpec, Method, Status
from unlearnd.engine.base import PEFT_TARGET_MODULES
from unlearnd.interventions.lora import LoRAArtifact, check_adapter, scale_folder_name
from unlearnd.registry import Registry
from unlearnd.train.data import EncodedQA, collate, pad_id_of
from unlearnd.train.job import (
    JobContext,
    TrainedRequestJob,
    answer_items,
    answered,
    default_preset,
    greedy_samples,
    refusal_items,
)
from unlearnd.train.objectives import TrainingObjective, register_objective
from unlearnd.train.scoring import answer_probability, mean, target_logits

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


class O3Job(TrainedRequestJob[LoRAPreset]):
    """O3's steps of the request template: relabel the forget set, train a LoRA orthogonal to the
    earlier adapters, score with the adapter off and on, write `lora/` (+ scaled copies), `lora.json`."""

    presets = PRESETS

    def __init__(self, *args: Any, prior_adapters: list[Path] | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.prior_folders = [Path(p) for p in (prior_adapters or [])]

    def prepare(self) -> None:
        """The relabelled forget set, the scored subsets, and a fresh LoRA on the frozen model."""
        from peft import LoraConfig, get_peft_model

        cfg, tokenizer = self.cfg, self.tokenizer
        self.artifact_dir.mkdir(parents=True, exist_ok=True)
        self.pad_id = pad_id_of(tokenizer)
        forget_qas = ForgetSpec.as_qa(self.request.spec.forget)
        retain_qas = ForgetSpec.as_qa(self.request.spec.retain)
        self.items = refusal_items(tokenizer, forget_qas, cfg.max_len)
        self.eval_forget = answer_items(
            tokenizer, subsample(answered(forget_qas), cfg.n_eval, cfg.seed + 1), cfg.max_len
        )
        self.eval_retain = answer_items(
            tokenizer, subsample(answered(retain_qas), cfg.n_eval, cfg.seed + 1), cfg.max_len
        )
        self.eval_refusals = self.items[: max(cfg.n_eval or len(self.items), 1)]
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
        self.trainable = get_peft_model(self.model, lora_config)
        self.objective = O3LoRAMethod(load_prior_adapters(self.prior_folders), cfg.orth_lambda)

    def score(self, before: bool) -> dict[str, Any]:
        """Answer probabilities with the adapter off (before) or on (after), the refusal loss and the
        orthogonality penalty."""
        with torch.no_grad():
            orth = float(orthogonality_penalty(current_a_matrices(self.trainable), self.objective.prior))
        which = "base" if before else "adapter"
        return {
            "forget_prob": self.adapter_probability(self.eval_forget, not before, f"forget P, {which}"),
            "retain_prob": self.adapter_probability(self.eval_retain, not before, f"retain P, {which}"),
            "refusal_loss": self.refusal_loss(),
            "orth_penalty": orth,
        }

    def adapter_probability(self, items: list[EncodedQA], adapter: bool, desc: str) -> float | None:
        """Mean answer probability of `items` with the adapter on or off (None when there are none)."""
        if not items:
            return None
        with contextlib.nullcontext() if adapter else self.trainable.disable_adapter():
            probs = answer_probability(
                self.trainable, self.tokenizer, items, self.cfg.batch_size, progress=self.progress, desc=desc
            )
        return mean(probs)

    def refusal_loss(self) -> float:
        batch = {k: v.to(self.device) for k, v in collate(self.eval_refusals, self.pad_id).items()}
        with torch.no_grad():
            return float(self.objective.loss(self.trainable, batch)[1]["forget"])

    def batches(self) -> list[dict]:
        return make_batches(self.items, self.cfg.batch_size, self.pad_id, self.cfg.seed, self.device)

    def samples(self) -> list[dict[str, str]]:
        model = self.trainable

        def embeds_of(item: EncodedQA) -> torch.Tensor:
            return model.get_input_embeddings()(torch.tensor(item.prompt_ids, device=self.device))

        n, tokens = self.cfg.n_samples, self.cfg.sample_tokens
        return greedy_samples(model, self.tokenizer, self.eval_forget[:n], embeds_of, tokens)

    def write_adapters(self) -> dict[str, str]:
        """The adapter at scale 1.0 and its pre-scaled copies; their folder names by scale."""
        cfg = self.cfg
        main_folder = save_adapter(self.trainable, self.artifact_dir / scale_folder_name(1.0))
        folders = {"1.0": main_folder.name}
        for scale in sorted(set(cfg.scales) - {1.0}):
            target = self.artifact_dir / scale_folder_name(scale)
            folders[f"{scale:g}"] = write_scaled_copy(main_folder, target, scale).name
        if 1.0 not in cfg.scales:
            log.info("O3: scale 1.0 is always written; requested scales %s", cfg.scales)
        return folders

    def write_artifact(self) -> None:
        cfg = self.cfg
        try:
            previous = LoRAArtifact.read(self.artifact_dir)
        except FileNotFoundError:
            previous = None
        self.version = previous.version + 1 if previous else 1  # a new name, so vLLM never serves a stale cache
        folders = self.write_adapters()
        LoRAArtifact(
            version=self.version,
            threshold=cfg.threshold,
            folders=folders,
            rank=cfg.rank,
            lora_alpha=cfg.lora_alpha,
            target_modules=sorted(PEFT_TARGET_MODULES),
            prior_adapters=[str(p) for p in self.prior_folders],
            training={
                "method": self.objective.name,
                "preset": cfg.model_dump(mode="json"),
                "losses": self.result.losses,
                "n_forget": len(self.items),
                "cost": self.cost,
            },
            evaluation={
                "before": self.before,
                "after": self.after,
                "n_eval_forget": len(self.eval_forget),
                "n_eval_retain": len(self.eval_retain),
                "samples": self.outputs,
            },
        ).write(self.artifact_dir)

    def report(self) -> dict[str, Any]:
        before, after = self.before, self.after
        summary = {
            "method": "lora",
            "version": self.version,
            "rank": self.cfg.rank,
            "steps": self.cfg.steps,
            "prior_adapters": len(self.prior_folders),
            "orth_penalty_init": before["orth_penalty"],
            "orth_penalty": after["orth_penalty"],
            "forget_prob_before": before["forget_prob"],
            "forget_prob_after": after["forget_prob"],
            "retain_prob_before": before["retain_prob"],
            "retain_prob_after": after["retain_prob"],
            "refusal_loss_before": before["refusal_loss"],
            "refusal_loss_after": after["refusal_loss"],
            **self.cost,
        }
        log.info(
            "O3 %s: forget P %.4f -> %.4f, refusal loss %.3f -> %.3f, orth %.3g, %.0fs",
            self.request.id,
            before["forget_prob"] or math.nan,
            after["forget_prob"] or math.nan,
            before["refusal_loss"],
            after["refusal_loss"],
            after["orth_penalty"],
            self.cost["wall_seconds"],
        )
        return summary


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
    job = O3Job(request, artifact_dir, model_path, preset, device, progress, overrides, prior_adapters=prior_adapters)
    return job.run()


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
