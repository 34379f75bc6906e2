"""Calibration math: thresholds for a target FPR, rates, AUROC, the OOD weight map."""

import numpy as np
import pytest

from unlearnd.detectors.calibration import (
    auroc,
    calibrate,
    conformal_threshold,
    rates,
    tpr_at_fpr,
)
from unlearnd.detectors.ood import weight_from_calibration


def test_conformal_threshold_rank():
    neg = np.arange(1, 100, dtype=float)  # 99 negatives: 1..99
    # ceil((99+1) * 0.9) = 90 -> the 90th smallest = 90; flag iff score > 90 -> 9/99 negatives flagged
    assert conformal_threshold(neg, 0.10) == 90.0
    # ceil(100 * 0.99) = 99 -> the largest negative: no calibration negative is flagged
    assert conformal_threshold(neg, 0.01) == 99.0
    assert conformal_threshold(neg[::-1], 0.10) == 90.0  # order does not matter


def test_conformal_threshold_too_few_negatives_uses_max():
    assert conformal_threshold(np.array([0.1, 0.5, 0.3]), 0.01) == 0.5
    with pytest.raises(ValueError):
        conformal_threshold(np.array([]), 0.01)


def test_calibrate_reports_achieved_rates():
    neg = np.linspace(0, 1, 199)
    pos = np.array([0.5, 0.97, 0.995, 2.0])
    cal = calibrate(pos, neg, 0.05)
    k = int(np.ceil(200 * 0.95))  # 190th smallest
    assert cal.threshold == pytest.approx(neg[k - 1])
    assert cal.fpr == pytest.approx((neg > cal.threshold).mean())
    assert cal.fpr <= 0.05
    assert cal.tpr == pytest.approx(0.75)  # 0.5 is below the cut, the others above
    assert cal.n_neg == 199 and cal.n_pos == 4
    # the normalised score is 0.5 exactly at the threshold and increases with the score
    norm = cal.normalised(np.array([cal.threshold, cal.threshold + 1]))
    assert norm[0] == pytest.approx(0.5) and norm[1] > 0.9


def test_rates_strict_inequality():
    assert rates(np.array([1.0, 2.0]), np.array([1.0, 0.0]), 1.0) == (0.5, 0.0)


def test_auroc_hand_computed():
    # pairs (pos > neg): 3>1, 3>2, 2>1, tie 2=2 counts 1/2; 1>1 tie 1/2; 1<2 -> (3 + 1) / 6
    assert auroc(np.array([3.0, 2.0, 1.0]), np.array([1.0, 2.0])) == pytest.approx(4 / 6)
    assert auroc(np.array([5.0, 6.0]), np.array([1.0, 2.0])) == 1.0
    assert auroc(np.array([1.0]), np.array([1.0])) == 0.5


def test_tpr_at_fpr_oracle():
    neg = np.arange(100, dtype=float)  # 0..99
    pos = np.array([98.5, 99.5, 150.0, 50.0])
    tpr, thr = tpr_at_fpr(pos, neg, 0.01)  # one negative may pass: threshold = 98
    assert thr == 98.0
    assert tpr == pytest.approx(0.75)


def test_weight_map_from_heldout_scores():
    heldout = np.sort(np.array([-4.0, -3.0, -2.0, -1.0]))
    w = weight_from_calibration(np.array([-10.0, -3.0, -2.0, 0.0]), heldout)
    # below all -> 0; at the 2nd of 4 -> ECDF 0.5 -> 1.0; cap at 1
    assert w.tolist() == [0.0, 1.0, 1.0, 1.0]
    assert weight_from_calibration(np.array([-4.0]), heldout)[0] == pytest.approx(0.5)
