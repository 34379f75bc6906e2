"""The method table is complete: every fact about a forget method lives in its `METHODS` entry, and every
part of unlearnd that depends on the method reads it from there."""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import pytest

from unlearnd.domain import ForgetSpec
from unlearnd.interventions.base import Intervention
from unlearnd.methods import METHODS, MethodEntry, attack_targets, quick_options, routes_without_model, seeded_methods

ENTRIES = list(METHODS.values())
README = Path(__file__).resolve().parents[2] / "README.md"


@pytest.mark.parametrize("entry", ENTRIES, ids=[e.name for e in ENTRIES])
def test_serve_half_loads(entry: MethodEntry):
    cls = entry.intervention_class()
    assert inspect.isclass(cls) and issubclass(cls, Intervention) and not inspect.isabstract(cls)
    assert ForgetSpec(name="Someone", method=entry.name, forget=["Who is Someone?"]).method == entry.name


@pytest.mark.parametrize("entry", ENTRIES, ids=[e.name for e in ENTRIES])
def test_train_half_and_its_quick_options(entry: MethodEntry):
    job = entry.job_function()
    if job is None:  # detector-only: nothing seeded, nothing to cut short
        assert not entry.seeded and not entry.quick_options
        return
    assert list(inspect.signature(job).parameters) == ["request", "artifact_dir", "ctx"]
    presets = importlib.import_module(job.__module__).PRESETS
    assert {"cpu", "full"} <= set(presets)
    fields = set(type(presets["cpu"]).model_fields) | {"preset"}
    assert entry.quick_options and set(entry.quick_options) <= fields, set(entry.quick_options) - fields
    assert entry.seeded == ("seed" in fields), "a job whose preset has a seed is run once per seed"


@pytest.mark.parametrize("entry", ENTRIES, ids=[e.name for e in ENTRIES])
def test_other_facts_are_well_formed(entry: MethodEntry):
    assert entry.timeout_s > 0
    assert entry.attack_target is None or 0 < entry.attack_target < 1
    assert (entry.name in routes_without_model()) == (not entry.calls_model)


def test_every_consumer_reads_the_table():
    from unlearnd.bench.latency import BenchConfig
    from unlearnd.evaluation import attacks, metrics, tofu

    assert set(tofu.SERVED_METHODS) >= set(METHODS)
    assert set(seeded_methods()) <= set(tofu.RANDOM_METHODS)
    assert not (set(METHODS) - set(seeded_methods())) & set(tofu.RANDOM_METHODS)
    assert metrics.NO_MODEL_ROUTES == routes_without_model()
    assert attacks.TARGETS == attack_targets()
    assert BenchConfig().route_options == {name: quick_options(name) for name in METHODS if quick_options(name)}


def test_readme_lists_every_method():
    text = README.read_text()
    for name in METHODS:
        assert f"| `{name}` |" in text, f"README's method table lacks {name}"
