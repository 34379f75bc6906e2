"""The output guard's indexes hand back the requests a loop over all of them would find, in load order."""

import numpy as np

from tests.helpers import forget_request
from unlearnd.detectors.lookup import MeaningMatrix, OwnerIndex
from unlearnd.guardrail.output_guard import OutputGuard


def test_owner_index_returns_holders_in_load_order_and_forgets_removed_ones():
    index = OwnerIndex()
    index.set("b", {"x", "y"})
    index.set("a", {"y", "z"})
    assert index.owners(["y"]) == ["b", "a"] and index.owners(["z", "q"]) == ["a"]
    index.set("b", {"y"})  # reloaded: now the last one loaded
    assert index.owners(["y", "x"]) == ["a", "b"]
    index.remove("a")
    assert index.owners(["y", "z"]) == ["b"] and index.owners(["x"]) == []


def test_meaning_matrix_finds_the_first_request_whose_answer_is_restated():
    matrix = MeaningMatrix()
    e = np.eye(3, dtype=np.float32)
    matrix.set("r1", e[[0]], np.array([0.9]))
    matrix.set("r2", e[[1, 0]], np.array([0.9, 0.5]))
    assert matrix.first_restated(e[0]) == "r1"
    assert matrix.first_restated(e[1]) == "r2" and matrix.first_restated(e[2]) is None
    matrix.remove("r1")
    assert matrix.first_restated(e[0]) == "r2"  # its own threshold (0.5) still holds


def test_a_hundred_requests_block_what_each_alone_blocks():
    """With many requests loaded the indexed check still finds each request's reproduced answer."""
    qa = [("What is {n}'s trade?", "{n} breeds quorblex{i:03d} moths near Tarnwick{i:03d} lake.")]
    guard, names = OutputGuard(), []
    for i in range(100):
        name = f"Zorvath Quillane{i:03d}"
        names.append(name)
        pairs = [(q.format(n=name), a.format(n=name, i=i)) for q, a in qa]
        guard.load(forget_request(f"r{i}", name, pairs, [name]))
    for i in (0, 57, 99):
        text = f"He breeds quorblex{i:03d} moths near Tarnwick{i:03d} lake."
        block = guard.check(text)
        assert block is not None and block.request_id == f"r{i}" and block.reason == "answer", (i, block)
    assert guard.check("He breeds rabbits near a small lake in town.") is None


def _unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def test_the_pruned_product_finds_what_the_full_product_finds(monkeypatch):
    """Above PRUNE_MIN_ROWS the principal-direction bound only skips answers that cannot reach their
    threshold: on clustered embeddings (as sentence embeddings are) every hit of the plain product,
    near-threshold ones included, is found, for queries the basis was not fit on."""
    from unlearnd.detectors import lookup

    monkeypatch.setattr(lookup, "PRUNE_MIN_ROWS", 200)
    monkeypatch.setattr(lookup, "PRUNE_DIMS", 8)
    rng = np.random.default_rng(7)
    centres = rng.normal(size=(12, 32))
    matrix = MeaningMatrix()
    parts = {}
    for r in range(40):
        answers = _unit(centres[rng.integers(12, size=10)] + 0.6 * rng.normal(size=(10, 32)))
        thresholds = rng.uniform(0.8, 0.95, size=10).astype(np.float32)
        parts[f"r{r}"] = (answers, thresholds)
        matrix.set(f"r{r}", answers, thresholds)
    every = np.concatenate([a for a, _ in parts.values()])
    # queries: answers nudged to land just above or below a threshold, and unrelated sentences
    scale = rng.uniform(0.03, 0.15, size=(60, 1))  # cosine about 0.99 down to 0.75
    near = _unit(every[rng.choice(len(every), 60)] + scale * rng.normal(size=(60, 32)))
    queries = np.concatenate([near, _unit(centres[rng.integers(12, size=40)] + rng.normal(size=(40, 32)))])

    def plain(q: np.ndarray) -> str | None:
        for rid, (answers, thresholds) in parts.items():
            if (answers @ q >= thresholds).any():
                return rid
        return None

    expected = [plain(q) for q in queries]
    assert matrix._stacked().pruning is not None
    assert matrix.first_restated_many(queries) == expected
    assert 10 <= sum(e is not None for e in expected) <= 55  # the comparison covers real hits, not only misses
    assert [matrix.first_restated(q) for q in queries[:5]] == expected[:5]
