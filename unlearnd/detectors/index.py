"""Structures shared by all loaded requests, so scoring a prompt costs about the same for 1 or 100.

* `SharedIndex`: ONE faiss inner-product index over every request's example vectors, labelled by
  request; one search gives each request's max cosine (the *local* score).
* `GaussianBank`: one probabilistic-PCA Gaussian per request (mean, top-k directions, residual
  variance), stacked so every request's Mahalanobis distance comes out of two matrix products
  (the *global* score).
"""

from __future__ import annotations

import threading

import faiss
import numpy as np

# a prompt is a handful of query vectors: OpenMP threads only add barrier waits (badly so on a
# shared CPU), so faiss runs single-threaded here
faiss.omp_set_num_threads(1)


def matmul_t(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """x @ w.T for a few query rows. OpenBLAS GEMM with 1-2 rows against thousands of columns
    measured 5-10 ms here (2-core shared CPU), one GEMV per row 0.04 ms, so few rows go row by row."""
    if len(x) <= 16:
        return np.stack([w @ row for row in x]) if len(x) else np.zeros((0, len(w)), np.result_type(x, w))
    return x @ w.T


NO_MATCH = -1.0  # local score of a request none of whose examples is among the top-k neighbours


class SharedIndex:
    """Max cosine per request from one faiss index over all requests' (unit-norm) vectors.

    Exact (flat) while the index is small; past `ivf_above` vectors it becomes an inverted-file
    index (k-means cells, `nprobe` searched), so a prompt scans a few thousand vectors however many
    requests are loaded: the brute-force scan is what made 100 requests cost more than 1.
    """

    def __init__(self, dim: int, top_k: int = 64, ivf_above: int = 20000, nprobe: int = 16):
        self.dim = dim
        self.top_k = top_k
        self.ivf_above = ivf_above
        self.nprobe = nprobe
        self._vectors: dict[str, np.ndarray] = {}
        self._index = faiss.IndexFlatIP(dim)
        self._trained_at = 0  # size of the index when the IVF cells were last fitted
        self._labels = np.zeros(0, dtype=np.int64)
        self._order: list[str] = []
        self._lock = threading.Lock()

    @property
    def request_ids(self) -> list[str]:
        return list(self._order)

    @property
    def approximate(self) -> bool:
        return not isinstance(self._index, faiss.IndexFlat)

    def __len__(self) -> int:
        return int(self._index.ntotal)

    def add(self, request_id: str, vectors: np.ndarray) -> None:
        """Add (or replace) one request's vectors."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise ValueError(f"expected (n, {self.dim}) vectors, got {vectors.shape}")
        with self._lock:
            if request_id in self._vectors:
                self._vectors[request_id] = vectors
                self._rebuild()
                return
            self._vectors[request_id] = vectors
            self._order.append(request_id)
            total = int(self._index.ntotal) + len(vectors)
            if total > self.ivf_above and total > 2 * self._trained_at:
                self._rebuild()  # (re)fit the IVF cells when the index has doubled
                return
            self._index.add(vectors)
            self._labels = np.concatenate([self._labels, np.full(len(vectors), len(self._order) - 1)])

    def remove(self, request_id: str) -> None:
        with self._lock:
            if self._vectors.pop(request_id, None) is not None:
                self._order.remove(request_id)
                self._rebuild()

    def _rebuild(self) -> None:
        """Removal is rare (a forget request is deactivated): rebuilding keeps labels exact."""
        labels = [np.full(len(self._vectors[rid]), code) for code, rid in enumerate(self._order)]
        self._labels = np.concatenate(labels) if labels else np.zeros(0, dtype=np.int64)
        data = (
            np.concatenate([self._vectors[rid] for rid in self._order])
            if self._order
            else np.zeros((0, self.dim), np.float32)
        )
        if len(data) > self.ivf_above:
            nlist = int(min(1024, max(16, np.sqrt(len(data)))))
            quantizer = faiss.IndexFlatIP(self.dim)
            index = faiss.IndexIVFFlat(quantizer, self.dim, nlist, faiss.METRIC_INNER_PRODUCT)
            rng = np.random.default_rng(0)
            sample = data[rng.choice(len(data), min(len(data), 50 * nlist), replace=False)]
            index.train(sample)
            index.nprobe = self.nprobe
            index.add(data)
            self._index, self._trained_at = index, len(data)
        else:
            self._index, self._trained_at = faiss.IndexFlatIP(self.dim), 0
            self._index.add(data)

    def max_scores(self, queries: np.ndarray, order: list[str] | None = None) -> np.ndarray:
        """(n_queries, n_requests) max cosine per request, columns in `order` (default: insertion)."""
        order = self._order if order is None else order
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        out = np.full((len(queries), len(order)), NO_MATCH, dtype=np.float32)
        with self._lock:
            if not len(queries) or self._index.ntotal == 0:
                return out
            k = min(self.top_k, int(self._index.ntotal))
            sims, ids = self._index.search(queries, k)
            valid = ids >= 0  # an IVF search may return fewer than k neighbours
            codes = self._labels[np.where(valid, ids, 0)]
            local = np.full((len(queries), len(self._order)), NO_MATCH, dtype=np.float32)
            rows = np.repeat(np.arange(len(queries)), k)
            np.maximum.at(local, (rows[valid.ravel()], codes.ravel()[valid.ravel()]), sims.ravel()[valid.ravel()])
            cols = {rid: c for c, rid in enumerate(self._order)}
        for j, rid in enumerate(order):
            if rid in cols:
                out[:, j] = local[:, cols[rid]]
        return out


class GaussianFit:
    """Probabilistic PCA: the top-k covariance directions exactly, an isotropic residual elsewhere.

    A full covariance is singular with a few hundred examples in 384 dimensions; PPCA is the
    maximum-likelihood Gaussian with k free directions, and it keeps scoring cheap.
    """

    def __init__(self, mean: np.ndarray, components: np.ndarray, variances: np.ndarray, residual: float):
        self.mean, self.components, self.variances, self.residual = mean, components, variances, residual

    @classmethod
    def fit(cls, x: np.ndarray, k: int = 16, floor: float = 1e-4) -> GaussianFit:
        x = np.asarray(x, dtype=np.float64)
        mean = x.mean(0)
        centred = x - mean
        n, d = x.shape
        k = max(1, min(k, n - 1, d - 1))
        _, s, vt = np.linalg.svd(centred, full_matrices=False)
        eig = s**2 / max(n - 1, 1)
        residual = float(max(eig[k:].sum() / max(d - k, 1), floor))
        variances = np.maximum(eig[:k], residual)
        return cls(mean.astype(np.float32), vt[:k].astype(np.float32), variances.astype(np.float32), residual)

    def score(self, x: np.ndarray) -> np.ndarray:
        """Negative squared Mahalanobis distance per dimension (higher = more typical)."""
        diff = np.asarray(x, np.float32) - self.mean
        proj = diff @ self.components.T
        total = (diff**2).sum(-1)
        maha = (proj**2 / self.variances).sum(-1) + np.maximum(total - (proj**2).sum(-1), 0) / self.residual
        return -maha / diff.shape[-1]

    def arrays(self, prefix: str) -> dict[str, np.ndarray]:
        return {
            f"{prefix}mean": self.mean,
            f"{prefix}components": self.components,
            f"{prefix}variances": self.variances,
            f"{prefix}residual": np.array([self.residual], np.float32),
        }

    @classmethod
    def from_arrays(cls, arrays, prefix: str) -> GaussianFit:
        return cls(
            arrays[f"{prefix}mean"],
            arrays[f"{prefix}components"],
            arrays[f"{prefix}variances"],
            float(arrays[f"{prefix}residual"][0]),
        )


class GaussianBank:
    """All loaded requests' Gaussians stacked: scoring R requests is two matrix products."""

    def __init__(self) -> None:
        self._fits: dict[str, GaussianFit] = {}
        self._stacked: tuple | None = None
        self._lock = threading.Lock()

    def add(self, request_id: str, fit: GaussianFit) -> None:
        with self._lock:
            self._fits[request_id] = fit
            self._stacked = None

    def remove(self, request_id: str) -> None:
        with self._lock:
            self._fits.pop(request_id, None)
            self._stacked = None

    def _stack(self, order: list[str]) -> tuple:
        fits = [self._fits[r] for r in order]
        k = max(f.components.shape[0] for f in fits)
        d = fits[0].mean.shape[0]
        comps = np.zeros((len(fits), k, d), np.float32)
        inv_var = np.zeros((len(fits), k), np.float32)
        for i, f in enumerate(fits):
            comps[i, : len(f.variances)] = f.components
            inv_var[i, : len(f.variances)] = 1.0 / f.variances
        means = np.stack([f.mean for f in fits])  # (R, d)
        inv_res = np.array([1.0 / f.residual for f in fits], np.float32)  # (R,)
        flat = comps.reshape(-1, d)  # (R*k, d)
        mean_proj = np.einsum("rkd,rd->rk", comps, means).reshape(-1)  # (R*k,)
        mean_sq = (means**2).sum(-1)
        return tuple(order), means, flat, mean_proj, mean_sq, inv_var, inv_res, k

    def scores(self, x: np.ndarray, order: list[str]) -> np.ndarray:
        """(n, R) negative Mahalanobis^2 / d of each row of x under each request's Gaussian."""
        x = np.asarray(x, np.float32)
        if not order:
            return np.zeros((len(x), 0), np.float32)
        with self._lock:
            if self._stacked is None or self._stacked[0] != tuple(order):
                self._stacked = self._stack(order)
            _, means, flat, mean_proj, mean_sq, inv_var, inv_res, k = self._stacked
        n, r = len(x), len(order)
        proj = (matmul_t(x, flat) - mean_proj).reshape(n, r, k)  # u.(x - mu)
        total = (x**2).sum(-1)[:, None] - 2 * matmul_t(x, means) + mean_sq  # ||x - mu||^2
        inside = (proj**2 * inv_var).sum(-1)
        outside = np.maximum(total - (proj**2).sum(-1), 0) * inv_res
        return -(inside + outside) / x.shape[-1]
