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
A served route that never calls the model (refuse) has no probabilities: every metric built on them
is None for a split with any refused item, and `not_applicable` says why; what the user got (the
refusal's ROUGE, the share refused) is still measured. `bootstrap_intervals` gives percentile
confidence intervals for the headline numbers by resampling items.
Scores cover the answer tokens only (no end-of-turn token), the same tokens the served scoring
endpoint returns, so in-process and served numbers are comparable.
"""

from __future__ import annotations

import abc
import hashlib
import math
import re
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from pydantic import BaseModel, Field
from scipy import stats

from unlearnd.methods import routes_without_model

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


NO_MODEL_ROUTES = routes_without_model()  # routes whose answer never comes from the model


def refused_count(items: Sequence[ItemRecord]) -> int:
    return sum(it.route in NO_MODEL_ROUTES for it in items)


class Metric(abc.ABC):
    """A named number computed from a method's records (and the retain model's, for forget quality)."""

    name: ClassVar[str]
    higher_is_better: ClassVar[bool | None] = None  # None: "closer to the retain model is better"
    splits: tuple[str, ...] = ()  # the splits it reads
    uses_scores: bool = False  # reads the model's log-probs (undefined where the model never answered)

    @abc.abstractmethod
    def compute(self, run: RunRecords, retain: RunRecords | None = None) -> float | None:
        """The value, or None when the records needed are missing (e.g. served models have no argmax)."""

    def why_missing(self, run: RunRecords, retain: RunRecords | None = None) -> str:
        """Why `compute` gave None (see `not_applicable`)."""
        for split in self.splits:
            records = run.get(split)
            if records is None or not records.items:
                return f"{split} not evaluated"
            refused = refused_count(records.items)
            if self.uses_scores and refused:
                return (
                    f"{refused} of {len(records.items)} {split} items routed to refuse: a refusal never calls the "
                    "model, so it has no probability to measure"
                )
        return "its inputs were not recorded for this method"


METRICS: dict[str, Metric] = {}


def register_metric(metric: Metric) -> Metric:
    METRICS[metric.name] = metric
    return metric


def _items(run: RunRecords, split: str, scored: bool = False) -> list[ItemRecord] | None:
    """The split's items; None when missing or (`scored`) when any was refused rather than scored."""
    records = run.get(split)
    if records is None or not records.items:
        return None
    if scored and refused_count(records.items):
        return None
    return records.items


class _SplitMetric(Metric):
    split: str

    def __init__(self, name: str, split: str):
        self.name = name  # type: ignore[misc]
        self.split = split
        self.splits = (split,)


class ProbabilityMetric(_SplitMetric):
    """Mean P(a|q)^(1/|a|) on a QA split."""

    uses_scores = True

    def compute(self, run: RunRecords, retain: RunRecords | None = None) -> float | None:
        items = _items(run, self.split, scored=True)
        if items is None:
            return None
        return float(np.nanmean([normalised_probability(it.answer_lp) for it in items]))


class NormalisedProbabilityMetric(_SplitMetric):
    """Mean p_true / (p_true + sum p_false) on a multiple-answer split."""

    uses_scores = True

    def compute(self, run: RunRecords, retain: RunRecords | None = None) -> float | None:
        items = _items(run, self.split, scored=True)
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
    uses_scores = True

    def __init__(self, name: str, split: str, aggregator: str):
        super().__init__(name, split)
        self.aggregator = aggregator

    def compute(self, run: RunRecords, retain: RunRecords | None = None) -> float | None:
        items = _items(run, self.split, scored=True)
        if items is None or not all(it.perturbed_lp for it in items):
            return None
        return aggregate_truth_ratio(truth_ratios(items), self.aggregator)


class ForgetQualityMetric(Metric):
    name = "forget_quality"
    higher_is_better = True
    splits = ("forget",)
    uses_scores = True

    def compute(self, run: RunRecords, retain: RunRecords | None = None) -> float | None:
        items = _items(run, "forget", scored=True)
        ref = _items(retain, "forget", scored=True) if retain is not None else None
        if items is None or ref is None:
            return None
        return forget_quality(truth_ratios(items), truth_ratios(ref))

    def why_missing(self, run: RunRecords, retain: RunRecords | None = None) -> str:
        if retain is None or _items(retain, "forget", scored=True) is None:
            return "no retain-model forget records to compare with"
        return super().why_missing(run, retain)


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

    def why_missing(self, run: RunRecords, retain: RunRecords | None = None) -> str:
        for part in MODEL_UTILITY_PARTS:
            if METRICS[part].compute(run, retain) is None:
                return f"{part}: {METRICS[part].why_missing(run, retain)}"
        return super().why_missing(run, retain)

    def compute(self, run: RunRecords, retain: RunRecords | None = None) -> float | None:
        values = [METRICS[part].compute(run, retain) for part in MODEL_UTILITY_PARTS]
        if any(v is None for v in values):
            return None
        return harmonic_mean([float(v) for v in values])  # type: ignore[arg-type]


class ExtractionStrengthMetric(Metric):
    name = "extraction_strength"
    higher_is_better = False
    splits = ("forget",)
    uses_scores = True

    def compute(self, run: RunRecords, retain: RunRecords | None = None) -> float | None:
        items = _items(run, "forget", scored=True)
        if items is None or any(it.greedy_hits is None for it in items):
            return None
        return float(np.mean([extraction_strength(it.greedy_hits or []) for it in items]))

    def why_missing(self, run: RunRecords, retain: RunRecords | None = None) -> str:
        reason = super().why_missing(run, retain)
        if reason.startswith("its inputs"):
            return "needs the model's teacher-forced argmax, which the HTTP scoring endpoint does not return"
        return reason


class MinKMiaMetric(Metric):
    name = "mia_min_k_auc"
    k: float = 0.2
    splits = ("forget", "holdout")
    uses_scores = True

    def compute(self, run: RunRecords, retain: RunRecords | None = None) -> float | None:
        forget = _items(run, "forget", scored=True)
        holdout = _items(run, "holdout", scored=True)
        if forget is None or holdout is None:
            return None
        return auc(
            [min_k_score(it.answer_lp, self.k) for it in forget], [min_k_score(it.answer_lp, self.k) for it in holdout]
        )


class GibberishRateMetric(Metric):
    name = "forget_gibberish_rate"
    higher_is_better = False
    splits = ("forget",)

    def compute(self, run: RunRecords, retain: RunRecords | None = None) -> float | None:
        items = _items(run, "forget")
        if items is None or any(it.generation is None for it in items):
            return None
        return float(np.mean([is_gibberish(it.generation or "", it.generation_ppl) for it in items]))


class GenerationPerplexityMetric(Metric):
    """Median perplexity of the forget-set generations under the target model (empty ones skipped)."""

    name = "forget_generation_ppl"
    higher_is_better = False
    splits = ("forget",)

    def compute(self, run: RunRecords, retain: RunRecords | None = None) -> float | None:
        items = _items(run, "forget")
        if items is None:
            return None
        ppls = [it.generation_ppl for it in items if it.generation_ppl is not None and math.isfinite(it.generation_ppl)]
        return float(np.median(ppls)) if ppls else None


class EmptyRateMetric(Metric):
    name = "forget_empty_rate"
    splits = ("forget",)

    def compute(self, run: RunRecords, retain: RunRecords | None = None) -> float | None:
        items = _items(run, "forget")
        if items is None or any(it.generation is None for it in items):
            return None
        return float(np.mean([not (it.generation or "").strip() for it in items]))


class RefusedShareMetric(_SplitMetric):
    """Share of a split's items the route refused (what can be measured where probabilities cannot)."""

    def compute(self, run: RunRecords, retain: RunRecords | None = None) -> float | None:
        items = _items(run, self.split)
        return None if items is None else refused_count(items) / len(items)


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
    RefusedShareMetric("forget_refused_share", "forget"),
    RefusedShareMetric("retain_refused_share", "retain"),
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


def not_applicable(
    run: RunRecords, retain: RunRecords | None, values: dict[str, float | None] | None = None
) -> dict[str, str]:
    """Why each metric that is None for this run is not a number (reports print "n/a" with it)."""
    values = values if values is not None else compute_all(run, retain)
    return {name: METRICS[name].why_missing(run, retain) for name, value in values.items() if value is None}


def metric_code_version() -> str:
    """A digest of this module: runs whose numbers came from different metric code are not merged."""
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:12]


# --------------------------------------------------------------------------- confidence intervals

INTERVAL_METRICS = ("forget_quality", "model_utility", "forget_Q_A_ROUGE")
_UTILITY_SPLITS = (("retain", "retain", False), ("ra", "real_authors", True), ("wf", "world_facts", True))


def _per_item(run: RunRecords, split: str, normalised: bool) -> dict[str, np.ndarray] | None:
    """Per-item probability, ROUGE and truth ratio of a split (None when a part is undefined)."""
    items = _items(run, split, scored=True)
    if items is None or any(it.generation is None for it in items) or not all(it.perturbed_lp for it in items):
        return None
    prob = [
        probability_over_options(it.answer_lp, it.perturbed_lp) if normalised else normalised_probability(it.answer_lp)
        for it in items
    ]
    return {
        "prob": np.asarray(prob, dtype=float),
        "rouge": np.asarray([rouge_l_recall(it.answer, it.generation or "") for it in items], dtype=float),
        "tr": np.asarray(truth_ratios(items), dtype=float),
    }


def bootstrap_intervals(
    run: RunRecords, retain: RunRecords | None, n_resamples: int = 1000, level: float = 0.95, seed: int = 0
) -> dict[str, list[float] | None]:
    """Percentile bootstrap intervals for forget quality, model utility and forget ROUGE-L.

    Items are resampled with replacement within each split; forget quality resamples the method's and
    the retain model's forget items with the same indices (they are the same questions), so the
    interval shows how much the KS p-value of this many items moves, not a second source of noise.
    An interval is None where its metric is (see `not_applicable`)."""
    out: dict[str, list[float] | None] = {name: None for name in INTERVAL_METRICS}
    if n_resamples <= 0:
        return out
    rng = np.random.default_rng(seed)
    lo_q, hi_q = 100 * (1 - level) / 2, 100 * (1 + level) / 2

    def interval(samples: list[float]) -> list[float] | None:
        arr = np.asarray(samples, dtype=float)
        arr = arr[np.isfinite(arr)]
        return [float(np.percentile(arr, lo_q)), float(np.percentile(arr, hi_q))] if arr.size else None

    forget = _items(run, "forget")
    if forget is not None and all(it.generation is not None for it in forget):
        rouge = np.asarray([rouge_l_recall(it.answer, it.generation or "") for it in forget], dtype=float)
        out["forget_Q_A_ROUGE"] = interval(
            [float(rouge[rng.integers(0, rouge.size, rouge.size)].mean()) for _ in range(n_resamples)]
        )
    scored = _items(run, "forget", scored=True)
    ref = _items(retain, "forget", scored=True) if retain is not None else None
    if scored is not None and ref is not None:
        mine, theirs = np.asarray(truth_ratios(scored)), np.asarray(truth_ratios(ref))
        paired = [it.question for it in scored] == [it.question for it in ref]
        samples = []
        for _ in range(n_resamples):
            i = rng.integers(0, mine.size, mine.size)
            j = i if paired else rng.integers(0, theirs.size, theirs.size)
            samples.append(forget_quality(mine[i], theirs[j]))
        out["forget_quality"] = interval(samples)
    parts = {key: _per_item(run, split, normalised) for key, split, normalised in _UTILITY_SPLITS}
    if all(v is not None for v in parts.values()):
        samples = []
        for _ in range(n_resamples):
            values = []
            for v in parts.values():
                assert v is not None
                i = rng.integers(0, v["prob"].size, v["prob"].size)
                values += [
                    float(np.nanmean(v["prob"][i])),
                    float(v["rouge"][i].mean()),
                    aggregate_truth_ratio(v["tr"][i], "true_better"),
                ]
            samples.append(harmonic_mean(values))
        out["model_utility"] = interval(samples)
    return out
