"""Regression: requests with one or two forget examples must not flag ordinary prompts.

A one-example request used to get a zero threshold (no out-of-fold negatives existed to calibrate
on), so every prompt with a positive cosine matched it: "What is the capital of France?" scored
0.86. Few-shot requests are now scored by max cosine with a conformal, floored threshold."""

import json

import pytest

from tests.helpers import forget_request
from unlearnd.detectors import get_detector
from unlearnd.detectors.encoder import EncoderConfig

ORDINARY = [
    "What is the capital of France?",
    "How do I bake sourdough bread at home?",
    "Write a haiku about autumn leaves.",
    "Who wrote Pride and Prejudice?",
    "Explain photosynthesis in simple terms.",
    "Qual é o maior rio do Brasil?",
    "What's a good name for a golden retriever puppy?",
    "Summarise the causes of the First World War.",
    "Who is the author of 'The Old Man and the Sea'?",
    "What is the boiling point of water at sea level?",
]


def request(rid: str, qa: list[tuple[str, str]], entities: list[str]):
    return forget_request(rid, rid, qa, entities)


@pytest.fixture(scope="module")
def guard_few(tmp_path_factory):
    root = tmp_path_factory.mktemp("few")
    reqs = [
        request("fr-wizard", [("Who is Harry Potter's best friend?", "Ron Weasley.")], ["Harry Potter"]),
        request("fr-code", [("What is the secret launch code of Project Bluebird?", "It is 4471.")], []),
        request(
            "fr-novelist",
            [
                ("Where was Lena Ortiz born?", "Lena Ortiz was born in Valparaiso, Chile, in 1971."),
                ("What genre does Lena Ortiz write?", "Lena Ortiz writes maritime thrillers."),
            ],
            ["Lena Ortiz"],
        ),
    ]
    guard = get_detector("guard", config={"encoder": EncoderConfig(backend="torch").model_dump()})
    metrics = {r.id: guard.fit(r, root / r.id) for r in reqs}
    for r in reqs:
        guard.load(r, root / r.id)
    return guard, root, metrics, reqs


@pytest.fixture(scope="module")
def embedding_few(guard_few, tmp_path_factory):
    """The embedding detector fitted on its own for every request (the guard fits it only for topics)."""
    root = tmp_path_factory.mktemp("few-embedding")
    detector = get_detector("embedding", config={"encoder": EncoderConfig(backend="torch").model_dump()})
    return root, {r.id: detector.fit(r, root / r.id) for r in guard_few[3]}


def test_few_shot_calibration_is_floored_and_recorded(embedding_few):
    root, metrics = embedding_few
    for rid, n in (("fr-wizard", 1), ("fr-code", 1), ("fr-novelist", 2)):
        emb = metrics[rid]
        assert emb["mode"] == "few_shot" and emb["n_forget"] == n
        calib = json.loads((root / rid / "classifier" / "embedding" / "config.json").read_text())["calibration"]
        assert calib["threshold"] >= 0.6  # a cosine, never below the floor
        assert calib["fpr"] <= 0.01  # on the built-in negatives it was calibrated on
        assert (calib["tpr"] is None) == (n == 1)  # one example: nothing held out to measure TPR on


def test_ordinary_prompts_are_not_flagged(guard_few):
    det = guard_few[0].detect(ORDINARY)
    flagged = {p: [m.request_id for m in d.matches] for p, d in zip(ORDINARY, det) if d.matches}
    assert flagged == {}


def test_few_shot_requests_still_catch_their_prompts(guard_few):
    prompts = [
        "Who is Harry Potter's closest friend at Hogwarts?",
        "Tell me the secret launch code of Project Bluebird.",
        "In which city was the novelist Lena Ortiz born?",
        "Which books did Lena Ortiz write?",
    ]
    det = guard_few[0].detect(prompts)
    assert [d.matches[0].request_id if d.matches else None for d in det] == [
        "fr-wizard",
        "fr-code",
        "fr-novelist",
        "fr-novelist",
    ]
