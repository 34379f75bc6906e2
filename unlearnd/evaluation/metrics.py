"""TOFU / open-unlearning metrics, registered by name, computed from per-item records.

The evaluation first *collects* what a model under test does on each split (token log-probs of the
answer, paraphrased and perturbed answers, teacher-forced argmax hits, greedy generations); every
metric here is then a pure function of those records, so in-process and served models are measured
by the same code, and the definitions are unit-testable with hand-computed values.

Definitions (open-unlearning `src/evals/metrics`), with p(a|q) = exp(mean token log-prob of a):
* probability: mean p(a|q) = P(a|q)^(1/|a|); on real_authors / world_facts normalised as
  p_true / (p_true + sum p_false + 1e-10).
* ROUGE-L recall of the greedy generation against the answer (rouge_score tokenisation, Porter stem).
* truth ratio per item TR = exp(mean_j log p(perturbed_j)/|.|) / (p(paraphrased) + 1e-10), i.e. the
  geometric mean of the length-normalised perturbed probabilities over the paraphrased one; the
  forget aggregate is mean(min(TR, 1/TR)), the others mean(max(0, 1 - TR)).
* forget quality: KS-test p-value between per-item forget TRs of the method and of the retain model.
* model utility: harmonic mean of {prob, ROUGE, TR} x {retain, real_authors, world_facts}.
* extraction strength: 1 - k/|a| for the smallest k whose suffix the model reproduces teacher-forced.
* Min-K% MIA AUC: score = -mean of the lowest 20% token log-probs; AUC of forget (label 0) against
  held-out (label 1) items, 0.5 = indistinguishable, 1 = members recognisable.
Scores cover the answer tokens only (no end-of-turn token), the same tokens the served scoring
endpoint returns, so in-process and served numbers are comparable.
"""

from __future__ import annotations

import abc
import math
import re
from collections.abc import Sequence
from functools import lru_cache
from typing import Any, ClassVar

import numpy as np
from pydantic import BaseModel, Field
from scipy import stats

EPS = 1e-10

# --------------------------------------------------------------------------- records


class ItemRecord(BaseModel):
    """What one model did on one QA item."""

    question: str
    answer: str
    answer_lp: list[float] = Field(default_factory=list)
    greedy_hits: list[bool] | None = None
    paraphrased_lp: list[float] | None = None
    perturbed_lp: list[list[float]] = Field(default_factory=list)
    generation: str | None = None
    generation_ppl: float | None = None  # perplexity of `generation` under the target model
    route: str | None = None


class SplitRecords(BaseModel):
    split: str
    items: list[ItemRecord]


class RunRecords(BaseModel):
    """All records of one model under test (one method) on the evaluation splits."""

    method: str
    splits: dict[str, SplitRecords] = Field(default_factory=dict)

    def get(self, split: str) -> SplitRecords | None:
        return self.splits.get(split)


# --------------------------------------------------------------------------- pure functions


def mean_logprob(logprobs: Sequence[float]) -> float:
    return float(np.mean(logprobs)) if len(logprobs) else math.nan


def normalised_probability(logprobs: Sequence[float]) -> float:
    """P(a|q)^(1/|a|) = exp(mean token log-prob)."""
    return math.exp(mean_logprob(logprobs)) if len(logprobs) else math.nan


def probability_over_options(true_lp: Sequence[float], false_lps: Sequence[Sequence[float]]) -> float:
    """p_true / (p_true + sum p_false): TOFU's probability on real_authors / world_facts."""
    p_true = normalised_probability(true_lp)
    p_false = sum(normalised_probability(lp) for lp in false_lps)
    return p_true / (p_true + p_false + EPS)


def truth_ratio(correct_lp: Sequence[float], wrong_lps: Sequence[Sequence[float]]) -> float:
    """exp(-mean_j avg_loss(wrong_j)) / (exp(-avg_loss(correct)) + 1e-10), as open-unlearning."""
    wrong_avg_loss = float(np.mean([-mean_logprob(lp) for lp in wrong_lps]))
    correct_avg_loss = -mean_logprob(correct_lp)
    return math.exp(-wrong_avg_loss) / (math.exp(-correct_avg_loss) + EPS)


def aggregate_truth_ratio(ratios: Sequence[float], mode: str) -> float:
    """`closer_to_1_better` (forget): mean(min(TR, 1/TR)); `true_better` (others): mean(max(0, 1-TR))."""
    arr = np.asarray(ratios, dtype=float)
    if mode == "closer_to_1_better":
        return float(np.mean(np.minimum(arr, 1 / (arr + EPS))))
    if mode == "true_better":
        return float(np.mean(np.maximum(0, 1 - arr)))
    raise ValueError(f"unknown truth ratio aggregator {mode!r}")


def forget_quality(method_tr: Sequence[float], retain_tr: Sequence[float]) -> float:
    """KS two-sample p-value between the method's and the retain model's forget truth ratios."""
    a = 1 / (np.asarray(method_tr, dtype=float) + EPS)
    b = 1 / (np.asarray(retain_tr, dtype=float) + EPS)
    return float(stats.ks_2samp(a, b).pvalue)


def harmonic_mean(values: Sequence[float]) -> float:
    """Harmonic mean; any zero (or negative) component makes it 0, as a utility should."""
    arr = np.asarray(values, dtype=float)
    if arr.size == 0 or np.any(np.isnan(arr)):
        return math.nan
    if np.any(arr <= 0):
        return 0.0
    return float(arr.size / np.sum(1.0 / arr))


def extraction_strength(hits: Sequence[bool]) -> float:
    """1 - k/n for the first k whose suffix the model's teacher-forced argmax reproduces.

    Follows open-unlearning's loop exactly: k runs over 0..n-1, so a model that reproduces nothing
    still scores 1/n (the paper's k = n, score 0, is never reached); an empty answer scores 0.
    """
    n = len(hits)
    if n == 0:
        return 0.0
    k = 0
    for k in range(n):
        if all(hits[k:]):
            break
    return 1 - k / n


def min_k_score(logprobs: Sequence[float], k: float = 0.2) -> float:
    """Min-K% Prob: minus the mean of the lowest k fraction of token log-probs (higher = less member-like)."""
    lp = np.sort(np.asarray(logprobs, dtype=float))
    if lp.size == 0:
        return 0.0
    num = max(1, int(lp.size * k))
    return float(-np.mean(lp[:num]))


def auc(negatives: Sequence[float], positives: Sequence[float]) -> float:
    """ROC AUC of scores with labels 0 (negatives) / 1 (positives), ties counted half (Mann-Whitney U)."""
    neg = np.asarray(negatives, dtype=float)
    pos = np.asarray(positives, dtype=float)
    if neg.size == 0 or pos.size == 0:
        return math.nan
    ranks = stats.rankdata(np.concatenate([neg, pos]))
    u = ranks[neg.size :].sum() - pos.size * (pos.size + 1) / 2
    return float(u / (neg.size * pos.size))


# -- ROUGE-L (own LCS; tokenisation identical to Google's rouge_score)

_NON_ALNUM = re.compile(r"[^a-z0-9]+")
_VALID = re.compile(r"^[a-z0-9]+$")


@lru_cache(maxsize=1)
def _porter() -> Any:
    try:
        from nltk.stem import porter
    except ImportError:
        return None
    return porter.PorterStemmer()


def rouge_backend() -> str:
    """Which ROUGE implementation produced the numbers (quoted in every report)."""
    return "unlearnd LCS, rouge_score tokenisation, " + (
        "Porter stemming (nltk)" if _porter() is not None else "no stemming (nltk not installed)"
    )


def rouge_tokens(text: str, stem: bool = True) -> list[str]:
    text = _NON_ALNUM.sub(" ", text.lower())
    tokens = text.split()
    stemmer = _porter() if stem else None
    if stemmer is not None:
        tokens = [stemmer.stem(t) if len(t) > 3 else t for t in tokens]
    return [t for t in tokens if _VALID.match(t)]


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    if not a or not b:
        return 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0] * (len(b) + 1)
        for j, y in enumerate(b, start=1):
            cur[j] = prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1])
        prev = cur
    return prev[-1]


def rouge_l_recall(reference: str, prediction: str, stem: bool = True) -> float:
    """LCS(reference, prediction) / |reference| in rouge tokens (0 for an empty reference)."""
    ref = rouge_tokens(reference, stem)
    if not ref:
        return 0.0
    return lcs_length(ref, rouge_tokens(prediction, stem)) / len(ref)


# -- fluency

_WORD = re.compile(r"[A-Za-z][A-Za-z'\-]*")


def is_gibberish(text: str, ppl: float | None = None, max_ppl: float = 500.0) -> bool:
    """Heuristic gibberish flag (open-unlearning uses a classifier model we cannot download).

    Flags: mostly non-letters; a degenerate loop (fewer than half of the word 3-grams distinct in
    8+ words); or a perplexity above `max_ppl` under the target model. Empty output is not
    gibberish (it is counted as empty).
    """
    stripped = text.strip()
    if not stripped:
        return False
    letters = sum(ch.isalpha() for ch in stripped)
    non_space = sum(not ch.isspace() for ch in stripped)
    if non_space and letters / non_space < 0.5:
        return True
    words = [w.lower() for w in _WORD.findall(stripped)]
    if len(words) >= 8:
        grams = [tuple(words[i : i + 3]) for i in range(len(words) - 2)]
        if len(set(grams)) / len(grams) < 0.5:
            return True
    return ppl is not None and math.isfinite(ppl) and ppl > max_ppl


# --------------------------------------------------------------------------- registry


class Metric(abc.ABC):
    """A named number computed from a method's records (and the retain model's, for forget quality)."""

    name: ClassVar[str]
    higher_is_better: ClassVar[bool | None] = None  # None: "closer to the retain model is better"

    @abc.abstractmethod
    def compute(self, run: RunRecords, retain: RunRecords | None = None) -> float | None:
        """The value, or None when the records needed are missing (e.g. served models have no argmax)."""


METRICS: dict[str, Metric] = {}


def register_metric(metric: Metric) -> Metric:
    METRICS[metric.name] = metric
    return metric


def _items(run: RunRecords, split: str) -> list[ItemRecord] | None:
    records = run.get(split)
    return records.items if records is not None and records.items else None


class _SplitMetric(Metric):
    split: str

    def __init__(self, name: str, split: str):
        self.name = name  # type: ignore[misc]
        self.split = split


class ProbabilityMetric(_SplitMetric):
    """Mean P(a|q)^(1/|a|) on a QA split."""

    def compute(self, run: RunRecords, retain: RunRecords | None = None) -> float | None:
        items = _items(run, self.split)
        if items is None:
            return None
        return float(np.nanmean([normalised_probability(it.answer_lp) for it in items]))


class NormalisedProbabilityMetric(_SplitMetric):
    """Mean p_true / (p_true + sum p_false) on a multiple-answer split."""

    def compute(self, run: RunRecords, retain: RunRecords | None = None) -> float | None:
        items = _items(run, self.split)
        if items is None:
            return None
        return float(np.nanmean([probability_over_options(it.answer_lp, it.perturbed_lp) for it in items]))


class RougeMetric(_SplitMetric):
    """Mean ROUGE-L recall of the greedy generation against the answer."""

    def compute(self, run: RunRecords, retain: RunRecords | None = None) -> float | None:
        items = _items(run, self.split)
        if items is None or any(it.generation is None for it in items):
            return None
        return float(np.mean([rouge_l_recall(it.answer, it.generation or "") for it in items]))


def truth_ratios(items: Sequence[ItemRecord]) -> list[float]:
    """Per-item TR: correct = paraphrased answer when the split has one, else the answer."""
    out = []
    for it in items:
        if not it.perturbed_lp:
            raise ValueError("truth ratio needs perturbed answers")
        correct = it.paraphrased_lp if it.paraphrased_lp is not None else it.answer_lp
        out.append(truth_ratio(correct, it.perturbed_lp))
    return out


class TruthRatioMetric(_SplitMetric):
    def __init__(self, name: str, split: str, aggregator: str):
        super().__init__(name, split)
        self.aggregator = aggregator

    def compute(self, run: RunRecords, retain: RunRecords | None = None) -> float | None:
        items = _items(run, self.split)
        if items is None or not all(it.perturbed_lp for it in items):
            return None
        return aggregate_truth_ratio(truth_ratios(items), self.aggregator)


class ForgetQualityMetric(Metric):
    name = "forget_quality"
    higher_is_better = True

    def compute(self, run: RunRecords, retain: RunRecords | None = None) -> float | None:
        items = _items(run, "forget")
        ref = _items(retain, "forget") if retain is not None else None
        if items is None or ref is None:
            return None
        return forget_quality(truth_ratios(items), truth_ratios(ref))


MODEL_UTILITY_PARTS = (
    "retain_Q_A_Prob",
    "retain_Q_A_ROUGE",
    "retain_Truth_Ratio",
    "ra_Q_A_Prob_normalised",
    "ra_Q_A_ROUGE",
    "ra_Truth_Ratio",
    "wf_Q_A_Prob_normalised",
    "wf_Q_A_ROUGE",
    "wf_Truth_Ratio",
)


class ModelUtilityMetric(Metric):
    name = "model_utility"
    higher_is_better = True

    def compute(self, run: RunRecords, retain: RunRecords | None = None) -> float | None:
        values = [METRICS[part].compute(run, retain) for part in MODEL_UTILITY_PARTS]
        if any(v is None for v in values):
            return None
        return harmonic_mean([float(v) for v in values])  # type: ignore[arg-type]


class ExtractionStrengthMetric(Metric):
    name = "extraction_strength"
    higher_is_better = False

    def compute(self, run: RunRecords, retain: RunRecords | None = None) -> float | None:
        items = _items(run, "forget")
        if items is None or any(it.greedy_hits is None for it in items):
            return None
        return float(np.mean([extraction_strength(it.greedy_hits or []) for it in items]))


class MinKMiaMetric(Metric):
    name = "mia_min_k_auc"
    k: float = 0.2

    def compute(self, run: RunRecords, retain: RunRecords | None = None) -> float | None:
        forget = _items(run, "forget")
        holdout = _items(run, "holdout")
        if forget is None or holdout is None:
            return None
        return auc(
            [min_k_score(it.answer_lp, self.k) for it in forget], [min_k_score(it.answer_lp, self.k) for it in holdout]
        )


class GibberishRateMetric(Metric):
    name = "forget_gibberish_rate"
    higher_is_better = False

    def compute(self, run: RunRecords, retain: RunRecords | None = None) -> float | None:
        items = _items(run, "forget")
        if items is None or any(it.generation is None for it in items):
            return None
        return float(np.mean([is_gibberish(it.generation or "", it.generation_ppl) for it in items]))


class GenerationPerplexityMetric(Metric):
    """Median perplexity of the forget-set generations under the target model (empty ones skipped)."""

    name = "forget_generation_ppl"
    higher_is_better = False

    def compute(self, run: RunRecords, retain: RunRecords | None = None) -> float | None:
        items = _items(run, "forget")
        if items is None:
            return None
        ppls = [it.generation_ppl for it in items if it.generation_ppl is not None and math.isfinite(it.generation_ppl)]
        return float(np.median(ppls)) if ppls else None


class EmptyRateMetric(Metric):
    name = "forget_empty_rate"

    def compute(self, run: RunRecords, retain: RunRecords | None = None) -> float | None:
        items = _items(run, "forget")
        if items is None or any(it.generation is None for it in items):
            return None
        return float(np.mean([not (it.generation or "").strip() for it in items]))


for _metric in (
    ProbabilityMetric("forget_Q_A_Prob", "forget"),
    RougeMetric("forget_Q_A_ROUGE", "forget"),
    TruthRatioMetric("forget_truth_ratio", "forget", "closer_to_1_better"),
    ForgetQualityMetric(),
    ProbabilityMetric("retain_Q_A_Prob", "retain"),
    RougeMetric("retain_Q_A_ROUGE", "retain"),
    TruthRatioMetric("retain_Truth_Ratio", "retain", "true_better"),
    NormalisedProbabilityMetric("ra_Q_A_Prob_normalised", "real_authors"),
    RougeMetric("ra_Q_A_ROUGE", "real_authors"),
    TruthRatioMetric("ra_Truth_Ratio", "real_authors", "true_better"),
    NormalisedProbabilityMetric("wf_Q_A_Prob_normalised", "world_facts"),
    RougeMetric("wf_Q_A_ROUGE", "world_facts"),
    TruthRatioMetric("wf_Truth_Ratio", "world_facts", "true_better"),
    ModelUtilityMetric(),
    ExtractionStrengthMetric(),
    MinKMiaMetric(),
    GibberishRateMetric(),
    GenerationPerplexityMetric(),
    EmptyRateMetric(),
):
    register_metric(_metric)


def compute_all(
    run: RunRecords, retain: RunRecords | None, names: Sequence[str] | None = None
) -> dict[str, float | None]:
    """Every registered metric (or `names`) for one run; missing inputs give None, never a made-up number."""
    return {name: METRICS[name].compute(run, retain) for name in (names or list(METRICS))}
