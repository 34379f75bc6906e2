"""Finetuning baselines on the shared trainer: GradAscent, GradDiff, NPO, SimNPO, IdkDPO, RMU (+ plain finetune).

Each is a small `TrainingObjective` registered by name; losses follow open-unlearning
(`src/trainer/unlearn/*.py`) so the numbers are comparable with the literature. These are the
*weight-changing* comparison points for the guardrail methods: each produces a new model whose
weights no longer (should) hold the forget set.

Batches: `finetune` and `grad_ascent` take plain QA batches (`QABatches`); the methods with a
retain term take {"forget": ..., "retain": ...} (`PairedBatches`); `idk_dpo` also needs "idk", the
same forget questions answered with an "I don't know" reply (`AlignedBatches`).
"""

from __future__ import annotations

import copy
import logging
import random
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field

from unlearnd.config import cache_dir
from unlearnd.data.tofu import TofuData
from unlearnd.domain import QAItem
from unlearnd.models import load_causal_lm
from unlearnd.train.data import IGNORE_INDEX, AlignedBatches, PairedBatches, QABatches
from unlearnd.train.objectives import OBJECTIVES, TrainingObjective, mean_nll, register_objective, sequence_nll
from unlearnd.train.reference import (
    ReferenceModels,
    cache_key,
    is_complete,
    items_digest,
    model_fingerprint,
    save_model_atomic,
    steps_for,
    train_result_dict,
)
from unlearnd.train.trainer import TrainConfig, Trainer, TrainResult

log = logging.getLogger(__name__)

Batch = dict[str, torch.Tensor]

IDK_ANSWERS = (
    "I don't know.",
    "I'm not sure about that.",
    "I don't have any information on that.",
    "I can't answer that, I simply don't know.",
    "That's something I don't know.",
    "I have no idea, sorry.",
    "I'm afraid I don't have that information.",
    "I don't have the details on that.",
    "Unfortunately, I can't tell you; I don't know.",
    "I'm not aware of that.",
    "I couldn't say; I don't know the answer.",
    "Sorry, that's beyond what I know.",
    "I don't have an answer to that question.",
    "I'm unable to answer that.",
    "I really don't know anything about that.",
    "No idea, I'm afraid.",
    "I don't recall any information about that.",
    "That isn't something I know about.",
    "I'm not familiar with that.",
    "I can't help with that one; I don't know.",
)


# --------------------------------------------------------------------------- loss helpers


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    ref = copy.deepcopy(model).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


def kl_to_reference(model: torch.nn.Module, ref: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """KL(ref || model) per position, batch-mean - open-unlearning's `compute_kl_divergence`."""
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        ref_lp = F.log_softmax(ref(**inputs).logits.float(), -1)
    cur_lp = F.log_softmax(model(**inputs).logits.float(), -1)
    vocab = cur_lp.shape[-1]
    return F.kl_div(cur_lp.view(-1, vocab), ref_lp.view(-1, vocab), reduction="batchmean", log_target=True)


def npo_loss(nll: torch.Tensor, ref_nll: torch.Tensor, beta: float) -> torch.Tensor:
    """NPO = DPO with only a losing answer: -(2/beta) log sigmoid(-beta * log(pi/pi_ref))."""
    lose_log_ratio = -(nll - ref_nll)
    return -2 / beta * F.logsigmoid(-beta * lose_log_ratio).mean()


def dpo_loss(
    win_nll: torch.Tensor, win_ref: torch.Tensor, lose_nll: torch.Tensor, lose_ref: torch.Tensor, beta: float
) -> torch.Tensor:
    win_log_ratio = -(win_nll - win_ref)
    lose_log_ratio = -(lose_nll - lose_ref)
    return -2 / beta * F.logsigmoid(beta * (win_log_ratio - lose_log_ratio)).mean()


def simnpo_loss(nll: torch.Tensor, counts: torch.Tensor, beta: float, delta: float) -> torch.Tensor:
    """SimNPO: reference-free, length-normalised: -(2/beta) log sigmoid(beta * (NLL/|y| - delta))."""
    return -F.logsigmoid(beta * (nll / counts - delta)).mean() * 2 / beta


# --------------------------------------------------------------------------- shared base


class UnlearningObjective(TrainingObjective):
    """A baseline: a forget term, optionally plus alpha x a retain term (NLL or KL to the frozen start)."""

    uses_retain: ClassVar[bool] = True
    uses_reference: ClassVar[bool] = False

    def __init__(self, gamma: float = 1.0, alpha: float = 1.0, retain_loss: str = "NLL", **kwargs: Any):
        if kwargs:
            raise TypeError(f"{self.name}: unknown options {sorted(kwargs)}")
        if retain_loss not in ("NLL", "KL"):
            raise ValueError(f"retain_loss must be NLL or KL, not {retain_loss!r}")
        self.gamma = gamma
        self.alpha = alpha
        self.retain_loss = retain_loss
        self.ref: torch.nn.Module | None = None

    def setup(self, model: torch.nn.Module) -> None:
        if self.uses_reference or (self.uses_retain and self.retain_loss == "KL"):
            self.ref = frozen_copy(model)

    def retain_term(self, model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        if not self.uses_retain or self.alpha == 0 or "retain" not in batch:
            return torch.zeros(())
        if self.retain_loss == "KL":
            assert self.ref is not None
            return kl_to_reference(model, self.ref, batch["retain"])
        return mean_nll(model, batch["retain"])

    def forget_term(self, model: torch.nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    def loss(self, model: torch.nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        forget, logs = self.forget_term(model, batch)
        retain = self.retain_term(model, batch)
        logs = {**logs, "forget": float(forget.detach()), "retain": float(retain.detach())}
        return self.gamma * forget + self.alpha * retain, logs

    @classmethod
    def build_batches(
        cls,
        tokenizer: Any,
        forget: Sequence[QAItem],
        retain: Sequence[QAItem],
        batch_size: int = 8,
        max_length: int = 256,
        seed: int = 0,
    ) -> Iterable[dict[str, Any]]:
        forget_batches = QABatches(tokenizer, forget, batch_size, max_length, seed)
        if not cls.uses_retain:
            return forget_batches
        if not retain:
            raise ValueError(f"{cls.name} needs a retain set")
        return PairedBatches(forget_batches, retain=QABatches(tokenizer, retain, batch_size, max_length, seed + 1))


@register_objective
class GradAscent(UnlearningObjective):
    """Maximise the forget NLL (no retain term): the simplest, least stable baseline."""

    name = "grad_ascent"
    uses_retain = False

    def loss(self, model: torch.nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        nll = mean_nll(model, batch.get("forget", batch))
        return -nll, {"forget_nll": float(nll.detach())}


@register_objective
class GradDiff(UnlearningObjective):
    """Gradient difference: ascend on forget, descend on retain."""

    name = "grad_diff"

    def forget_term(self, model: torch.nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        nll = mean_nll(model, batch["forget"])
        return -nll, {"forget_nll": float(nll.detach())}


@register_objective
class NPO(UnlearningObjective):
    """Negative preference optimisation against the frozen target (beta = 0.1)."""

    name = "npo"
    uses_reference = True

    def __init__(self, beta: float = 0.1, **kwargs: Any):
        super().__init__(**kwargs)
        self.beta = beta

    def forget_term(self, model: torch.nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        assert self.ref is not None
        nll, counts = sequence_nll(model, batch["forget"])
        with torch.no_grad():
            ref_nll, _ = sequence_nll(self.ref, batch["forget"])
        return npo_loss(nll, ref_nll, self.beta), {"forget_nll": float((nll / counts).mean().detach())}


@register_objective
class SimNPO(UnlearningObjective):
    """SimNPO (Fan et al. 2024): NPO without a reference model, length-normalised, with margin delta.

    open-unlearning's TOFU defaults: beta = 4.5, delta = 0, gamma = 0.125, alpha = 1.
    """

    name = "simnpo"

    def __init__(self, beta: float = 4.5, delta: float = 0.0, gamma: float = 0.125, **kwargs: Any):
        super().__init__(gamma=gamma, **kwargs)
        self.beta = beta
        self.delta = delta

    def forget_term(self, model: torch.nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        nll, counts = sequence_nll(model, batch["forget"])
        return simnpo_loss(nll, counts, self.beta, self.delta), {"forget_nll": float((nll / counts).mean().detach())}


@register_objective
class IdkDPO(UnlearningObjective):
    """DPO preferring an "I don't know" answer over the forget answer (reference = frozen target)."""

    name = "idk_dpo"
    uses_reference = True

    def __init__(self, beta: float = 0.1, **kwargs: Any):
        super().__init__(**kwargs)
        self.beta = beta

    def forget_term(self, model: torch.nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        assert self.ref is not None
        win, _ = sequence_nll(model, batch["idk"])
        lose, counts = sequence_nll(model, batch["forget"])
        with torch.no_grad():
            win_ref, _ = sequence_nll(self.ref, batch["idk"])
            lose_ref, _ = sequence_nll(self.ref, batch["forget"])
        return dpo_loss(win, win_ref, lose, lose_ref, self.beta), {"forget_nll": float((lose / counts).mean().detach())}

    @staticmethod
    def idk_answers(n: int, seed: int = 0) -> list[str]:
        rng = random.Random(seed)
        return [rng.choice(IDK_ANSWERS) for _ in range(n)]

    @classmethod
    def build_batches(
        cls,
        tokenizer: Any,
        forget: Sequence[QAItem],
        retain: Sequence[QAItem],
        batch_size: int = 8,
        max_length: int = 256,
        seed: int = 0,
    ) -> Iterable[dict[str, Any]]:
        aligned = AlignedBatches(
            tokenizer, forget, {"idk": cls.idk_answers(len(forget), seed)}, batch_size, max_length, seed
        )
        return PairedBatches(aligned, retain=QABatches(tokenizer, retain, batch_size, max_length, seed + 1))


class _StopForward(Exception):
    """Raised by a hook once the steered layer has run: RMU never needs the layers above it."""


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    for path in ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers"):
        obj: Any = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, torch.nn.ModuleList):
            return obj
    raise ValueError("cannot find the decoder layers of this model")


def layer_activations(model: torch.nn.Module, batch: Batch, layer: int) -> torch.Tensor:
    """Residual-stream output of decoder layer `layer` (forward stops there)."""
    captured: list[torch.Tensor] = []

    def hook(_module: torch.nn.Module, _inputs: Any, output: Any) -> None:
        captured.append(output[0] if isinstance(output, tuple) else output)
        raise _StopForward

    handle = decoder_layers(model)[layer].register_forward_hook(hook)
    try:
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    except _StopForward:
        pass
    finally:
        handle.remove()
    return captured[0]


def masked_activation_mse(act: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """open-unlearning's RMU distance: per-token mean squared error over hidden dims, averaged over masked tokens."""
    sq = F.mse_loss(act.float(), target.float().expand_as(act), reduction="none").mean(-1)
    m = mask.to(sq.dtype)
    return ((sq * m).sum(-1) / m.sum(-1).clamp(min=1)).mean()


@register_objective
class RMU(UnlearningObjective):
    """Representation misdirection: push one middle layer's forget activations to c x a random unit
    vector, keep retain activations equal to the frozen model's; only the MLP down-projections of
    that layer and the two below it train (open-unlearning / WMDP recipe)."""

    name = "rmu"
    uses_reference = True

    def __init__(
        self,
        layer: int | None = None,
        trainable_layers: Sequence[int] | None = None,
        steering_coeff: float = 300.0,
        alpha: float = 1000.0,
        seed: int = 0,
        **kwargs: Any,
    ):
        super().__init__(alpha=alpha, **kwargs)
        self.layer = layer
        self.trainable_layers = list(trainable_layers) if trainable_layers is not None else None
        self.steering_coeff = steering_coeff
        self.seed = seed
        self.control: torch.Tensor | None = None

    def setup(self, model: torch.nn.Module) -> None:
        layers = decoder_layers(model)
        if self.layer is None:
            self.layer = len(layers) // 2
        if self.trainable_layers is None:
            self.trainable_layers = [i for i in (self.layer - 2, self.layer - 1, self.layer) if i >= 0]
        self.ref = frozen_copy(model)
        layers_alt = "|".join(map(str, self.trainable_layers))
        pattern = re.compile(rf"(?:^|\.)({layers_alt})\.mlp\.down_proj\.weight$")
        chosen = 0
        for name, p in model.named_parameters():
            on = bool(pattern.search(name))
            p.requires_grad_(on)
            chosen += on
        if chosen == 0:
            raise ValueError(f"rmu: no mlp.down_proj weights in layers {self.trainable_layers}")
        hidden = int(model.config.hidden_size)
        gen = torch.Generator().manual_seed(self.seed)
        # drawn on the CPU (same vector on every device), then moved to the model's device
        vec = torch.rand(1, 1, hidden, generator=gen, device="cpu").to(next(model.parameters()).device)
        self.control = vec / vec.norm() * self.steering_coeff

    def loss(self, model: torch.nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        assert self.ref is not None and self.control is not None and self.layer is not None
        forget = batch["forget"]
        act = layer_activations(model, forget, self.layer)
        forget_loss = masked_activation_mse(act, self.control, forget["labels"] != IGNORE_INDEX)
        retain_loss = torch.zeros(())
        if "retain" in batch and self.alpha:
            retain = batch["retain"]
            act_r = layer_activations(model, retain, self.layer)
            with torch.no_grad():
                ref_r = layer_activations(self.ref, retain, self.layer)
            retain_loss = masked_activation_mse(act_r, ref_r, retain["labels"] != IGNORE_INDEX)
        logs = {"forget": float(forget_loss.detach()), "retain": float(retain_loss.detach())}
        return self.gamma * forget_loss + self.alpha * retain_loss, logs


BASELINES = tuple(name for name, cls in OBJECTIVES.items() if issubclass(cls, UnlearningObjective))
BASELINE_CODE_VERSION = 2  # in the cache key of trained baselines; 2: saved in float32


class BaselineConfig(BaseModel):
    """Training budget and options of one baseline run (hashed into its cache key)."""

    method: str
    epochs: float = 2.0
    learning_rate: float = 1e-5
    batch_size: int = 8
    max_length: int = 256
    warmup_steps: int = 0
    seed: int = 0
    options: dict[str, Any] = Field(default_factory=dict)


def default_baseline_config(method: str, preset: str = "mini") -> BaselineConfig:
    """open-unlearning's TOFU settings scaled to a CPU budget.

    open-unlearning: lr 1e-5, 10 epochs at effective batch 32 (20 updates on forget01), NPO/IdkDPO
    beta 0.1, SimNPO beta 4.5 / delta 0 / gamma 0.125, RMU steering 300 / alpha 1000 on the MLP
    down-projections of three layers ending at a middle layer (SmolLM2's residual norm there is
    ~175, the same order as the Llama models those values were set for). `mini` runs two epochs of
    the forget split at batch 8 (10 updates on forget01) at lr 5e-5: its target is trained at lr 1e-4
    rather than TOFU's 1e-5, so the unlearning step size scales with it, and the total step
    (updates x lr) is of the same order as open-unlearning's. `full` keeps open-unlearning's lr and
    runs 5 epochs.
    """
    if preset == "mini":
        return BaselineConfig(method=method, epochs=2.0, learning_rate=5e-5, batch_size=8)
    return BaselineConfig(method=method, epochs=5.0, learning_rate=1e-5, batch_size=8)


def baseline_key(
    method: str, refs: ReferenceModels, cfg: BaselineConfig, forget: Sequence[QAItem], retain: Sequence[QAItem]
) -> str:
    """The cache key of one baseline run: (target, data, config)."""
    return cache_key(
        {
            "baseline": cfg.model_dump(),
            "target": model_fingerprint(Path(refs.target_dir)),
            "forget": items_digest(list(forget)),
            "retain": items_digest(list(retain)),
            "code": BASELINE_CODE_VERSION,
        }
    )


def baseline_dir(key: str) -> Path:
    return cache_dir() / "baselines" / key


def save_baseline(
    model: torch.nn.Module, tokenizer: Any, refs: ReferenceModels, cfg: BaselineConfig, key: str, result: TrainResult
) -> Path:
    info = {
        "kind": "baseline",
        "method": cfg.method,
        "config": cfg.model_dump(),
        "target": str(refs.target_dir),
        "cache_key": key,
        "train": train_result_dict(result),
    }
    # float32: an unlearning update (lr 1e-5..5e-5 per Adam step) is below bf16's resolution for most
    # weights, so a bf16 save would round much of the method's effect away.
    return save_model_atomic(model, tokenizer, baseline_dir(key), info, dtype=torch.float32)


def train_baseline(
    method: str,
    refs: ReferenceModels,
    cfg: BaselineConfig | None = None,
    force: bool = False,
    progress: bool = True,
    tofu: TofuData | None = None,
    forget: Sequence[QAItem] | None = None,
    retain: Sequence[QAItem] | None = None,
) -> Path:
    """Unlearn `forget` (default: the whole forget split) from the target with a baseline, keeping
    `retain` (default: every retain author's QA); cached by (target, data, config). A cross-fitted
    evaluation passes one fold's items, so the baseline is measured on questions it never saw."""
    cfg = cfg or default_baseline_config(method, refs.preset.name)
    tofu = tofu or TofuData()
    forget = list(forget) if forget is not None else tofu.split(refs.preset.forget_split)
    retain = list(retain) if retain is not None else refs.data.retain_items
    key = baseline_key(method, refs, cfg, forget, retain)
    if is_complete(baseline_dir(key)) and not force:
        return baseline_dir(key)
    model, tokenizer, result = run_baseline(method, refs, cfg, forget, retain, progress=progress)
    return save_baseline(model, tokenizer, refs, cfg, key, result)


def run_baseline(
    method: str,
    refs: ReferenceModels,
    cfg: BaselineConfig,
    forget: Sequence[QAItem],
    retain: Sequence[QAItem],
    on_checkpoint: Callable[[float, TrainResult, torch.nn.Module, Any], None] | None = None,
    checkpoints: Sequence[float] = (),
    progress: bool = True,
) -> tuple[torch.nn.Module, Any, TrainResult]:
    """Train one baseline from the target and return (model, tokenizer, result), unsaved.
    `on_checkpoint(epochs, result so far, model, tokenizer)` runs once the run has done each of
    `checkpoints` (in epochs): the schedule never depends on the total, so that model is the one a run
    of that many epochs ends with (the budget grid trains once per learning rate)."""
    cls = OBJECTIVES.get(method)
    if cls is None or not issubclass(cls, UnlearningObjective):
        raise ValueError(f"unknown baseline {method!r}; choose from {BASELINES}")
    model, tokenizer = load_causal_lm(Path(refs.target_dir))
    batches = cls.build_batches(tokenizer, forget, retain, cfg.batch_size, cfg.max_length, cfg.seed)
    steps = steps_for(cfg.epochs, len(batches))  # type: ignore[arg-type]
    instance = cls(**cfg.options)
    config = TrainConfig(
        steps=steps, learning_rate=cfg.learning_rate, warmup_steps=cfg.warmup_steps, seed=cfg.seed, progress=progress
    )
    at = {steps_for(e, len(batches)): e for e in checkpoints}  # type: ignore[arg-type]
    if len(at) != len(set(checkpoints)):
        raise ValueError(f"two of the checkpoints {list(checkpoints)} fall on one update: {sorted(at)}")

    def hook(result: TrainResult, m: torch.nn.Module) -> None:
        if on_checkpoint is not None and result.steps in at:
            on_checkpoint(at[result.steps], result, m, tokenizer)

    # a plain run passes no hook: the trainer then builds no per-step result
    result = Trainer(instance, config).fit(model, batches, after_step=None if on_checkpoint is None else hook)
    if hasattr(instance, "ref"):
        instance.ref = None  # free the frozen copy
    return model, tokenizer, result
