"""Training objectives: what a finetuning run minimises, registered by name for the shared `Trainer`.

Named "objectives" so they never read as the served forget methods of `unlearnd.methods`: the
finetuning baselines (`unlearnd.train.baselines`), SPUL's and O3's losses and plain finetuning
(`finetune`, for reference models and the relearning attack) are all objectives here.
"""

from __future__ import annotations

import abc
from collections.abc import Iterable
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from unlearnd.train.data import IGNORE_INDEX
from unlearnd.train.scoring import answer_logits

Batch = dict[str, torch.Tensor]


class TrainingObjective(abc.ABC):
    """What a training objective decides (parameters, loss); the `Trainer` decides the rest."""

    name: ClassVar[str]

    def setup(self, model: torch.nn.Module) -> None:  # noqa: B027 - optional hook
        """Prepare `model` before training (freeze layers, build reference copies, hooks...)."""

    def trainable_parameters(self, model: torch.nn.Module) -> Iterable[torch.nn.Parameter]:
        return [p for p in model.parameters() if p.requires_grad]

    @abc.abstractmethod
    def loss(self, model: torch.nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        """Return the loss to minimise for one batch and the scalars worth logging."""


OBJECTIVES: dict[str, type[TrainingObjective]] = {}


def register_objective(cls: type[TrainingObjective]) -> type[TrainingObjective]:
    OBJECTIVES[cls.name] = cls
    return cls


def sequence_nll(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token NLL per sequence over labelled tokens (the answer), and the labelled-token counts."""
    labels = batch["labels"]
    logits, targets, rows = answer_logits(model, labels, batch["attention_mask"], input_ids=batch["input_ids"])
    token_nll = F.cross_entropy(logits, targets, reduction="none")
    n = labels.shape[0]
    nll = torch.zeros(n, dtype=token_nll.dtype, device=token_nll.device).index_add(0, rows, token_nll)
    counts = (labels[:, 1:] != IGNORE_INDEX).sum(-1).clamp(min=1)
    return nll, counts


def mean_nll(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """Token-mean NLL over the batch's labelled tokens (HF's causal-LM loss)."""
    total, counts = sequence_nll(model, batch)
    return total.sum() / counts.sum()


@register_objective
class Finetune(TrainingObjective):
    """Plain supervised finetuning (reference models, relearning attack)."""

    name = "finetune"

    def loss(self, model: torch.nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        return mean_nll(model, batch.get("forget", batch)), {}
