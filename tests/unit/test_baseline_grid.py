"""The baselines' budget grid: the selection rule, and a real grid on a tiny model whose chosen checkpoint is
the model a plain run of that cell's config trains."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from unlearnd.domain import QAItem
from unlearnd.evaluation import baseline_grid as bg
from unlearnd.evaluation.baseline_grid import GRIDS, BaselineGrid, FitScorer, GridCell, choose, run_grid
from unlearnd.evaluation.model_under_test import HFModelUnderTest
from unlearnd.evaluation.report import grid_lines
from unlearnd.train import reference as ref
from unlearnd.train.baselines import (
    BASELINES,
    BaselineConfig,
    default_baseline_config,
    run_baseline,
    save_baseline,
    train_baseline,
)

real_save = save_baseline


def cell(lr: float, epochs: float, fq: float, kept: float, steps: int = 10) -> GridCell:
    return GridCell(learning_rate=lr, epochs=epochs, steps=steps, fit_forget_quality=fq, retain_kept=kept)


def test_the_rule_takes_the_best_forget_quality_among_cells_that_keep_the_retain_floor():
    cells = [cell(1e-5, 2, 0.9, 0.5), cell(5e-5, 2, 0.3, 0.95), cell(5e-5, 5, 0.6, 0.91), cell(1e-4, 5, math.nan, 1.0)]
    assert choose(cells, 0.9) == 2  # 0.9 fails the floor; NaN forget quality ranks last among those kept
    tied = [cell(1e-5, 2, 0.5, 0.92, steps=6), cell(1e-5, 5, 0.5, 0.97, steps=15), cell(1e-5, 9, 0.5, 0.97, steps=27)]
    assert choose(tied, 0.9) == 1  # ties: more retain kept, then fewer updates
    none_kept = [cell(1e-5, 2, 0.9, 0.5), cell(5e-5, 2, 0.1, 0.8), cell(1e-4, 2, 0.99, 0.2)]
    assert choose(none_kept, 0.9) == 1  # nothing keeps the floor: the cell that damages retain least
    with pytest.raises(ValueError):
        choose([], 0.9)


def qa(i: int) -> QAItem:
    return QAItem(
        question=f"What did the painter number {i} paint?",
        answer=f"The painter number {i} painted blue harbours at dawn.",
        paraphrased_answer=f"At dawn, painter {i} painted harbours in blue.",
        perturbed_answers=[f"The painter number {i} painted red mountains.", f"Painter {i} sculpted marble lions."],
    )


def retain_qa(i: int) -> QAItem:
    return QAItem(question=f"Where does the baker number {i} live?", answer=f"Baker {i} lives by the old mill.")


def baseline_dirs(root) -> list:
    folder = root / "baselines"
    return sorted(p for p in folder.iterdir() if not p.name.startswith(".")) if folder.exists() else []


@pytest.fixture
def tiny_grid(tiny_model_dir, tmp_path, monkeypatch):
    """(refs, forget, retain, scorer, base config, grid) over the tiny model, the cache under tmp_path/grid."""
    monkeypatch.setenv("UNLEARND_CACHE_DIR", str(tmp_path / "grid"))
    refs = ref.ReferenceModels.model_construct(
        preset=ref.preset("mini"), target_dir=str(tiny_model_dir), retain_dir=str(tiny_model_dir), data=None
    )
    forget, retain = [qa(i) for i in range(4)], [retain_qa(i) for i in range(4)]
    scorer = FitScorer(forget, retain, retain_truth_ratios=[0.5, 0.7, 0.9, 1.1], target_retain_probability=1.0)
    scorer.target_retain_probability = scorer.retain_probability(HFModelUnderTest.from_dir(tiny_model_dir))
    base = BaselineConfig(method="grad_diff", batch_size=2, max_length=64, seed=3)
    grid = BaselineGrid(learning_rates=[1e-3, 3e-2], epochs=[1.0, 2.0], retain_floor=0.5)
    return refs, forget, retain, scorer, base, grid


def test_a_grid_keeps_only_its_chosen_cell_and_that_is_the_model_the_cell_config_trains(
    tiny_grid, tmp_path, monkeypatch
):
    refs, forget, retain, scorer, base, grid = tiny_grid
    grid_cache, plain_cache = tmp_path / "grid", tmp_path / "plain"

    saved = []
    monkeypatch.setattr(bg, "save_baseline", lambda *a: saved.append(a[4]) or real_save(*a))
    found = run_grid("grad_diff", refs, base, grid, forget, retain, scorer)
    chosen, cells = found.config, found.cells
    assert [(c.learning_rate, c.epochs, c.steps) for c in cells] == [
        (1e-3, 1, 2),
        (1e-3, 2, 4),
        (3e-2, 1, 2),
        (3e-2, 2, 4),
    ]
    assert [c.chosen for c in cells].count(True) == 1 and cells[choose(cells, 0.5)].chosen
    picked = cells[choose(cells, 0.5)]
    assert (chosen.learning_rate, chosen.epochs, chosen.seed) == (picked.learning_rate, picked.epochs, 3)
    assert len({c.retain_kept for c in cells}) == 4  # every cell is a different model

    kept = baseline_dirs(grid_cache)
    assert (
        len(saved) >= 2 and len(kept) == 1 and ref.is_complete(kept[0])
    )  # the cells that were best for a while are gone
    assert train_baseline("grad_diff", refs, chosen, forget=forget, retain=retain) == kept[0]  # a cache hit

    monkeypatch.setenv("UNLEARND_CACHE_DIR", str(plain_cache))  # the cell's config trained on its own
    plain = train_baseline("grad_diff", refs, chosen, forget=forget, retain=retain, progress=False)
    assert plain.name == kept[0].name
    a, b = load_file(kept[0] / "model.safetensors"), load_file(plain / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    monkeypatch.setenv("UNLEARND_CACHE_DIR", str(grid_cache))  # a second grid never deletes a model it found
    run_grid("grad_diff", refs, base, grid, forget, retain, scorer)
    assert baseline_dirs(grid_cache) == kept and ref.is_complete(kept[0])


def test_a_baselines_own_options_are_tried_at_every_rate_and_the_choice_carries_them(tiny_grid, tmp_path):
    refs, forget, retain, scorer, base, grid = tiny_grid
    grid = grid.model_copy(update={"learning_rates": [3e-2], "method_options": {"grad_diff": [{}, {"alpha": 0.0}]}})
    found = run_grid("grad_diff", refs, base, grid, forget, retain, scorer)
    assert [(c.options, c.epochs) for c in found.cells] == [({}, 1), ({}, 2), ({"alpha": 0.0}, 1), ({"alpha": 0.0}, 2)]
    assert found.cells[2].retain_kept != found.cells[0].retain_kept  # no retain term: another model
    picked = next(c for c in found.cells if c.chosen)
    assert found.config.options == picked.options and found.config.learning_rate == 3e-2
    kept = baseline_dirs(tmp_path / "grid")
    assert len(kept) == 1 and train_baseline("grad_diff", refs, found.config, forget=forget, retain=retain) == kept[0]


def test_the_report_shows_every_cell_and_the_choice():
    cells = [cell(5e-5, 2, 0.2, 0.99).model_dump(), {**cell(2.5e-4, 4, 0.6, 0.93).model_dump(), "chosen": True}]
    fold = {"grid": "cpu", "grid_cells": cells, "grid_retain_floor": 0.9, "grid_wall_seconds": 120.0}
    text = "\n".join(grid_lines({"npo": {"folds": [fold, fold]}, "target": {}}))
    assert "| npo | 1 | 0.00025 |  | 4 | 10 | 0.600 | 0.930 | **chosen** |" in text
    with_options = {**fold, "grid_cells": [{**cells[1], "options": {"alpha": 10.0}}]}
    assert "| rmu | 0 | 0.00025 | alpha=10 | 4 |" in "\n".join(grid_lines({"rmu": {"folds": [with_options]}}))
    assert "at least 0.9 of the target's" in text and "npo fold 1: 120 s" in text
    assert grid_lines({"npo": {"folds": [{"model_dir": "x"}]}}) == []


@pytest.mark.parametrize("name", sorted(GRIDS))
def test_every_grid_holds_its_presets_default_cell_for_every_baseline(name):
    grid = GRIDS[name]
    for method in BASELINES:
        default = default_baseline_config(method, "full" if name == "full" else "mini")
        assert default.learning_rate in grid.rates(method) and default.epochs in grid.epochs, (name, method)
    assert GRIDS["cpu"].rates("rmu") != GRIDS["cpu"].rates("npo")
    for method in BASELINES:  # the defaults come first: a grid that tries a baseline's options also tries none
        assert grid.option_sets(method)[0] == {}, (name, method)


def test_a_diverging_rate_keeps_what_it_scored_and_the_grid_goes_on(tiny_grid, monkeypatch):
    refs, forget, retain, scorer, base, grid = tiny_grid
    real_run = bg.run_baseline

    def diverge_late(method, refs, cfg, forget, retain, on_checkpoint, checkpoints, progress):
        if cfg.learning_rate != 3e-2:
            return real_run(method, refs, cfg, forget, retain, on_checkpoint, checkpoints, progress)
        return real_run(method, refs, cfg, forget, retain, explode_after_first, checkpoints, progress)

    def explode_after_first(epochs, result, model, tokenizer):
        found_so_far.checkpoint(epochs, result, model, tokenizer)
        raise FloatingPointError("grad_diff: non-finite loss at step 2")

    found_so_far = bg._GridSearch("grad_diff", refs, base, grid, forget, retain, scorer)
    monkeypatch.setattr(bg, "run_baseline", diverge_late)
    found = found_so_far.run()
    assert [(c.learning_rate, c.epochs) for c in found.cells] == [(1e-3, 1), (1e-3, 2), (3e-2, 1)]
    assert found.diverged == [{"learning_rate": 3e-2, "error": "grad_diff: non-finite loss at step 2"}]
    assert sum(c.chosen for c in found.cells) == 1


def test_a_grid_cut_short_leaves_no_model_behind(tiny_grid, tmp_path, monkeypatch):
    refs, forget, retain, scorer, base, grid = tiny_grid
    real_run = bg.run_baseline

    def interrupted(method, refs, cfg, *args):
        if cfg.learning_rate == 3e-2:
            raise KeyboardInterrupt
        return real_run(method, refs, cfg, *args)

    monkeypatch.setattr(bg, "run_baseline", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_grid("grad_diff", refs, base, grid, forget, retain, scorer)
    assert baseline_dirs(tmp_path / "grid") == []  # a rerun must not take a half-searched best as found


def test_checkpoints_that_fall_on_one_update_are_refused(tiny_grid):
    refs, forget, retain, _, base, _ = tiny_grid  # 4 forget items at batch 2: 2 updates per epoch
    with pytest.raises(ValueError, match="fall on one update"):
        run_baseline("grad_diff", refs, base, forget, retain, lambda *a: None, [0.1, 0.4], progress=False)
