"""Cross-fitting: what a method may learn from, and what it is measured on instead.

A method that is measured on the questions it was fit on (a served request registered with them, a
baseline trained on them, ECO tuned on them) scores by construction. So the forget set is cut in
`n_folds` folds by each question's position within its author (every author is in every fold), the
retain authors are dealt out to the folds whole, and fold k's method is fit on fold k and measured
on fold k+1: on forget questions it never saw (with their paraphrases and perturbations) and on
retain authors that are in no request. Pooled over the folds every evaluation item is measured
exactly once, by a method that never saw it; real_authors / world_facts / holdout items, which no
method is fit on, are dealt out the same way so the cost of a method stays one pass over the items.
"""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import BaseModel, Field

from unlearnd.domain import QAItem
from unlearnd.evaluation.metrics import RunRecords, SplitRecords

N_FOLDS = 2


class EvalSplits(BaseModel):
    """The items of each evaluation split (forget carries paraphrased / perturbed answers)."""

    forget: list[QAItem]
    retain: list[QAItem]
    real_authors: list[QAItem]
    world_facts: list[QAItem]
    holdout: list[QAItem] = Field(default_factory=list)

    def as_dict(self) -> dict[str, list[QAItem]]:
        return {
            "forget": self.forget,
            "retain": self.retain,
            "real_authors": self.real_authors,
            "world_facts": self.world_facts,
            "holdout": self.holdout,
        }


class Fold(BaseModel):
    """One fold: the QA a method is fit on, and the evaluation items (by index) it is measured on."""

    index: int
    n_folds: int
    fit_forget: list[QAItem]
    fit_retain: list[QAItem]
    eval_indices: dict[str, list[int]]  # split -> indices into the full evaluation split

    def eval_splits(self, splits: EvalSplits) -> EvalSplits:
        full = splits.as_dict()
        return EvalSplits(**{name: [full[name][i] for i in idx] for name, idx in self.eval_indices.items()})


def position_in_author(items: Sequence[QAItem]) -> dict[str, int]:
    """Each question's position among its author's questions (in the split's order)."""
    seen: dict[int | None, int] = {}
    out: dict[str, int] = {}
    for it in items:
        out[it.question] = seen.get(it.author, 0)
        seen[it.author] = out[it.question] + 1
    return out


def make_folds(
    splits: EvalSplits,
    forget_items: Sequence[QAItem],
    retain_items: Sequence[QAItem],
    n_folds: int = N_FOLDS,
) -> list[Fold]:
    """`n_folds` folds over the whole forget split (`forget_items`) and the retain authors' QA.

    Fold k fits on forget questions at positions p with p % n == k and on the retain authors dealt to
    k; it is measured on forget items with p % n == k+1, on retain items of authors dealt to k+1, and
    on every n-th item of the other splits."""
    if n_folds < 2:
        raise ValueError("cross-fitting needs at least 2 folds")
    position = position_in_author(forget_items)
    missing = [it.question for it in splits.forget if it.question not in position]
    if missing:
        raise ValueError(f"evaluation forget items not in the forget split: {missing[:3]}")
    authors = sorted({it.author for it in retain_items if it.author is not None})
    author_fold = {a: i % n_folds for i, a in enumerate(authors)}
    if len(authors) < n_folds:
        raise ValueError(f"{len(authors)} retain authors cannot be dealt to {n_folds} folds")

    def fold_of(split: str, i: int, it: QAItem) -> int:
        if split == "forget":
            return position[it.question] % n_folds
        if split == "retain":
            if it.author not in author_fold:
                raise ValueError(f"retain item of author {it.author}, not one of the retain authors")
            return author_fold[it.author]
        return i % n_folds

    folds = []
    for k in range(n_folds):
        measured = (k + 1) % n_folds
        folds.append(
            Fold(
                index=k,
                n_folds=n_folds,
                fit_forget=[it for it in forget_items if position[it.question] % n_folds == k],
                fit_retain=[it for it in retain_items if author_fold.get(it.author) == k],
                eval_indices={
                    name: [i for i, it in enumerate(items) if fold_of(name, i, it) == measured]
                    for name, items in splits.as_dict().items()
                },
            )
        )
    for fold in folds:
        for name in ("forget", "retain"):
            if getattr(splits, name) and not fold.eval_indices[name]:
                raise ValueError(
                    f"fold {fold.index} would be measured on no {name} item: the evaluation subset "
                    f"({len(getattr(splits, name))} items) misses one fold; take all of the split or another size"
                )
    return folds


def check_disjoint(fold: Fold, splits: EvalSplits) -> None:
    """Raise if any question a fold fits on is one it is measured on (the point of the folds)."""
    fit = {it.question for it in (*fold.fit_forget, *fold.fit_retain)}
    measured = fold.eval_splits(splits)
    overlap = [it.question for items in measured.as_dict().values() for it in items if it.question in fit]
    if overlap:
        raise AssertionError(f"fold {fold.index} is measured on {len(overlap)} questions it fits on: {overlap[:2]}")


def pool_runs(method: str, splits: EvalSplits, folds: Sequence[Fold], runs: Sequence[RunRecords]) -> RunRecords:
    """One run over the whole evaluation splits from each fold's run over its own items (canonical order)."""
    sizes = {name: len(items) for name, items in splits.as_dict().items()}
    slots: dict[str, list] = {name: [None] * n for name, n in sizes.items()}
    for fold, run in zip(folds, runs, strict=True):
        for name, idx in fold.eval_indices.items():
            if not idx:
                continue
            records = run.get(name)
            if records is None or len(records.items) != len(idx):
                raise ValueError(f"fold {fold.index} of {method} has no complete {name!r} records")
            for i, item in zip(idx, records.items):
                slots[name][i] = item
    pooled = RunRecords(method=method)
    for name, items in slots.items():
        if not items:
            continue
        if any(it is None for it in items):
            raise ValueError(f"{method}: the folds do not cover every {name!r} item")
        pooled.splits[name] = SplitRecords(split=name, items=items)
    return pooled
