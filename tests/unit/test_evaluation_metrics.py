"""TOFU / open-unlearning metric definitions against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from unlearnd.evaluation import metrics as M
from unlearnd.evaluation.metrics import ItemRecord, RunRecords, SplitRecords


def test_normalised_probability_is_geometric_mean_of_token_probs():
    lp = [math.log(0.5), math.log(0.125)]
    # P(a|q) = 1/16 over 2 tokens -> (1/16)^(1/2) = 0.25
    assert M.normalised_probability(lp) == pytest.approx(0.25)


def test_probability_over_options_normalises_true_against_false():
    true_lp = [math.log(0.5)]  # p_true = 0.5
    false_lps = [[math.log(0.25)], [math.log(0.25), math.log(0.25)]]  # 0.25 and 0.25
    assert M.probability_over_options(true_lp, false_lps) == pytest.approx(0.5 / (0.5 + 0.5))


def test_truth_ratio_uses_geometric_mean_of_perturbed_over_paraphrased():
    para = [math.log(0.5)] * 3  # p = 0.5
    # perturbed p = 0.1 and 0.4 -> geometric mean 0.2 -> TR = 0.2 / 0.5 = 0.4
    perturbed = [[math.log(0.1)] * 2, [math.log(0.4)] * 5]
    assert M.truth_ratio(para, perturbed) == pytest.approx(0.4, rel=1e-6)


def test_truth_ratio_aggregators():
    trs = [0.5, 2.0, 1.0, 4.0]
    # forget: mean(min(TR, 1/TR)) = (0.5 + 0.5 + 1 + 0.25) / 4
    assert M.aggregate_truth_ratio(trs, "closer_to_1_better") == pytest.approx(2.25 / 4, rel=1e-6)
    # others: mean(max(0, 1 - TR)) = (0.5 + 0 + 0 + 0) / 4
    assert M.aggregate_truth_ratio(trs, "true_better") == pytest.approx(0.125)
    with pytest.raises(ValueError):
        M.aggregate_truth_ratio(trs, "bogus")


def test_forget_quality_is_ks_p_value():
    a = [0.1, 0.2, 0.3, 0.4, 0.5]
    b = [0.6, 0.7, 0.8, 0.9, 1.0]
    # completely separated samples of 5: D = 1, exact two-sided p = 2 / C(10, 5) = 2/252
    assert M.forget_quality(a, b) == pytest.approx(2 / 252, rel=1e-6)
    assert M.forget_quality(a, a) == pytest.approx(1.0)
    # the 1/TR transform of open-unlearning does not change the KS statistic
    assert M.forget_quality(a, b) == pytest.approx(stats.ks_2samp(a, b).pvalue)


def test_harmonic_mean():
    assert M.harmonic_mean([1.0, 0.5, 0.25]) == pytest.approx(3 / (1 + 2 + 4))
    assert M.harmonic_mean([0.5, 0.0]) == 0.0
    assert math.isnan(M.harmonic_mean([0.5, float("nan")]))


def test_rouge_l_recall_hand_computed():
    # reference tokens: the cat sat on the mat (6); prediction: the cat on a mat -> LCS "the cat on mat" = 4
    assert M.rouge_l_recall("The cat sat on the mat.", "the cat, on a mat") == pytest.approx(4 / 6)
    assert M.rouge_l_recall("", "anything") == 0.0
    assert M.rouge_l_recall("Hina Ameen", "I don't know.") == 0.0
    assert M.lcs_length(list("ABCBDAB"), list("BDCABA")) == 4


def test_rouge_l_matches_rouge_score_package_when_installed():
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    pairs = [
        ("Hina Ameen primarily contributes to the geology genre.", "Hina Ameen writes mostly geology books."),
        ("The author's full name is Hsiao Yun-Hwa.", "The author's name is Hsiao Yun Hwa, a leading writer."),
        ("Running runners ran quickly.", "the runner was running"),
    ]
    for ref, pred in pairs:
        assert M.rouge_l_recall(ref, pred) == pytest.approx(scorer.score(ref, pred)["rougeL"].recall)


def test_extraction_strength_follows_open_unlearning_loop():
    assert M.extraction_strength([True, True, True, True]) == 1.0  # whole answer reproduced
    assert M.extraction_strength([False, True, True, True]) == pytest.approx(0.75)  # suffix from k=1
    assert M.extraction_strength([True, False, True, True]) == pytest.approx(0.5)  # suffix from k=2
    assert M.extraction_strength([True, True, True, False]) == pytest.approx(0.25)  # loop ends at k=n-1
    assert M.extraction_strength([]) == 0.0


def test_min_k_score_and_auc():
    lp = [-0.1, -5.0, -0.2, -3.0, -0.3, -0.4, -0.5, -0.6, -0.7, -0.8]
    # 20% of 10 tokens = 2 lowest: -5, -3 -> score 4
    assert M.min_k_score(lp, 0.2) == pytest.approx(4.0)
    assert M.min_k_score([-2.0], 0.2) == pytest.approx(2.0)  # at least one token
    # AUC: holdout (positives) scores above forget ones in 3 of 4 pairs, 1 tie counted half
    assert M.auc([1.0, 2.0], [2.0, 3.0]) == pytest.approx((1 + 0.5 + 1 + 1) / 4)
    assert M.auc([0.0, 0.1], [5.0, 6.0]) == 1.0


def test_is_gibberish_heuristic():
    assert not M.is_gibberish("Hina Ameen primarily writes in the geology genre.")
    assert M.is_gibberish("%%% ### ))) 123 !!!")
    assert M.is_gibberish("the the the the the the the the the the the the")
    assert M.is_gibberish("Perfectly normal words here.", ppl=5000.0)
    assert not M.is_gibberish("")


def _item(answer_lp, para_lp=None, perturbed=(), generation=None, answer="a b c", hits=None):
    return ItemRecord(
        question="q?",
        answer=answer,
        answer_lp=list(answer_lp),
        paraphrased_lp=para_lp,
        perturbed_lp=[list(p) for p in perturbed],
        generation=generation,
        greedy_hits=hits,
    )


def test_registered_metrics_compute_from_records():
    half = math.log(0.5)
    forget = SplitRecords(
        split="forget",
        items=[
            _item([half, half], [half], [[math.log(0.25)]], generation="a b", hits=[True, True]),
            _item([math.log(0.25)], [math.log(0.25)], [[math.log(0.25)]], generation="x", hits=[False, True]),
        ],
    )
    run = RunRecords(method="m", splits={"forget": forget})
    assert M.METRICS["forget_Q_A_Prob"].compute(run) == pytest.approx((0.5 + 0.25) / 2)
    assert M.METRICS["forget_Q_A_ROUGE"].compute(run) == pytest.approx((2 / 3 + 0) / 2)
    # TRs: 0.25/0.5 = 0.5 and 0.25/0.25 = 1 -> mean(min(TR, 1/TR)) = 0.75
    assert M.METRICS["forget_truth_ratio"].compute(run) == pytest.approx(0.75, rel=1e-6)
    assert M.METRICS["extraction_strength"].compute(run) == pytest.approx((1.0 + 0.5) / 2)
    # no retain run / no holdout / no utility splits: None, never a number
    assert M.METRICS["forget_quality"].compute(run, None) is None
    assert M.METRICS["mia_min_k_auc"].compute(run) is None
    assert M.METRICS["model_utility"].compute(run) is None
    assert M.METRICS["forget_quality"].compute(run, run) == pytest.approx(1.0)


def test_model_utility_is_harmonic_mean_of_nine_parts():
    half, quarter = math.log(0.5), math.log(0.25)

    def split(name, with_para):
        return SplitRecords(
            split=name,
            items=[
                _item([half], [half] if with_para else None, [[quarter]], generation="a b c"),
            ],
        )

    run = RunRecords(
        method="m",
        splits={
            "retain": split("retain", True),
            "real_authors": split("real_authors", False),
            "world_facts": split("world_facts", False),
        },
    )
    parts = [M.METRICS[p].compute(run) for p in M.MODEL_UTILITY_PARTS]
    # prob 0.5, ROUGE 1, TR = 0.25/0.5 -> 1 - TR = 0.5; normalised prob = 0.5/(0.5+0.25) = 2/3
    assert parts == pytest.approx([0.5, 1.0, 0.5, 2 / 3, 1.0, 0.5, 2 / 3, 1.0, 0.5], rel=1e-6)
    expected = 9 / sum(1 / np.array(parts))
    assert M.METRICS["model_utility"].compute(run) == pytest.approx(expected)


def _utility_run(n: int, seed: int = 0, route: str | None = None) -> RunRecords:
    """n random items in forget, retain, real_authors and world_facts (all with perturbed answers)."""
    rng = np.random.default_rng(seed)

    def items(name: str) -> SplitRecords:
        out = []
        for i in range(n):
            lp = list(np.log(rng.uniform(0.05, 0.95, 3)))
            item = _item(
                lp,
                list(np.log(rng.uniform(0.05, 0.95, 2))) if name in ("forget", "retain") else None,
                [list(np.log(rng.uniform(0.05, 0.95, 2))) for _ in range(3)],
                generation="a b" if i % 2 else "c",
            )
            item.question = f"{name} question {i}?"
            item.route = route
            out.append(item)
        return SplitRecords(split=name, items=out)

    return RunRecords(method="m", splits={s: items(s) for s in ("forget", "retain", "real_authors", "world_facts")})


def test_a_refused_split_has_no_probabilities_and_says_why():
    """Refuse never calls the model: its scores are not measurements, so every metric built on them is
    None with the reason, while what the user got (ROUGE of the refusal, share refused) is measured."""
    run = _utility_run(6, route="none")
    retain = _utility_run(6, seed=1)
    for it in run.splits["forget"].items[:2]:
        it.route = "refuse"
    values = M.compute_all(run, retain)
    for name in ("forget_Q_A_Prob", "forget_truth_ratio", "forget_quality", "extraction_strength"):
        assert values[name] is None, name
    assert values["forget_Q_A_ROUGE"] is not None and values["forget_refused_share"] == pytest.approx(2 / 6)
    assert values["model_utility"] is not None and values["retain_refused_share"] == 0.0  # retain was answered
    reasons = M.not_applicable(run, retain, values)
    assert "2 of 6 forget items routed to refuse" in reasons["forget_quality"]
    assert "2 of 6 forget items routed to refuse" in reasons["forget_Q_A_Prob"]
    assert M.not_applicable(_utility_run(6), retain)["mia_min_k_auc"] == "holdout not evaluated"
    assert "forget_Q_A_ROUGE" not in reasons
    run.splits["retain"].items[0].route = "refuse"
    values = M.compute_all(run, retain)
    assert values["model_utility"] is None
    assert M.not_applicable(run, retain, values)["model_utility"].startswith("retain_Q_A_Prob: 1 of 6 retain items")
    assert M.not_applicable(run, None)["forget_quality"] == "no retain-model forget records to compare with"


def test_bootstrap_intervals_cover_the_estimate_and_shrink_with_more_items():
    small, large = _utility_run(10), _utility_run(160)
    retain_small, retain_large = _utility_run(10, seed=3), _utility_run(160, seed=3)
    a = M.bootstrap_intervals(small, retain_small, n_resamples=300)
    b = M.bootstrap_intervals(large, retain_large, n_resamples=300)
    for run, retain, ci in ((small, retain_small, a), (large, retain_large, b)):
        values = M.compute_all(run, retain)
        for name in ("model_utility", "forget_Q_A_ROUGE"):
            lo, hi = ci[name]
            assert lo <= values[name] <= hi, name
        assert 0.0 <= ci["forget_quality"][0] <= ci["forget_quality"][1] <= 1.0
    width = {name: (a[name][1] - a[name][0], b[name][1] - b[name][0]) for name in ("model_utility", "forget_Q_A_ROUGE")}
    assert all(w_large < w_small for w_small, w_large in width.values()), width
    # the same records compared with themselves: paired resampling keeps the KS p-value at 1
    assert M.bootstrap_intervals(small, small, n_resamples=50)["forget_quality"] == [1.0, 1.0]
    assert M.bootstrap_intervals(small, None, n_resamples=0) == {name: None for name in M.INTERVAL_METRICS}
    # deterministic for a seed
    assert M.bootstrap_intervals(small, retain_small, n_resamples=100) == M.bootstrap_intervals(
        small, retain_small, n_resamples=100
    )


def test_metric_code_version_is_a_digest_of_the_metric_module():
    import hashlib
    from pathlib import Path

    assert M.metric_code_version() == hashlib.sha256(Path(M.__file__).read_bytes()).hexdigest()[:12]
