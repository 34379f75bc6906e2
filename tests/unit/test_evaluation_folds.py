"""Cross-fitting on the real TOFU mini splits: what a method is fit on is never what it is measured on."""

from __future__ import annotations

from collections import Counter

import pytest

from unlearnd.data.tofu import TofuData
from unlearnd.evaluation.folds import check_disjoint, make_folds, pool_runs
from unlearnd.evaluation.metrics import ItemRecord, RunRecords, SplitRecords
from unlearnd.evaluation.tofu import eval_splits
from unlearnd.train.reference import ReferenceModels, preset, reference_data


@pytest.fixture(scope="module")
def mini(tofu):
    data = TofuData(tofu, allow_hub=False)
    p = preset("mini")
    refs = ReferenceModels(preset=p, target_dir="/t", retain_dir="/r", data=reference_data(p, data))
    splits = eval_splits(refs, data, {"forget": None, "retain": None})
    return data, refs, splits


def test_two_folds_fit_on_half_of_each_author_and_are_measured_on_the_other_half(mini):
    data, refs, splits = mini
    forget = data.split(refs.preset.forget_split)
    folds = make_folds(splits, forget, refs.data.retain_items)
    assert len(splits.forget) == 40 and len(splits.retain) == 120  # every forget01 and mini retain item
    for fold in folds:
        check_disjoint(fold, splits)
        measured = fold.eval_splits(splits)
        assert len(fold.fit_forget) == 20 and len(measured.forget) == 20
        assert Counter(it.author for it in fold.fit_forget) == Counter(it.author for it in measured.forget)
        assert len(fold.fit_retain) == 60 and len(measured.retain) == 60
        fit_authors = {it.author for it in fold.fit_retain}
        assert fit_authors.isdisjoint({it.author for it in measured.retain})  # retain authors in no request
        fit = {it.question for it in fold.fit_forget}
        assert not fit & {it.question for it in measured.forget}
    # pooled, every item is measured exactly once
    for name, items in splits.as_dict().items():
        seen = sorted(i for fold in folds for i in fold.eval_indices[name])
        assert seen == list(range(len(items))), name
    assert {it.question for it in folds[0].fit_forget} | {it.question for it in folds[1].fit_forget} == {
        it.question for it in forget
    }


def test_pooled_runs_come_back_in_the_splits_order_and_refuse_gaps(mini):
    data, refs, splits = mini
    folds = make_folds(splits, data.split(refs.preset.forget_split), refs.data.retain_items)

    def run_of(fold):
        measured = fold.eval_splits(splits)
        return RunRecords(
            method="m",
            splits={
                name: SplitRecords(
                    split=name, items=[ItemRecord(question=it.question, answer=f"fold {fold.index}") for it in items]
                )
                for name, items in measured.as_dict().items()
                if items
            },
        )

    runs = [run_of(f) for f in folds]
    pooled = pool_runs("m", splits, folds, runs)
    for name, items in splits.as_dict().items():
        assert [r.question for r in pooled.splits[name].items] == [it.question for it in items]
    assert {r.answer for r in pooled.splits["forget"].items} == {"fold 0", "fold 1"}
    runs[1].splits["retain"].items.pop()
    with pytest.raises(ValueError, match="retain"):
        pool_runs("m", splits, folds, runs)


def test_a_fold_needs_two_retain_authors_and_known_forget_items(mini):
    data, refs, splits = mini
    forget = data.split(refs.preset.forget_split)
    with pytest.raises(ValueError, match="retain authors"):
        make_folds(splits, forget, [it for it in refs.data.retain_items if it.author == refs.data.retain_authors[0]])
    with pytest.raises(ValueError, match="not in the forget split"):
        make_folds(splits, forget[:10], refs.data.retain_items)
    with pytest.raises(ValueError, match="at least 2"):
        make_folds(splits, forget, refs.data.retain_items, n_folds=1)


def test_an_evaluation_subset_that_misses_a_fold_is_refused(mini):
    """`--limit forget=20` by every other item would leave one fold measured on nothing."""
    data, refs, splits = mini
    half = splits.model_copy(update={"forget": splits.forget[0::2]})
    with pytest.raises(ValueError, match="measured on no forget item"):
        make_folds(half, data.split(refs.preset.forget_split), refs.data.retain_items)


def test_seeds_expand_once_per_seed_for_methods_that_train_with_one():
    from unlearnd.evaluation.tofu import expand_seeds

    rows = expand_seeds(["target", "npo", "refuse", "lora", "npo"], [0, 1, 1])
    assert rows == [
        ("target", "target", 0),
        ("npo", "npo", 0),
        ("npo@seed1", "npo", 1),
        ("refuse", "refuse", 0),
        ("lora", "lora", 0),
        ("lora@seed1", "lora", 1),
    ]
