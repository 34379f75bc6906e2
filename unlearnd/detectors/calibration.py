"""Threshold calibration from data: pick the score cut that keeps false positives under a target.

Split-conformal rule: with n held-out negative scores, flag a prompt when its score exceeds the
ceil((n+1)(1-alpha))-th smallest of them. If new negatives are exchangeable with the calibration
ones, P(false positive) <= alpha, whatever the score's distribution. With too few negatives for
the target (n+1 < 1/alpha) the cut is the largest negative score, and the artifact records that
the guarantee is weaker (`n_neg`).
"""

from __future__ import annotations

import math

import numpy as np
from pydantic import BaseModel


class Calibration(BaseModel):
    """A chosen threshold and what it achieved on the calibration data (flag iff score > threshold)."""

    threshold: float
    target_fpr: float
    tpr: float | None  # None: no positive held out to measure it on
    fpr: float
    n_pos: int
    n_neg: int
    scale: float = 1.0  # spread of negative scores, used to map scores to a comparable [0, 1]

    def normalised(self, scores: np.ndarray) -> np.ndarray:
        """Map raw scores to (0, 1) with 0.5 exactly at the threshold, so requests compare."""
        z = (np.asarray(scores, dtype=np.float64) - self.threshold) / max(self.scale, 1e-6)
        return 1.0 / (1.0 + np.exp(-4.0 * z))


def conformal_threshold(neg_scores: np.ndarray, target_fpr: float) -> float:
    """The cut t with flag iff score > t, giving FPR <= target_fpr on exchangeable negatives."""
    neg = np.sort(np.asarray(neg_scores, dtype=np.float64))
    n = len(neg)
    if n == 0:
        raise ValueError("calibration needs at least one negative score")
    k = math.ceil((n + 1) * (1.0 - target_fpr))  # 1-based rank
    k = min(max(k, 1), n)
    return float(neg[k - 1])


def rates(pos_scores: np.ndarray, neg_scores: np.ndarray, threshold: float) -> tuple[float, float]:
    """(TPR, FPR) of the rule score > threshold."""
    pos, neg = np.asarray(pos_scores), np.asarray(neg_scores)
    tpr = float((pos > threshold).mean()) if len(pos) else float("nan")
    fpr = float((neg > threshold).mean()) if len(neg) else float("nan")
    return tpr, fpr


def calibrate(pos_scores: np.ndarray, neg_scores: np.ndarray, target_fpr: float) -> Calibration:
    threshold = conformal_threshold(neg_scores, target_fpr)
    tpr, fpr = rates(pos_scores, neg_scores, threshold)
    neg = np.asarray(neg_scores, dtype=np.float64)
    scale = float(np.std(neg)) if len(neg) > 1 else 1.0
    return Calibration(
        threshold=threshold,
        target_fpr=target_fpr,
        tpr=tpr if len(pos_scores) else None,
        fpr=fpr,
        n_pos=len(pos_scores),
        n_neg=len(neg),
        scale=scale or 1.0,
    )


def auroc(pos_scores: np.ndarray, neg_scores: np.ndarray) -> float:
    """Area under the ROC curve = P(pos > neg) + P(tie)/2 (Mann-Whitney), no sklearn needed."""
    pos, neg = np.asarray(pos_scores, np.float64), np.asarray(neg_scores, np.float64)
    if not len(pos) or not len(neg):
        return float("nan")
    allv = np.concatenate([pos, neg])
    order = allv.argsort(kind="mergesort")
    ranks = np.empty(len(allv))
    sorted_v = allv[order]
    # average ranks for ties
    i = 0
    while i < len(allv):
        j = i
        while j + 1 < len(allv) and sorted_v[j + 1] == sorted_v[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    u = ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2.0
    return float(u / (len(pos) * len(neg)))


def tpr_at_fpr(pos_scores: np.ndarray, neg_scores: np.ndarray, max_fpr: float) -> tuple[float, float]:
    """Best TPR over thresholds whose empirical FPR <= max_fpr (oracle; for reporting only)."""
    neg = np.sort(np.asarray(neg_scores, np.float64))[::-1]
    n_allowed = int(math.floor(max_fpr * len(neg)))
    threshold = neg[n_allowed] if n_allowed < len(neg) else -np.inf
    return rates(pos_scores, neg_scores, float(threshold))[0], float(threshold)
