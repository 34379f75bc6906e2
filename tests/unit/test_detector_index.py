"""The shared faiss index and the stacked Gaussians: exact per-request scores, add/remove."""

import numpy as np
import pytest

from unlearnd.detectors.index import NO_MATCH, GaussianBank, GaussianFit, SharedIndex


def unit(x):
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def test_shared_index_max_per_request_and_remove():
    rng = np.random.default_rng(0)
    a, b, c = unit(rng.normal(size=(5, 8))), unit(rng.normal(size=(7, 8))), unit(rng.normal(size=(3, 8)))
    index = SharedIndex(8, top_k=64)
    index.add("a", a)
    index.add("b", b)
    index.add("c", c)
    q = unit(rng.normal(size=(4, 8)))
    got = index.max_scores(q, ["a", "b", "c"])
    want = np.stack([(q @ m.T).max(1) for m in (a, b, c)], 1)
    assert np.allclose(got, want, atol=1e-5)
    index.remove("b")
    assert len(index) == 8 and index.request_ids == ["a", "c"]
    got = index.max_scores(q, ["a", "b", "c"])
    assert np.allclose(got[:, [0, 2]], want[:, [0, 2]], atol=1e-5)
    assert (got[:, 1] == NO_MATCH).all()  # unknown request: no match
    index.add("a", c)  # replacing a request's vectors
    assert np.allclose(index.max_scores(q, ["a"])[:, 0], (q @ c.T).max(1), atol=1e-5)


def test_shared_index_top_k_cut_marks_unseen_requests():
    index = SharedIndex(2, top_k=1)
    index.add("near", unit(np.array([[1.0, 0.0]])))
    index.add("far", unit(np.array([[-1.0, 0.0]])))
    got = index.max_scores(unit(np.array([[1.0, 0.1]])), ["near", "far"])
    assert got[0, 0] > 0.99 and got[0, 1] == NO_MATCH


def test_gaussian_fit_orders_by_typicality():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(200, 6)) * np.array([3, 1, 1, 1, 1, 1]) + 5
    fit = GaussianFit.fit(x, k=2)
    near, far = np.full((1, 6), 5.0), np.full((1, 6), 5.0)
    far[0, 1] += 6  # 6 sd along a low-variance direction
    along = np.full((1, 6), 5.0)
    along[0, 0] += 6  # 6 units along the high-variance direction = 2 sd
    s = fit.score(np.concatenate([near, along, far]))
    assert s[0] > s[1] > s[2]


def test_gaussian_bank_matches_single_fits():
    rng = np.random.default_rng(2)
    fits = {r: GaussianFit.fit(rng.normal(size=(50, 10)) + i, k=3 + i) for i, r in enumerate("xyz")}
    bank = GaussianBank()
    for r, f in fits.items():
        bank.add(r, f)
    q = rng.normal(size=(5, 10)).astype(np.float32)
    got = bank.scores(q, ["z", "x", "y"])
    for j, r in enumerate(["z", "x", "y"]):
        assert np.allclose(got[:, j], fits[r].score(q), rtol=1e-4, atol=1e-4)
    bank.remove("x")
    assert bank.scores(q, ["y"]).shape == (5, 1)
    with pytest.raises(KeyError):
        bank.scores(q, ["x"])


def test_shared_index_switches_to_ivf_and_keeps_nearest():
    rng = np.random.default_rng(3)
    index = SharedIndex(16, top_k=8, ivf_above=1000, nprobe=8)
    centres = unit(rng.normal(size=(30, 16)))
    for r in range(30):  # 30 requests x 50 vectors around their own centre
        index.add(f"r{r}", unit(centres[r] + 0.05 * rng.normal(size=(50, 16))))
    assert index.approximate and len(index) == 1500
    q = unit(centres[[3, 17]] + 0.01 * rng.normal(size=(2, 16)))
    got = index.max_scores(q, [f"r{r}" for r in range(30)])
    assert got[0].argmax() == 3 and got[1].argmax() == 17 and got[0, 3] > 0.95
    for r in range(25):
        index.remove(f"r{r}")
    assert not index.approximate and len(index) == 250  # small again: exact
