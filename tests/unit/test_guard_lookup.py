"""The output guard's indexes hand back the requests a loop over all of them would find, in load order."""

import numpy as np

from tests.helpers import forget_request
from unlearnd.guardrail.lookup import MeaningMatrix, OwnerIndex
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
