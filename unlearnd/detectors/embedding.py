"""Embedding detector: sentence-embedding similarity to each request's forget examples.

Three scores per (prompt view, request), fused by a per-request logistic stacker:
  local  = max cosine to the request's examples (one shared faiss index over all requests),
  global = PPCA Gaussian log-density of the request's forget questions (Mahalanobis),
  head   = logistic regression on the embedding, forget vs negatives (built-in chat prompts,
           the request's retain examples, and counterfactuals: forget questions about someone else).
The stacker and the threshold are fitted on *out-of-fold* scores (K-fold over forget and negative
examples), so the threshold reflects unseen prompts, not memorised ones. A prompt is scored as the
max over its views (whole prompt, sentences, windows) -- the same rule at fit and serve time.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path

import numpy as np
from pydantic import BaseModel, Field
from sklearn.linear_model import LogisticRegression

from unlearnd.artifacts import write_json_atomic, write_npz_atomic
from unlearnd.detectors.anchors import request_names
from unlearnd.detectors.base import (
    Detection,
    Detector,
    RequestMatch,
    artifact_path,
    register_detector,
)
from unlearnd.detectors.calibration import Calibration, calibrate, rates
from unlearnd.detectors.encoder import EncoderConfig, get_encoder
from unlearnd.detectors.index import GaussianBank, GaussianFit, SharedIndex, matmul_t
from unlearnd.detectors.negatives import answers, chat_subset, counterfactuals, person_questions, questions
from unlearnd.detectors.views import expand, max_by_owner
from unlearnd.domain import ForgetRequest

log = logging.getLogger(__name__)
FEATURES = ("local", "global", "head")


class EmbeddingConfig(BaseModel):
    encoder: EncoderConfig = Field(default_factory=EncoderConfig)
    target_fpr: float = Field(0.01, gt=0, lt=1)
    folds: int = Field(5, ge=2)
    gaussian_k: int = 16
    head_c: float = 4.0
    index_answers: bool = True
    counterfactual: bool = Field(True, description="train the head on name-swapped forget questions")
    calibrate_counterfactual: bool = Field(False, description="also calibrate the threshold on them")
    chat_part: str = Field("all", description="built-in chat prompts used as negatives: all | fit")
    person_negatives: bool = Field(True, description="add built-in questions about made-up people as negatives")
    chat_limit: int = Field(0, description="use N evenly spaced built-in prompts (0 = all; small tests)")
    max_views: int = 12
    seed: int = 0
    top_k: int = 64
    few_shot_below: int = Field(
        10,
        ge=2,
        description="with fewer forget questions than this, score by max "
        "cosine alone: a stacker or head fitted on a handful of positives is noise",
    )
    few_shot_min_cosine: float = Field(
        0.6,
        description="floor on the few-shot cosine threshold, so a thin "
        "set of negatives cannot pull it down to unrelated prompts",
    )


def _head(x: np.ndarray, y: np.ndarray, c: float) -> tuple[np.ndarray, float]:
    clf = LogisticRegression(C=c, class_weight="balanced", max_iter=3000)
    clf.fit(x, y)
    return clf.coef_[0].astype(np.float32), float(clf.intercept_[0])


class _Stacker(BaseModel):
    """Standardise (local, global, head) and combine linearly into one logit."""

    mean: list[float]
    std: list[float]
    coef: list[float]
    intercept: float

    @classmethod
    def fit(cls, feats: np.ndarray, y: np.ndarray) -> _Stacker:
        mean, std = feats.mean(0), feats.std(0) + 1e-6
        clf = LogisticRegression(C=1.0, class_weight="balanced", max_iter=1000)
        clf.fit((feats - mean) / std, y)
        coef = np.maximum(clf.coef_[0], 0.0)  # every score is 'higher = more forget-like'
        return cls(mean=mean.tolist(), std=std.tolist(), coef=coef.tolist(), intercept=float(clf.intercept_[0]))

    def apply(self, feats: np.ndarray) -> np.ndarray:
        return ((feats - np.asarray(self.mean)) / np.asarray(self.std)) @ np.asarray(self.coef) + self.intercept


class _Fitted:
    """One request's fitted parts (all numpy), trained on some subset of its examples."""

    def __init__(self, refs: np.ndarray, gauss: GaussianFit, head_w: np.ndarray, head_b: float):
        self.refs, self.gauss, self.head_w, self.head_b = refs, gauss, head_w, head_b

    def features(self, emb: np.ndarray) -> np.ndarray:
        local = (emb @ self.refs.T).max(1) if len(self.refs) else np.full(len(emb), -1.0)
        return np.stack([local, self.gauss.score(emb), emb @ self.head_w + self.head_b], 1)


def _fit_parts(pos_emb: np.ndarray, refs: np.ndarray, neg_emb: np.ndarray, cfg: EmbeddingConfig) -> _Fitted:
    gauss = GaussianFit.fit(pos_emb, k=cfg.gaussian_k)
    x = np.concatenate([refs, neg_emb])
    y = np.concatenate([np.ones(len(refs)), np.zeros(len(neg_emb))])
    w, b = _head(x, y, cfg.head_c)
    return _Fitted(refs, gauss, w, b)


def _capitalised_words(texts: list[str]) -> set[str]:
    """Folded capitalised words of the forget data (names, titles, places it talks about)."""
    from unlearnd.detectors.spans import fold, tokens

    return {fold(w) for t in texts for w, _, _ in tokens(t) if w[:1].isupper()}


def _floored(calib: Calibration, pos: np.ndarray, neg: np.ndarray, floor: float) -> Calibration:
    """The calibration with its threshold raised to `floor` (rates recomputed)."""
    if calib.threshold >= floor:
        return calib
    tpr, fpr = rates(pos, neg, floor)
    return calib.model_copy(update={"threshold": floor, "tpr": tpr if len(pos) else None, "fpr": fpr})


class EncoderDetector(Detector):
    """What the encoder-based detectors share: their config, one lazily loaded sentence encoder,
    the loaded requests in load order, and the lock and cache around their stacked parameters."""

    config_class: type[BaseModel]

    def __init__(self, config: BaseModel | dict | None = None, **overrides) -> None:
        cfg = config if isinstance(config, self.config_class) else self.config_class(**(config or {}))
        self.cfg = cfg.model_copy(update=overrides) if overrides else cfg
        self._encoder = None
        self._order: list[str] = []
        self._stack_cache: tuple | None = None
        self._lock = threading.Lock()

    @property
    def encoder(self):
        if self._encoder is None:
            self._encoder = get_encoder(self.cfg.encoder)
        return self._encoder

    @property
    def loaded_ids(self) -> set[str]:
        return set(self._order)

    @property
    def order(self) -> list[str]:
        return list(self._order)

    def forget_texts(self, request: ForgetRequest) -> tuple[list[str], list[str]]:
        """The request's forget questions and, per question, its answer ("" when answers are not
        indexed or there is none)."""
        qa = request.spec.as_qa(request.spec.forget)
        return [x.question for x in qa], [x.answer if self.cfg.index_answers else "" for x in qa]


@register_detector
class EmbeddingDetector(EncoderDetector):
    name = "embedding"
    config_class = EmbeddingConfig

    def __init__(self, config: EmbeddingConfig | dict | None = None, **overrides) -> None:
        super().__init__(config, **overrides)
        self._index: SharedIndex | None = None
        self._gauss = GaussianBank()
        self._heads: dict[str, tuple[np.ndarray, float]] = {}
        self._stackers: dict[str, _Stacker] = {}
        self._calib: dict[str, Calibration] = {}
        self._calib_strict: dict[str, Calibration] = {}
        self.known_words: dict[str, set[str]] = {}

    # ---- offline -------------------------------------------------------------------------
    def fit(self, request: ForgetRequest, artifact_dir: Path) -> dict:
        start = time.perf_counter()
        cfg, spec = self.cfg, request.spec
        rng = np.random.default_rng(cfg.seed)
        pos_q, pos_a = self.forget_texts(request)
        swapped = counterfactuals(pos_q, request_names(spec), seed=cfg.seed) if cfg.counterfactual else []
        cf = [[c] if c else [] for c in swapped] if swapped else [[] for _ in pos_q]
        builtin = chat_subset(cfg.chat_part, cfg.chat_limit) + questions(spec.retain)
        persons = list(person_questions())[: cfg.chat_limit or None] if cfg.person_negatives else []
        neg = list(dict.fromkeys(builtin + persons))
        neg = [t for t in neg if t not in set(pos_q)]
        named_other = np.array([t in set(persons) for t in neg], dtype=bool)  # questions about made-up people
        retain_extra = answers(spec.retain)

        pos_views, pos_owner = expand(pos_q, cfg.max_views)
        neg_views, neg_owner = expand(neg, cfg.max_views)
        cf_flat = [t for group in cf for t in group]
        cf_owner = np.asarray([i for i, group in enumerate(cf) for _ in group], dtype=np.int64)
        every = pos_views + [a for a in pos_a if a] + neg_views + retain_extra + cf_flat
        enc = self.encoder.encode(every, progress=len(every) > 500)
        emb = dict(zip(every, enc.emb))

        def embed(texts: list[str]) -> np.ndarray:
            return np.stack([emb[t] for t in texts]) if texts else np.zeros((0, self.encoder.dim), np.float32)

        q_emb = embed(pos_q)
        a_idx = [i for i, a in enumerate(pos_a) if a]
        a_emb = embed([pos_a[i] for i in a_idx])
        a_owner = np.asarray(a_idx, dtype=np.int64)
        retain_emb = embed(retain_extra)
        cf_emb = embed(cf_flat)
        pos_view_emb, neg_view_emb = embed(pos_views), embed(neg_views)

        if len(pos_q) >= cfg.few_shot_below:
            stacker, calib, calib_strict, neg_scores, cf_scores = self._calibrate_stacked(
                q_emb,
                a_emb,
                a_owner,
                pos_view_emb,
                pos_owner,
                neg_view_emb,
                neg_owner,
                retain_emb,
                cf_emb,
                cf_owner,
                named_other,
                rng,
            )
        else:
            stacker, calib, calib_strict, neg_scores, cf_scores = self._calibrate_few_shot(
                q_emb, a_emb, a_owner, pos_view_emb, pos_owner, neg_view_emb, neg_owner, cf_emb, named_other
            )

        # ---- final model on everything ---------------------------------------------------
        refs = np.concatenate([q_emb, a_emb]).astype(np.float32)
        final = _fit_parts(q_emb, refs, np.concatenate([neg_view_emb, retain_emb, cf_emb]), cfg)
        out = artifact_path(artifact_dir, self.name)
        write_npz_atomic(
            out / "arrays.npz",
            refs=refs,
            head_w=final.head_w,
            head_b=np.array([final.head_b], np.float32),
            **final.gauss.arrays("gauss_"),
        )
        metrics = {
            "n_forget": len(pos_q),
            "n_refs": len(refs),
            "n_negatives": len(neg),
            "n_retain": len(spec.retain),
            "n_counterfactual": len(cf_flat),
            "n_person_negatives": int(named_other.sum()),
            "mode": "stacked" if len(pos_q) >= cfg.few_shot_below else "few_shot",
            "oof_person_fpr": float((neg_scores[named_other] > calib.threshold).mean()) if named_other.any() else None,
            "oof_tpr": calib.tpr,
            "oof_fpr": calib.fpr,
            "oof_strict_tpr": calib_strict.tpr,
            "oof_strict_fpr": calib_strict.fpr,
            "oof_counterfactual_fpr": float((cf_scores > calib.threshold).mean()) if len(cf_flat) else None,
            "fit_seconds": round(time.perf_counter() - start, 2),
        }
        payload = {
            "detector": self.name,
            "version": 1,
            "request_id": request.id,
            "config": cfg.model_dump(),
            "stacker": stacker.model_dump(),
            "calibration": calib.model_dump(),
            "calibration_strict": calib_strict.model_dump(),
            "known_words": sorted(_capitalised_words(pos_q + [a for a in pos_a if a])),
            "metrics": metrics,
        }
        write_json_atomic(out / "config.json", payload)
        log.info("embedding detector for %s: %s", request.id, metrics)
        return metrics

    def _calibrate_stacked(
        self,
        q_emb,
        a_emb,
        a_owner,
        pos_view_emb,
        pos_owner,
        neg_view_emb,
        neg_owner,
        retain_emb,
        cf_emb,
        cf_owner,
        named_other,
        rng,
    ):
        """Stacker + thresholds from out-of-fold scores (K-fold over forget and negative examples)."""
        n_neg = int(neg_owner.max()) + 1 if len(neg_owner) else 0
        cfg, n_pos = self.cfg, len(q_emb)
        k = min(cfg.folds, n_pos)
        pos_fold = rng.permutation(n_pos) % max(k, 1)
        # negatives in contiguous blocks: lists are usually grouped by topic (retain QA by person,
        # the chat prompts by theme), so a held-out block has no near-duplicates in training
        neg_fold = (np.arange(n_neg) * max(k, 1)) // max(n_neg, 1)
        oof_pos = np.zeros((len(pos_view_emb), 3))
        oof_neg = np.zeros((len(neg_view_emb), 3))
        oof_cf = np.zeros((len(cf_emb), 3))
        # a counterfactual is scored in a fold whose references DO hold its source question (as at
        # serve time, where a question about somebody else meets its forget twin in the index),
        # and whose head was not trained on it
        cf_fold = (pos_fold[cf_owner] + 1) % max(k, 1) if len(cf_emb) else np.zeros(0, np.int64)
        for fold in range(k):
            tr = pos_fold != fold
            refs = np.concatenate([q_emb[tr], a_emb[tr[a_owner]] if len(a_owner) else a_emb])
            negs = np.concatenate([neg_view_emb[neg_fold[neg_owner] != fold], retain_emb, cf_emb[cf_fold != fold]])
            parts = _fit_parts(q_emb[tr], refs, negs, cfg)
            sel = ~tr[pos_owner]
            oof_pos[sel] = parts.features(pos_view_emb[sel])
            sel_n = neg_fold[neg_owner] == fold
            oof_neg[sel_n] = parts.features(neg_view_emb[sel_n])
            if len(cf_emb):
                sel_c = cf_fold == fold
                oof_cf[sel_c] = parts.features(cf_emb[sel_c])

        # the stacker learns from whole-prompt views; the threshold from max-over-views scores
        first_pos = np.r_[True, pos_owner[1:] != pos_owner[:-1]]
        first_neg = np.r_[True, neg_owner[1:] != neg_owner[:-1]] if len(neg_owner) else np.zeros(0, bool)
        feats = np.concatenate([oof_pos[first_pos], oof_neg[first_neg], oof_cf])
        labels = np.concatenate([np.ones(first_pos.sum()), np.zeros(first_neg.sum() + len(oof_cf))])
        stacker = _Stacker.fit(feats, labels)
        pos_scores = max_by_owner(stacker.apply(oof_pos), pos_owner, n_pos)
        neg_scores = max_by_owner(stacker.apply(oof_neg), neg_owner, n_neg)
        # two thresholds from data: against ordinary negatives, and 'strict' against questions about
        # somebody else as well (the counterfactuals); the guard uses the strict one when the prompt
        # names a person or thing the forget data never mentions
        # (questions about made-up people only count for the strict threshold: they always name someone)
        strict_neg = np.concatenate([neg_scores, stacker.apply(oof_cf)]) if len(cf_emb) else neg_scores
        calib = calibrate(
            pos_scores, strict_neg if cfg.calibrate_counterfactual else neg_scores[~named_other], cfg.target_fpr
        )
        calib_strict = calibrate(pos_scores, strict_neg, cfg.target_fpr)
        return stacker, calib, calib_strict, neg_scores, stacker.apply(oof_cf) if len(cf_emb) else np.zeros(0)

    def _calibrate_few_shot(
        self, q_emb, a_emb, a_owner, pos_view_emb, pos_owner, neg_view_emb, neg_owner, cf_emb, named_other
    ):
        """A handful of forget questions: score = max cosine to the request's examples, threshold = conformal
        cut on the negatives' cosines, never below `few_shot_min_cosine`. No fold can hold an example
        out and still train on one, so nothing here is fitted on the scores it is judged by: a
        negative is never a reference, and a positive is scored against the other examples only."""
        cfg = self.cfg
        n_pos, n_neg = len(q_emb), (int(neg_owner.max()) + 1 if len(neg_owner) else 0)
        stacker = _Stacker(mean=[0.0, 0.0, 0.0], std=[1.0, 1.0, 1.0], coef=[1.0, 0.0, 0.0], intercept=0.0)
        refs = np.concatenate([q_emb, a_emb])
        ref_owner = np.concatenate([np.arange(n_pos), a_owner])
        neg_scores = max_by_owner((neg_view_emb @ refs.T).max(1), neg_owner, n_neg) if n_neg else np.zeros(0)
        cf_scores = (cf_emb @ refs.T).max(1) if len(cf_emb) else np.zeros(0)
        if n_pos >= 2:  # leave one out: a forget question against the other examples
            sims = pos_view_emb @ refs.T
            sims[ref_owner[None, :] == pos_owner[:, None]] = -1.0
            pos_scores = max_by_owner(sims.max(1), pos_owner, n_pos)
        else:
            pos_scores = np.zeros(0)
        ordinary = neg_scores[~named_other]
        strict_neg = np.concatenate([neg_scores, cf_scores])
        calib = _floored(calibrate(pos_scores, ordinary, cfg.target_fpr), pos_scores, ordinary, cfg.few_shot_min_cosine)
        calib_strict = _floored(
            calibrate(pos_scores, strict_neg, cfg.target_fpr), pos_scores, strict_neg, cfg.few_shot_min_cosine
        )
        return stacker, calib, calib_strict, neg_scores, cf_scores

    # ---- serving -------------------------------------------------------------------------
    def load(self, request: ForgetRequest, artifact_dir: Path) -> None:
        folder = artifact_path(artifact_dir, self.name)
        payload = json.loads((folder / "config.json").read_text())
        enc_cfg = EncoderConfig(**payload["config"]["encoder"])
        if enc_cfg.model != self.cfg.encoder.model or enc_cfg.layers != self.cfg.encoder.layers:
            raise ValueError(
                f"request {request.id} was fitted with encoder {enc_cfg.model}, "
                f"this detector runs {self.cfg.encoder.model}; refit it"
            )
        arrays = np.load(folder / "arrays.npz")
        with self._lock:
            if self._index is None:
                self._index = SharedIndex(int(arrays["refs"].shape[1]), top_k=self.cfg.top_k)
            self._index.add(request.id, arrays["refs"])
            self._gauss.add(request.id, GaussianFit.from_arrays(arrays, "gauss_"))
            self._heads[request.id] = (arrays["head_w"], float(arrays["head_b"][0]))
            self._stackers[request.id] = _Stacker(**payload["stacker"])
            self._calib[request.id] = Calibration(**payload["calibration"])
            self._calib_strict[request.id] = Calibration(**payload.get("calibration_strict", payload["calibration"]))
            self.known_words[request.id] = set(payload.get("known_words", []))
            if request.id not in self._order:
                self._order.append(request.id)
            self._stack_cache = None

    def unload(self, request_id: str) -> None:
        with self._lock:
            if request_id not in self._order:
                return
            self._order.remove(request_id)
            if self._index is not None:
                self._index.remove(request_id)
            self._gauss.remove(request_id)
            for table in (self._heads, self._stackers, self._calib, self._calib_strict, self.known_words):
                table.pop(request_id, None)
            self._stack_cache = None

    def _stacked(self) -> tuple:
        """Per-request parameters as arrays in `order` (rebuilt only when requests change)."""
        with self._lock:
            if self._stack_cache is None:
                order = list(self._order)
                heads_w = np.stack([self._heads[r][0] for r in order]) if order else np.zeros((0, 1), np.float32)
                heads_b = np.array([self._heads[r][1] for r in order], np.float32)
                st = [self._stackers[r] for r in order]
                mean = np.array([s.mean for s in st]).reshape(len(order), 3)
                std = np.array([s.std for s in st]).reshape(len(order), 3)
                coef = np.array([s.coef for s in st]).reshape(len(order), 3)
                icpt = np.array([s.intercept for s in st])
                thr = np.array([self._calib[r].threshold for r in order])
                scale = np.array([self._calib[r].scale for r in order])
                thr_strict = np.array([self._calib_strict[r].threshold for r in order])
                self._stack_cache = (order, heads_w, heads_b, mean, std, coef, icpt, thr, scale, thr_strict)
            return self._stack_cache

    def features(self, emb: np.ndarray) -> tuple[list[str], np.ndarray]:
        """(V, R, 3) local/global/head features of each view for each loaded request."""
        order, heads_w, heads_b = self._stacked()[:3]
        if not order:
            return order, np.zeros((len(emb), 0, 3))
        local = self._index.max_scores(emb, order)
        glob = self._gauss.scores(emb, order)
        head = matmul_t(emb, heads_w) + heads_b
        return order, np.stack([local, glob, head], -1).astype(np.float64)

    def local_scores(self, emb: np.ndarray) -> tuple[list[str], np.ndarray]:
        """(V, R) max cosine of each view to each loaded request's examples."""
        order = self._stacked()[0]
        if not order:
            return order, np.zeros((len(emb), 0))
        return order, self._index.max_scores(emb, order).astype(np.float64)

    def score_views(self, emb: np.ndarray) -> tuple[list[str], np.ndarray]:
        """(V, R) fused raw score of each view under each request's stacker."""
        order, _, _, mean, std, coef, icpt = self._stacked()[:7]
        _, feats = self.features(emb)
        if not order:
            return order, np.zeros((len(emb), 0))
        return order, (((feats - mean) / std) * coef).sum(-1) + icpt

    def thresholds(self, strict: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(R,) thresholds and score scales; `strict` = calibrated on questions about others too."""
        stacked = self._stacked()
        return (stacked[9] if strict else stacked[7]), stacked[8]

    def normalise(self, raw: np.ndarray, thr: np.ndarray | None = None) -> np.ndarray:
        """Map raw (n, R) scores to (0, 1) with 0.5 at each request's threshold."""
        default, scale = self.thresholds()
        thr = default if thr is None else thr
        return 1.0 / (1.0 + np.exp(-4.0 * (raw - thr) / np.maximum(scale, 1e-6)))

    def detect(self, texts: list[str]) -> list[Detection]:
        flat, owner = expand(texts, self.cfg.max_views)
        emb = self.encoder.encode(flat).emb
        order, raw_views = self.score_views(emb)
        if not order:
            return [Detection(0.0) for _ in texts]
        raw = max_by_owner(raw_views, owner, len(texts))
        thr, _ = self.thresholds()
        norm = self.normalise(raw)
        results = []
        for i in range(len(texts)):
            matches = [RequestMatch(order[j], float(norm[i, j])) for j in np.flatnonzero(raw[i] > thr)]
            matches.sort(key=lambda m: -m.score)
            results.append(Detection(float(norm[i].max()), matches))
        return results
