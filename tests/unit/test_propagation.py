"""The propagation benchmark's bookkeeping (the servers themselves run in `scripts/propagation_report.sh`)."""

from unlearnd.bench.propagation import invented_names, markdown, summarise


def test_names_never_share_a_part_and_the_seed_changes_them():
    names = invented_names(50, seed=0)
    parts = [p for n in names for p in n.split()]
    assert len(names) == 50 and len(parts) == len(set(parts))
    assert invented_names(50, seed=1) != names


def test_summary_misses_the_target_when_a_trial_never_propagated():
    records = [{"name": f"n{i}", "route_before": "none", "seconds": 0.1 + i / 100} for i in range(49)]
    summary = summarise(records)
    assert summary["met"] and summary["p50"] < summary["p99"] <= summary["max"] <= 2.0
    records.append({"name": "late", "route_before": "none", "seconds": None})
    missed = summarise(records)
    assert not missed["met"] and missed["enforced"] == 49
    report = {"summary": missed, "load_average": {"before": [0.5], "after": [0.7]}, "command": "c", "git_commit": "x"}
    assert "Target: missed" in markdown(report)
