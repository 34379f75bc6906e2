"""A fair budget for the finetuning baselines: a learning rate x epochs grid per baseline and fold, chosen
on the fold's fit items by a rule fixed before any grid was run (it never sees the measured items).

One run per learning rate (and option set, for a baseline the grid gives several) trains to the grid's
largest epoch count; each smaller count is a checkpoint of that run (the schedule never depends on the
total, so the checkpoint is what a run of that many epochs ends with). Each checkpoint is scored on the
fold's fit items only:

* fit forget quality: the KS p-value of its truth ratios on the fit forget questions against the retain
  model's on the same questions (TOFU's forget quality, on the questions the baseline trained on);
* retain kept: its mean answer probability on the fit retain questions as a share of the target's.

The rule: among the cells that keep at least `retain_floor` of the target's retain probability, the highest
fit forget quality (ties: more retain kept, then fewer updates); when none keeps it, the cell that keeps
the most. Only the best cell so far is saved, under the key `train_baseline` gives that cell's config, so
the measured run finds it in the cache and the disk holds one model per baseline and fold.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel

from unlearnd.domain import QAItem
from unlearnd.evaluation.folds import EvalSplits, Fold
from unlearnd.evaluation.metrics import RunRecords, forget_quality, normalised_probability, truth_ratios
from unlearnd.evaluation.model_under_test import HFModelUnderTest, ModelUnderTest
from unlearnd.evaluation.tofu import collect_split
from unlearnd.train.baselines import BaselineConfig, baseline_dir, baseline_key, run_baseline, save_baseline
from unlearnd.train.reference import ReferenceModels, is_complete
from unlearnd.train.trainer import TrainResult

log = logging.getLogger(__name__)

SCORE_BATCH = 16
GRID_CODE_VERSION = 3  # in the key of cached grid results: bump when the scoring, the rule or the format changes


class BaselineGrid(BaseModel):
    """Learning rates x epochs tried per baseline and fold (epochs are checkpoints of one run per rate)."""

    learning_rates: list[float]
    epochs: list[float]
    retain_floor: float = 0.9  # share of the target's fit retain probability a chosen cell must keep
    method_learning_rates: dict[str, list[float]] = {}  # a baseline whose rates differ from the rest
    # a baseline whose own knobs are tried too: each option set (merged into its config's options) at every rate
    method_options: dict[str, list[dict[str, Any]]] = {}

    def rates(self, method: str) -> list[float]:
        return self.method_learning_rates.get(method, self.learning_rates)

    def option_sets(self, method: str) -> list[dict[str, Any]]:
        return self.method_options.get(method, [{}])


# `mini` (a GPU's minutes) brackets the mini default (5e-5, 2 epochs: 6 updates on a forget01 fold) by 5x
# in rate and in updates; `cpu` is the part of it this 2-core CPU trains in about an hour for all six
# baselines (the default cell, 5x its rate, twice its updates); `full` brackets open-unlearning's TOFU
# setting (1e-5, 5 epochs) by 2x to 5x. Every grid holds its preset's default cell, so the rule can only
# pick it or a cell it scores higher. RMU trains only three MLP output matrices: in a smoke run of the
# `cpu` grid (seed 7, fit-fold scores only) 12 updates at 2.5e-4 left its fit scores unchanged to three
# decimals, so its rates reach 1e-3. That was not enough: its retain term (alpha 1000, open-unlearning's
# value, which its config says to tune per model and data) holds the three matrices where they are, and a
# dev probe on the mini target (trained on forget01 fold 0, 12 updates) found the forget loss moving 210 -> 206
# and the likelihood of fold 1's forget answers unchanged at every rate up to 5e-3, and moving at alpha 10 and
# 1. So the `cpu` and `mini` grids try alpha at 1000, 10 and 1 (the default options first) at each of its
# rates. Fold 1 is what fold 0 is measured on: the alpha values were set after a look at it (the choice
# among them still sees only fit items).
RMU_ALPHAS = [{}, {"alpha": 10.0}, {"alpha": 1.0}]
GRIDS: dict[str, BaselineGrid] = {
    "mini": BaselineGrid(
        learning_rates=[1e-5, 5e-5, 2.5e-4],
        epochs=[2.0, 5.0, 10.0],
        method_learning_rates={"rmu": [5e-5, 2.5e-4, 1e-3]},
        method_options={"rmu": RMU_ALPHAS},
    ),
    "cpu": BaselineGrid(
        learning_rates=[5e-5, 2.5e-4],
        epochs=[2.0, 4.0],
        method_learning_rates={"rmu": [5e-5, 1e-3]},
        method_options={"rmu": RMU_ALPHAS},
    ),
    "full": BaselineGrid(learning_rates=[5e-6, 1e-5, 5e-5], epochs=[2.0, 5.0, 10.0]),
}


class GridResult(BaseModel):
    config: BaselineConfig  # the base config with the chosen cell's learning rate and epochs
    cells: list[GridCell]
    diverged: list[dict[str, Any]] = []  # rates whose run hit a non-finite loss (cells after it not scored)


class GridCell(BaseModel):
    learning_rate: float
    epochs: float
    options: dict[str, Any] = {}  # the option set tried on top of the base config's options ({}: none)
    steps: int
    fit_forget_quality: float
    retain_kept: float
    chosen: bool = False


def _finite(x: float) -> float:
    return x if math.isfinite(x) else -math.inf


def rank(cell: GridCell, floor: float) -> tuple[float, ...]:
    """The rule's order (higher is better): cells that keep the floor first, by fit forget quality."""
    if cell.retain_kept >= floor:
        return (1.0, _finite(cell.fit_forget_quality), _finite(cell.retain_kept), -cell.steps)
    return (0.0, _finite(cell.retain_kept), _finite(cell.fit_forget_quality), -cell.steps)


def choose(cells: Sequence[GridCell], floor: float) -> int:
    if not cells:
        raise ValueError("an empty grid has no choice")
    return max(range(len(cells)), key=lambda i: rank(cells[i], floor))


@dataclass
class FitScorer:
    """Scores a model on one fold's fit items: (fit forget quality, retain kept)."""

    forget_items: list[QAItem]  # fit forget questions, with their paraphrased and perturbed answers
    retain_items: list[QAItem]  # fit retain questions, answers only
    retain_truth_ratios: list[float]  # the retain model's on `forget_items`
    target_retain_probability: float

    @classmethod
    def for_fold(cls, fold: Fold, splits: EvalSplits, retain_run: RunRecords, target: ModelUnderTest) -> FitScorer:
        fit = {it.question for it in fold.fit_forget}
        retain_forget = {r.question: r for r in retain_run.splits["forget"].items}
        forget = [it for it in splits.forget if it.question in fit and it.question in retain_forget]
        if not forget:
            raise ValueError("no fit forget question has the retain model's truth ratio: the grid cannot score")
        retain_items = [
            it.model_copy(update={"paraphrased_answer": None, "perturbed_answers": []}) for it in fold.fit_retain
        ]
        scorer = cls(forget, retain_items, truth_ratios([retain_forget[it.question] for it in forget]), 1.0)
        scorer.target_retain_probability = scorer.retain_probability(target)
        if not scorer.target_retain_probability > 0:  # NaN or 0: no cell could be measured against it
            raise ValueError(f"the target's fit retain probability is {scorer.target_retain_probability}")
        return scorer

    def retain_probability(self, mut: ModelUnderTest) -> float:
        records = collect_split(mut, "fit retain", self.retain_items, 0, generate=False).items
        return float(np.mean([normalised_probability(r.answer_lp) for r in records]))

    def score(self, mut: ModelUnderTest) -> tuple[float, float]:
        records = collect_split(mut, "fit forget", self.forget_items, 0, generate=False).items
        fq = forget_quality(truth_ratios(records), self.retain_truth_ratios)
        return fq, self.retain_probability(mut) / self.target_retain_probability


@dataclass
class _GridSearch:
    """One baseline's grid on one fold: scores each checkpoint and keeps the best cell's model so far."""

    method: str
    refs: ReferenceModels
    base: BaselineConfig
    grid: BaselineGrid
    forget: Sequence[QAItem]
    retain: Sequence[QAItem]
    scorer: FitScorer
    cells: list[GridCell] = dataclasses.field(default_factory=list)
    best_rank: tuple[float, ...] | None = None
    best_path: Path | None = None
    best_created: bool = False
    learning_rate: float = 0.0
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    scoring_seconds: tuple[float, float] = (0.0, 0.0)  # wall, CPU spent scoring this rate's run: not training
    diverged: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def run(self, progress: bool = False) -> GridResult:
        try:
            for options in self.grid.option_sets(self.method):
                for lr in self.grid.rates(self.method):
                    self.learning_rate, self.options, self.scoring_seconds = lr, options, (0.0, 0.0)
                    self._run_rate(progress)
            chosen = choose(self.cells, self.grid.retain_floor)
        except BaseException:  # cut short (an error, Ctrl-C): a later run must not find a half-searched best
            if self.best_created and self.best_path is not None:
                shutil.rmtree(self.best_path, ignore_errors=True)
            raise
        self.cells[chosen].chosen = True
        cell = self.cells[chosen]
        config = self.config_of(cell.learning_rate, cell.epochs, cell.options)
        return GridResult(config=config, cells=self.cells, diverged=self.diverged)

    def config_of(self, learning_rate: float, epochs: float, options: dict[str, Any]) -> BaselineConfig:
        """The config that trains a cell's model on its own (the key its model is saved under)."""
        update: dict[str, Any] = {"learning_rate": learning_rate, "epochs": epochs}
        if options:
            update["options"] = {**self.base.options, **options}
        return self.base.model_copy(update=update)

    def _run_rate(self, progress: bool) -> None:
        """One run at the current rate and options to the largest epoch count; a diverging run keeps the
        cells it scored before."""
        lr, options = self.learning_rate, self.options
        cfg = self.config_of(lr, max(self.grid.epochs), options)
        try:
            run_baseline(
                self.method, self.refs, cfg, self.forget, self.retain, self.checkpoint, self.grid.epochs, progress
            )
        except FloatingPointError as exc:
            log.warning("%s at lr %g %s diverged: %s", self.method, lr, options or "", exc)
            self.diverged.append({"learning_rate": lr, **({"options": options} if options else {}), "error": str(exc)})

    def checkpoint(self, epochs: float, result: TrainResult, model: torch.nn.Module, tokenizer: Any) -> None:
        wall, cpu = time.perf_counter(), time.process_time()
        fq, kept = self.scorer.score(HFModelUnderTest(model, tokenizer, name=self.method, batch_size=SCORE_BATCH))
        cell = GridCell(
            learning_rate=self.learning_rate,
            epochs=epochs,
            options=self.options,
            steps=result.steps,
            fit_forget_quality=fq,
            retain_kept=kept,
        )
        self.cells.append(cell)
        if self.best_rank is None or rank(cell, self.grid.retain_floor) > self.best_rank:
            self._keep(cell, result, model, tokenizer)
        spent_wall, spent_cpu = self.scoring_seconds
        self.scoring_seconds = (spent_wall + time.perf_counter() - wall, spent_cpu + time.process_time() - cpu)

    def _keep(self, cell: GridCell, result: TrainResult, model: torch.nn.Module, tokenizer: Any) -> None:
        """Save the new best cell's model where `train_baseline` looks for its config; drop the one before."""
        cfg = self.config_of(cell.learning_rate, cell.epochs, cell.options)
        path = baseline_dir(baseline_key(self.method, self.refs, cfg, self.forget, self.retain))
        created = not is_complete(path)
        if created:
            wall, cpu = self.scoring_seconds
            own = dataclasses.replace(
                result, wall_seconds=result.wall_seconds - wall, cpu_seconds=result.cpu_seconds - cpu
            )
            save_baseline(model, tokenizer, self.refs, cfg, path.name, own)
        if self.best_created and self.best_path is not None and self.best_path != path:
            shutil.rmtree(self.best_path, ignore_errors=True)
        self.best_rank, self.best_path, self.best_created = rank(cell, self.grid.retain_floor), path, created


def run_grid(
    method: str,
    refs: ReferenceModels,
    base: BaselineConfig,
    grid: BaselineGrid,
    forget: Sequence[QAItem],
    retain: Sequence[QAItem],
    scorer: FitScorer,
    progress: bool = False,
) -> GridResult:
    """Train and score every cell; return the chosen cell's config (its model saved where
    `train_baseline` looks for it) and every cell, the chosen one marked."""
    return _GridSearch(method, refs, base, grid, list(forget), list(retain), scorer).run(progress)
