"""OOD detector (the O3 idea): is a prompt *in the distribution of the forget examples*? Needs
no retain data, and gives the soft weight w in [0, 1] that scalable routes (the O3 LoRA) use.

Features per request, for several encoder layers l: max cosine to the forget examples in layer-l
space and a PPCA Mahalanobis score of the forget questions in that space -> one vector of 2L
numbers -> a one-class Gaussian fitted on *out-of-fold* feature vectors of 4/5 of the forget
questions. Only shortfalls count (a prompt closer than typical is never penalised). The held-out
fifth calibrates the weight: w = 2 * (fraction of held-out forget questions the prompt is at least
as typical as), capped at 1 -- a prompt as typical as the median held-out forget question gets
w = 1, one less typical than all of them w = 0. The detection threshold is still chosen from
negatives (built-in chat prompts + retain) for the target FPR, and its TPR is measured on the
held-out fifth.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
from pydantic import BaseModel, Field
from sklearn.covariance import LedoitWolf

from unlearnd.artifacts import write_json_atomic, write_npz_atomic
from unlearnd.detectors.base import (
    Detection,
    RequestMatch,
    artifact_path,
    register_detector,
)
from unlearnd.detectors.calibration import Calibration, calibrate
from unlearnd.detectors.embedding import EncoderDetector
from unlearnd.detectors.encoder import EncoderConfig
from unlearnd.detectors.index import GaussianBank, GaussianFit, SharedIndex
from unlearnd.detectors.negatives import chat_subset, person_questions, questions
from unlearnd.detectors.views import expand, max_by_owner
from unlearnd.domain import ForgetRequest

log = logging.getLogger(__name__)


class OODConfig(BaseModel):
    encoder: EncoderConfig = Field(default_factory=EncoderConfig)
    target_fpr: float = Field(0.01, gt=0, lt=1)
    calib_fraction: float = 0.2
    inner_folds: int = 4
    gaussian_k: int = 8
    index_answers: bool = True
    chat_part: str = "all"
    chat_limit: int = 0
    person_negatives: bool = True
    max_views: int = 12
    seed: int = 0
    top_k: int = 64


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-8)


def _layer_features(layers: np.ndarray, refs: list[np.ndarray], gauss: list[GaussianFit]) -> np.ndarray:
    """(n, 2L): per layer, max cosine to the references and the PPCA score."""
    cols = []
    for li, (ref, g) in enumerate(zip(refs, gauss)):
        x = layers[:, li]
        cols += [(x @ ref.T).max(1), g.score(x)]
    return np.stack(cols, 1)


class _OneClass(BaseModel):
    """Gaussian over standardised feature vectors; only below-typical deviations count."""

    mean: list[float]
    std: list[float]
    precision: list[list[float]]

    @classmethod
    def fit(cls, feats: np.ndarray) -> _OneClass:
        mean, std = feats.mean(0), feats.std(0) + 1e-6
        z = (feats - mean) / std
        precision = LedoitWolf().fit(z).precision_
        return cls(mean=mean.tolist(), std=std.tolist(), precision=precision.tolist())

    def score(self, feats: np.ndarray) -> np.ndarray:
        z = np.minimum((feats - np.asarray(self.mean)) / np.asarray(self.std), 0.0)
        return -np.einsum("ni,ij,nj->n", z, np.asarray(self.precision), z)


def weight_from_calibration(scores: np.ndarray, calib_sorted: np.ndarray) -> np.ndarray:
    """w = min(1, 2 * ECDF_heldout(score)): 1 at/above the median held-out forget score, 0 below all."""
    if not len(calib_sorted):
        return np.ones_like(scores, dtype=np.float64)
    frac = np.searchsorted(calib_sorted, scores, side="right") / len(calib_sorted)
    return np.clip(2.0 * frac, 0.0, 1.0)


@register_detector
class OODDetector(EncoderDetector):
    name = "ood"
    config_class = OODConfig

    def __init__(self, config: OODConfig | dict | None = None, **overrides) -> None:
        super().__init__(config, **overrides)
        self._indexes: list[SharedIndex] = []
        self._banks: list[GaussianBank] = [GaussianBank() for _ in self.cfg.encoder.layers]
        self._oneclass: dict[str, _OneClass] = {}
        self._calib_scores: dict[str, np.ndarray] = {}
        self._calib: dict[str, Calibration] = {}

    # ---- offline -------------------------------------------------------------------------
    def fit(self, request: ForgetRequest, artifact_dir: Path) -> dict:
        start = time.perf_counter()
        cfg, spec = self.cfg, request.spec
        rng = np.random.default_rng(cfg.seed)
        pos_q, pos_a = self.forget_texts(request)
        builtin = chat_subset(cfg.chat_part, cfg.chat_limit)
        if cfg.person_negatives:
            builtin += list(person_questions())[: cfg.chat_limit or None]
        neg = list(dict.fromkeys(builtin + questions(spec.retain)))
        neg_views, neg_owner = expand(neg, cfg.max_views)
        every = pos_q + [a for a in pos_a if a] + neg_views
        enc = self.encoder.encode(every, progress=len(every) > 500)
        lay = {t: _unit(v) for t, v in zip(every, enc.layers)}

        def layers_of(texts: list[str]) -> np.ndarray:
            return np.stack([lay[t] for t in texts])

        n = len(pos_q)
        perm = rng.permutation(n)
        n_cal = int(round(cfg.calib_fraction * n)) if n >= 5 else 0
        cal_idx, fit_idx = perm[:n_cal], perm[n_cal:]
        q_lay = layers_of(pos_q)
        a_has = np.array([bool(a) for a in pos_a])

        def build(idx: np.ndarray) -> tuple[list[np.ndarray], list[GaussianFit]]:
            refs, gauss = [], []
            ans = [pos_a[i] for i in idx if a_has[i]]
            a_lay = layers_of(ans) if ans else np.zeros((0,) + q_lay.shape[1:], np.float32)
            for li in range(q_lay.shape[1]):
                refs.append(np.concatenate([q_lay[idx, li], a_lay[:, li]]).astype(np.float32))
                gauss.append(GaussianFit.fit(q_lay[idx, li], k=cfg.gaussian_k))
            return refs, gauss

        # out-of-fold features inside the fit part -> the one-class model
        k = min(cfg.inner_folds, len(fit_idx))
        oof = np.zeros((len(fit_idx), 2 * q_lay.shape[1]))
        folds = np.arange(len(fit_idx)) % max(k, 1)
        if k >= 2:
            for fold in range(k):
                refs, gauss = build(fit_idx[folds != fold])
                oof[folds == fold] = _layer_features(q_lay[fit_idx[folds == fold]], refs, gauss)
        else:  # a single forget example has no held-out fold: score it in-sample
            refs, gauss = build(fit_idx)
            oof = _layer_features(q_lay[fit_idx], refs, gauss)
        oneclass = _OneClass.fit(oof)

        refs, gauss = build(fit_idx)
        cal_scores = np.sort(oneclass.score(_layer_features(q_lay[cal_idx], refs, gauss))) if n_cal else np.zeros(0)
        neg_scores = max_by_owner(
            oneclass.score(_layer_features(layers_of(neg_views), refs, gauss)), neg_owner, len(neg)
        )
        calib = calibrate(cal_scores if n_cal else oneclass.score(oof), neg_scores, cfg.target_fpr)
        forget_only = float(np.quantile(cal_scores, 0.05)) if n_cal else None
        weights_neg = weight_from_calibration(neg_scores, cal_scores)

        out = artifact_path(artifact_dir, self.name)
        arrays = {"calib_scores": cal_scores.astype(np.float64)}
        for li in range(len(refs)):
            arrays[f"refs_{li}"] = refs[li]
            arrays.update(gauss[li].arrays(f"gauss_{li}_"))
        write_npz_atomic(out / "arrays.npz", **arrays)
        metrics = {
            "n_fit": len(fit_idx),
            "n_calibration": int(n_cal),
            "n_negatives": len(neg),
            "heldout_tpr": calib.tpr,
            "negative_fpr": calib.fpr,
            "forget_only_threshold_q05": forget_only,
            "mean_weight_heldout_forget": float(weight_from_calibration(cal_scores, cal_scores).mean())
            if n_cal
            else None,
            "mean_weight_negatives": float(weights_neg.mean()),
            "fit_seconds": round(time.perf_counter() - start, 2),
        }
        payload = {
            "detector": self.name,
            "version": 1,
            "request_id": request.id,
            "config": cfg.model_dump(),
            "oneclass": oneclass.model_dump(),
            "calibration": calib.model_dump(),
            "metrics": metrics,
        }
        write_json_atomic(out / "config.json", payload)
        log.info("ood detector for %s: %s", request.id, metrics)
        return metrics

    # ---- serving -------------------------------------------------------------------------
    def load(self, request: ForgetRequest, artifact_dir: Path) -> None:
        folder = artifact_path(artifact_dir, self.name)
        payload = json.loads((folder / "config.json").read_text())
        if EncoderConfig(**payload["config"]["encoder"]).layers != self.cfg.encoder.layers:
            raise ValueError(f"request {request.id}: OOD artifact uses other encoder layers; refit it")
        arrays = np.load(folder / "arrays.npz")
        with self._lock:
            if not self._indexes:
                self._indexes = [
                    SharedIndex(int(arrays[f"refs_{li}"].shape[1]), top_k=self.cfg.top_k)
                    for li in range(len(self.cfg.encoder.layers))
                ]
            for li in range(len(self.cfg.encoder.layers)):
                self._indexes[li].add(request.id, arrays[f"refs_{li}"])
                self._banks[li].add(request.id, GaussianFit.from_arrays(arrays, f"gauss_{li}_"))
            self._oneclass[request.id] = _OneClass(**payload["oneclass"])
            self._calib_scores[request.id] = arrays["calib_scores"]
            self._calib[request.id] = Calibration(**payload["calibration"])
            if request.id not in self._order:
                self._order.append(request.id)
            self._stack_cache = None

    def unload(self, request_id: str) -> None:
        with self._lock:
            if request_id not in self._order:
                return
            self._order.remove(request_id)
            for index, bank in zip(self._indexes, self._banks):
                index.remove(request_id)
                bank.remove(request_id)
            for table in (self._oneclass, self._calib_scores, self._calib):
                table.pop(request_id, None)
            self._stack_cache = None

    def _stacked(self) -> tuple:
        with self._lock:
            if self._stack_cache is None:
                order = list(self._order)
                oc = [self._oneclass[r] for r in order]
                mean = np.array([o.mean for o in oc])
                std = np.array([o.std for o in oc])
                prec = np.array([o.precision for o in oc])
                thr = np.array([self._calib[r].threshold for r in order])
                cal = [self._calib_scores[r] for r in order]
                width = max((len(c) for c in cal), default=0)
                padded = np.full((len(order), width), np.inf)  # +inf pads never count as <= a score
                for j, c in enumerate(cal):
                    padded[j, : len(c)] = c
                counts = np.array([len(c) for c in cal])
                self._stack_cache = (order, mean, std, prec, thr, padded, counts)
            return self._stack_cache

    def score_views(self, layers: np.ndarray) -> tuple[list[str], np.ndarray]:
        """(V, R) one-class score of each view (unit-normalised layer means) for each request."""
        order, mean, std, prec = self._stacked()[:4]
        if not order:
            return order, np.zeros((len(layers), 0))
        x = _unit(layers)
        cols = []
        for li in range(x.shape[1]):
            cols += [self._indexes[li].max_scores(x[:, li], order), self._banks[li].scores(x[:, li], order)]
        feats = np.stack(cols, -1).astype(np.float64)  # (V, R, 2L)
        z = np.minimum((feats - mean) / std, 0.0)
        return order, -np.einsum("vri,rij,vrj->vr", z, prec, z)

    def weights(self, scores: np.ndarray) -> np.ndarray:
        """(n, R) soft weights from (n, R) one-class scores, all requests in one comparison."""
        padded, counts = self._stacked()[5:7]
        if not padded.shape[1]:
            return np.ones(scores.shape)
        below = (padded[None, :, :] <= scores[:, :, None]).sum(-1)  # (n, R): held-out scores <= s
        frac = below / np.maximum(counts, 1)
        return np.where(counts > 0, np.clip(2.0 * frac, 0.0, 1.0), 1.0)

    def thresholds(self) -> np.ndarray:
        return self._stacked()[4]

    def detect(self, texts: list[str]) -> list[Detection]:
        flat, owner = expand(texts, self.cfg.max_views)
        layers = self.encoder.encode(flat).layers
        order, views = self.score_views(layers)
        if not order:
            return [Detection(0.0) for _ in texts]
        raw = max_by_owner(views, owner, len(texts))
        w = self.weights(raw)
        thr = self.thresholds()
        results = []
        for i in range(len(texts)):
            matches = [
                RequestMatch(order[j], float(w[i, j]), weight=float(w[i, j])) for j in np.flatnonzero(raw[i] > thr)
            ]
            matches.sort(key=lambda m: -m.score)
            results.append(Detection(float(w[i].max()), matches))
        return results
