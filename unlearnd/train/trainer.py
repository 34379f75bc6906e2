"""The one training loop every offline method shares (baselines, soft prompts, LoRAs, reference models).

An objective is a small `TrainingObjective` subclass registered by name (`unlearnd.train.objectives`):
it says which parameters train and how a batch turns into a loss. The loop owns everything else:
optimiser, schedule, gradient clipping, progress bar, and the cost record (wall and CPU seconds) that
reports quote.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from unlearnd.train.objectives import TrainingObjective

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    steps: int = 10
    learning_rate: float = 1e-5
    weight_decay: float = 0.0
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    seed: int = 0
    log_every: int = 1
    progress: bool = True


@dataclass
class TrainResult:
    steps: int
    losses: list[float]
    wall_seconds: float
    cpu_seconds: float
    extra: dict[str, Any] = field(default_factory=dict)


def _result(steps: int, losses: list[float], wall0: float, cpu0: float) -> TrainResult:
    return TrainResult(
        steps=steps,
        losses=list(losses),
        wall_seconds=time.perf_counter() - wall0,
        cpu_seconds=time.process_time() - cpu0,
    )


def _cycle(batches: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    while True:
        produced = False
        for batch in batches:
            produced = True
            yield batch
        if not produced:
            raise ValueError("the batch iterable is empty")


class Trainer:
    def __init__(self, method: TrainingObjective, config: TrainConfig):
        self.method = method
        self.config = config

    def fit(
        self,
        model: torch.nn.Module,
        batches: Iterable[dict[str, Any]],
        after_step: Callable[[TrainResult, torch.nn.Module], None] | None = None,
    ) -> TrainResult:
        """Train `cfg.steps` steps; `after_step` sees the run so far after each one (a grid scores and keeps
        checkpoints with it: the schedule never depends on the total, so step k of a long run is the end
        of a k-step run)."""
        cfg = self.config
        torch.manual_seed(cfg.seed)
        self.method.setup(model)
        params = [p for p in self.method.trainable_parameters(model) if p.requires_grad]
        if not params:
            raise ValueError(f"method {self.method.name!r} left no trainable parameters")
        optimiser = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)

        def lr_lambda(step: int) -> float:
            if cfg.warmup_steps and step < cfg.warmup_steps:
                return (step + 1) / cfg.warmup_steps
            return 1.0

        schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lr_lambda)
        model.train()
        losses: list[float] = []
        wall0, cpu0 = time.perf_counter(), time.process_time()
        stream = _cycle(batches)
        bar = tqdm(range(cfg.steps), desc=f"train {self.method.name}", disable=not cfg.progress)
        for step in bar:
            batch = next(stream)
            loss, logs = self.method.loss(model, batch)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{self.method.name}: non-finite loss at step {step}")
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.max_grad_norm and cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            optimiser.step()
            schedule.step()
            losses.append(float(loss.detach()))
            if step % max(cfg.log_every, 1) == 0:
                bar.set_postfix(loss=f"{losses[-1]:.4f}", **{k: f"{v:.3g}" for k, v in logs.items()})
            if after_step is not None:
                after_step(_result(step + 1, losses, wall0, cpu0), model)
                model.train()
        model.eval()
        result = _result(cfg.steps, losses, wall0, cpu0)
        log.info(
            "%s: %d steps, final loss %.4f, %.1fs wall, %.1fs CPU",
            self.method.name,
            cfg.steps,
            losses[-1] if losses else math.nan,
            result.wall_seconds,
            result.cpu_seconds,
        )
        return result
