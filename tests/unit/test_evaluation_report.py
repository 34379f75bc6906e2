"""The report builder: JSON + markdown table + PNG plots from a results dict."""

from __future__ import annotations

import json

import pytest

from unlearnd.evaluation.report import fmt, markdown, run_stamp, write_report


def results() -> dict:
    return {
        "preset": {"name": "mini", "forget_split": "forget05"},
        "split_sizes": {"forget": 200, "retain": 200},
        "settings": {"max_new_tokens": 96},
        "rouge_backend": "test",
        "metric_code": "abc123",
        "reference": {
            "target": {
                "n_items": 400,
                "forget_rouge_l_recall": 0.912,
                "train": {"wall_seconds": 1200.4, "cpu_seconds": 2300.0},
            }
        },
        "methods": {
            "retain": {
                "kind": "reference",
                "cost": {},
                "metrics": {"forget_quality": 1.0, "model_utility": 0.41, "extraction_strength": 0.05},
            },
            "grad_ascent": {
                "kind": "baseline",
                "cost": {"train_wall_seconds": 321.7, "train_cpu_seconds": 600.2},
                "metrics": {"forget_quality": 3.2e-7, "model_utility": 0.0, "extraction_strength": 0.02},
            },
            "refuse": {
                "kind": "served",
                "cost": {},
                "metrics": {"forget_quality": 0.02, "model_utility": 0.39, "extraction_strength": None},
                "routes": {"forget": {"refuse": 190, "pass": 10}},
                "robustness": {
                    "paraphrased": {"direct_rouge": 0.1, "paraphrased_rouge": 0.3},
                    "multiple_choice": {"forget": {"likelihood_accuracy": 0.25, "generated_accuracy": 0.2}},
                },
            },
            "npo": {"kind": "baseline", "cost": {}, "error": "RuntimeError: boom"},
            "target": {"kind": "reference", "cost": {}, "metrics": {"forget_quality": 1e-5, "model_utility": 0.40}},
            "eco": {
                "kind": "served",
                "cost": {"train_cpu_seconds": 55.0},
                "metrics": {"forget_quality": 0.6, "model_utility": 0.398},
                "training": {"method": "eco", "sigma": 0.0123, "reached": True, "history": [1, 2]},
            },
        },
    }


def test_fmt():
    assert fmt(None) == "n/a"
    assert fmt(float("nan")) == "n/a"
    assert fmt(0.12345) == "0.123"
    assert fmt(3.2e-7) == "3.20e-07"
    assert fmt(0.026, 0) == "0"  # a whole-number column does not switch to scientific notation
    assert fmt(1200.4, 0) == "1200"


def test_markdown_table_rows_and_missing_values():
    md = markdown({**results(), "command": "unlearnd eval tofu --preset mini", "machine": "2-core CPU, no GPU"})
    assert "Command: `unlearnd eval tofu --preset mini`" in md
    assert "2-core CPU, no GPU" in md
    row = next(line for line in md.splitlines() if line.startswith("| grad_ascent | baseline |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2] == "3.20e-07" and cells[3] == "0.000"  # forget quality, model utility
    assert cells[-2:] == ["322", "600"]  # train wall / CPU seconds
    refuse = next(line for line in md.splitlines() if line.startswith("| refuse | served |"))
    assert "n/a" in refuse  # extraction strength is not measurable over HTTP
    assert "| npo | baseline | failed: RuntimeError: boom |" in md
    assert "| target | 400 | 1200 | 2300 | 0.912 |" in md
    # a run from before `score_route_from` routed on the question and the gold answer
    assert "refuse (routed on the question and the scored answer; generation: n/a): " in md
    assert "forget: {'refuse': 190, 'pass': 10}" in md
    assert "| refuse | 0.100 | 0.300 | 0.250 / 0.200 |" in md


def test_write_report_files(tmp_path):
    paths = write_report(results(), tmp_path, "tofu_test", run_stamp("unlearnd eval tofu"), notes=["smoke"])
    data = json.loads(paths["json"].read_text())
    assert data["command"] == "unlearnd eval tofu" and data["notes"] == ["smoke"]
    assert data["methods"]["grad_ascent"]["metrics"]["forget_quality"] == 3.2e-7
    for key in ("scatter", "bars"):
        blob = paths[key].read_bytes()
        assert blob[:8] == b"\x89PNG\r\n\x1a\n" and len(blob) > 2000
    md = paths["markdown"].read_text()
    assert "![tofu_test_scatter](tofu_test_scatter.png)" in md and "- smoke" in md


def test_scatter_skipped_without_points(tmp_path):
    empty = {"methods": {"x": {"kind": "served", "metrics": {"forget_quality": None, "model_utility": None}}}}
    paths = write_report(empty, tmp_path, "empty", run_stamp("cmd"))
    assert "scatter" not in paths and not (tmp_path / "empty_scatter.png").exists()


def test_tradeoff_against_target_and_job_reports():
    md = markdown(results())
    lines = md.splitlines()
    assert any(line.startswith("## Trade-off against the target model") and "0.400" in line for line in lines)
    assert "| eco | served | 0.600 | 0.995 | yes | n/a | - |" in md  # 0.398 / 0.40 >= 0.99 and FQ >= 0.5
    assert "| grad_ascent | baseline | 3.20e-07 | 0.000 | no | n/a | refuse, eco |" in md
    assert "| refuse | served | 0.020 | 0.975 | no | n/a | - |" in md
    assert "than each): eco (baselines compared: grad_ascent)." in md
    # a baseline with more forget quality and utility than eco takes eco out of the lead
    better = results()
    better["methods"]["grad_ascent"]["metrics"].update({"forget_quality": 0.9, "model_utility": 0.41})
    md = markdown(better)
    assert "| eco | served | 0.600 | 0.995 | yes | n/a | grad_ascent |" in md
    assert "than each): none (baselines compared: grad_ascent)." in md
    # ahead means ahead on both axes: a baseline that ties eco's forget quality is not beaten
    tie = results()
    tie["methods"]["grad_ascent"]["metrics"].update({"forget_quality": 0.6, "model_utility": 0.1})
    assert "than each): none (baselines compared: grad_ascent)." in markdown(tie)
    assert not any(line.startswith("| retain |") and line.endswith("| no |") for line in lines)  # references excluded
    assert "- eco: method eco, sigma 0.012, reached yes" in md  # scalars only, lists left out


def test_goal_is_checked_at_the_lower_bound_of_forget_quality():
    data = results()
    data["methods"]["eco"]["intervals"] = {"forget_quality": [0.31, 0.9], "model_utility": [0.39, 0.41]}
    md = markdown(data)
    assert "| eco | served | 0.600 [0.310, 0.900] | 0.995 | yes | no | - |" in md
    assert "| eco | 0.600 [0.310, 0.900] | 0.398 [0.390, 0.410] | n/a | n/a | n/a |" in md  # the intervals table
    data["methods"]["eco"]["intervals"]["forget_quality"] = [0.5, 0.9]
    assert "| eco | served | 0.600 [0.500, 0.900] | 0.995 | yes | yes | - |" in markdown(data)


def test_not_applicable_reasons_and_seed_spread_are_printed():
    data = results()
    data["methods"]["refuse"]["not_applicable"] = {
        "forget_quality": "40 of 40 forget items routed to refuse: no probability",
        "forget_Q_A_Prob": "40 of 40 forget items routed to refuse: no probability",
        "extraction_strength": "needs argmax",
    }
    data["methods"]["npo"] = {"kind": "baseline", "seed": 0, "cost": {}, "metrics": {"forget_quality": 0.2}}
    data["methods"]["npo@seed1"] = {"kind": "baseline", "seed": 1, "cost": {}, "metrics": {"forget_quality": 0.7}}
    md = markdown(data)
    assert (
        "- refuse: forget_quality, forget_Q_A_Prob: n/a, 40 of 40 forget items routed to refuse: no probability." in md
    )
    assert "- refuse: extraction_strength: n/a, needs argmax." in md
    assert "| npo | 0, 1 | 0.200 – 0.700 | n/a | n/a |" in md


def test_merge_results_of_separate_runs():
    from unlearnd.evaluation.report import merge_results

    run = results()
    a = {
        **run,
        "command": "eval A",
        "methods": {k: run["methods"][k] for k in ("target", "retain", "grad_ascent")},
        "notes": ["PARTIAL: 3 of 4 methods done", "kept"],
        "examples": {"target": [{"question": "q", "answer": "a", "generation": "g"}]},
    }
    b = {**run, "command": "eval B", "methods": {"refuse": run["methods"]["refuse"]}, "notes": []}
    merged = merge_results([a, b])
    assert list(merged["methods"]) == ["target", "retain", "grad_ascent", "refuse"]
    # a run cut short stays marked, naming the run
    assert merged["notes"] == ["PARTIAL: 3 of 4 methods done (run: `eval A`)", "kept"]
    assert merged["examples"]["target"][0]["generation"] == "g"
    md = markdown({**merged, "command": "unlearnd eval merge a.json b.json"})
    assert "- `eval A`" in md and "- `eval B`" in md and "| refuse | served |" in md
    with pytest.raises(ValueError, match="more than one run"):
        merge_results([a, a])
    twice = merge_results([a, a], renames=[{}, {"grad_ascent": "grad_ascent_2", "target": "t2", "retain": "r2"}])
    assert (
        list(twice["methods"])[3:] == ["t2", "r2", "grad_ascent_2"] and twice["examples"]["t2"][0]["generation"] == "g"
    )
    with pytest.raises(ValueError, match="cannot rename"):
        merge_results([a, b], renames=[{}, {"eco": "x"}])
    with pytest.raises(ValueError, match="split_sizes"):
        merge_results([a, {**b, "split_sizes": {"forget": 1}}])
    # numbers from different metric code (or from before it was recorded) are not put in one table
    with pytest.raises(ValueError, match="different metric code"):
        merge_results([a, {**b, "metric_code": "def456"}])
    with pytest.raises(ValueError, match="different metric code"):
        merge_results([a, {k: v for k, v in b.items() if k != "metric_code"}])
    with pytest.raises(ValueError, match="rouge_backend"):  # stemmed and unstemmed ROUGE do not compare
        merge_results([a, {**b, "rouge_backend": "no stemming"}])
    with pytest.raises(ValueError, match="cross_fitting"):
        merge_results([a, {**b, "cross_fitting": {"n_folds": 3}}])


def test_merge_refuses_runs_against_different_reference_models():
    """One recipe (cache key) retrained is other weights: forget quality against it is another number."""
    from unlearnd.evaluation.report import merge_results

    def reference(where: str, wall: float, digest: str | None) -> dict:
        info = {"cache_key": "2835", "kind": "target", "forget_rouge_l_recall": 0.8, "train": {"wall_seconds": wall}}
        return {"target": {"dir": where, "weights_sha256": digest, **info}}

    run = results()
    a = {**run, "methods": {"target": run["methods"]["target"]}, "reference": reference("/a", 312.6, "sha256:1")}
    b = {**run, "methods": {"refuse": run["methods"]["refuse"]}, "reference": reference("/b", 312.6, None)}
    assert list(merge_results([a, b])["methods"]) == ["target", "refuse"]  # same model read from elsewhere
    with pytest.raises(ValueError, match="different target models"):
        merge_results([a, {**b, "reference": reference("/b", 704.0, None)}])
    with pytest.raises(ValueError, match="different target weights"):
        merge_results([a, {**b, "reference": reference("/a", 312.6, "sha256:2")}])
    with pytest.raises(ValueError, match="recorded no target"):
        merge_results([a, {k: v for k, v in b.items() if k != "reference"}])
    # the memorisation check `unlearnd train reference` adds to a cached model later is not its training
    checked = reference("/b", 312.6, None)
    checked["target"]["forget_rouge_l_recall"] = 0.7
    assert merge_results([a, {**b, "reference": checked}])["reference"]["target"]["weights_sha256"] == "sha256:1"
    # digests compare across every run, not only against the first's, and the merged report keeps them
    no_digest = {**a, "reference": reference("/a", 312.6, None)}
    with pytest.raises(ValueError, match="different target weights"):
        merge_results(
            [
                no_digest,
                {**b, "reference": reference("/b", 312.6, "sha256:1")},
                {**b, "methods": {}, "reference": reference("/c", 312.6, "sha256:2")},
            ]
        )
    assert merge_results([no_digest, b])["reference"]["target"]["weights_sha256"] is None


def test_weights_digest_reads_every_weight_byte(tmp_path):
    from unlearnd.train.reference import weights_digest

    assert weights_digest(tmp_path) is None
    (tmp_path / "model.safetensors").write_bytes(b"x" * (2 << 20))
    first = weights_digest(tmp_path)
    with (tmp_path / "model.safetensors").open("r+b") as fh:  # past the first MiB the fingerprint reads
        fh.seek(3 << 19)
        fh.write(b"y")
    assert first and first.startswith("sha256:") and weights_digest(tmp_path) != first


def test_git_commit_marks_uncommitted_code_but_not_reports(tmp_path):
    import subprocess

    from unlearnd.evaluation.report import git_commit

    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "reports").mkdir()
    (tmp_path / "code.py").write_text("x = 1\n")
    (tmp_path / "reports" / "r.md").write_text("old\n")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    head = git_commit(tmp_path)
    assert head and "+" not in head
    (tmp_path / "reports" / "r.md").write_text("new\n")
    assert git_commit(tmp_path) == head
    (tmp_path / "code.py").write_text("x = 2\n")
    assert git_commit(tmp_path) == head + "+dirty"
    git("checkout", "code.py")
    (tmp_path / "new_module.py").write_text("y = 1\n")  # new code that is not committed either
    assert git_commit(tmp_path) == head + "+dirty"
    (tmp_path / "new_module.py").unlink()
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "mod.py").write_text("z = 1\n")  # a change anywhere in the checkout counts
    assert git_commit(tmp_path) == head + "+dirty"


def test_run_stamp_refuses_a_dirty_tree_unless_allowed_and_marks_it(tmp_path, monkeypatch):
    import subprocess

    from unlearnd.evaluation.report import DirtyTreeError, stamp_lines

    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "code.py").write_text("x = 1\n")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    from unlearnd import provenance

    monkeypatch.setattr(provenance, "PACKAGE_ROOT", tmp_path)  # the checkout the running code comes from
    monkeypatch.chdir(tmp_path.parent)  # wherever the command is started from
    monkeypatch.delenv("UNLEARND_ALLOW_DIRTY", raising=False)
    clean = run_stamp("cmd")
    assert clean["dirty"] is False and "dirty" not in "\n".join(stamp_lines(clean))
    (tmp_path / "code.py").write_text("x = 2\n")
    with pytest.raises(DirtyTreeError, match="--allow-dirty"):
        run_stamp("cmd")
    stamp = run_stamp("cmd", allow_dirty=True)
    assert stamp["dirty"] is True and stamp["git_commit"].endswith("+dirty")
    assert any("dirty tree" in line for line in stamp_lines(stamp))
    monkeypatch.setenv("UNLEARND_ALLOW_DIRTY", "1")
    assert run_stamp("cmd")["dirty"] is True
    # code that is not in a git checkout at all has no commit to record: refused the same way
    monkeypatch.delenv("UNLEARND_ALLOW_DIRTY")
    outside = tmp_path / "sub"
    outside.mkdir()
    monkeypatch.setattr(provenance, "PACKAGE_ROOT", tmp_path.parent / "not-a-checkout")
    with pytest.raises(DirtyTreeError, match="no git commit"):
        run_stamp("cmd")


def test_command_line_masks_keys():
    from unlearnd.evaluation.report import command_line

    line = command_line(["eval", "detector", "--admin-key", "s3cret", "--api-key=k2", "--out", "r"])
    assert "s3cret" not in line and "k2" not in line and line.endswith("--out r")


def test_a_methods_run_comes_back_whole_from_the_per_item_records():
    from unlearnd.evaluation.metrics import ItemRecord, RunRecords, SplitRecords
    from unlearnd.evaluation.tofu import item_records, run_from_item_records

    def item(q: str) -> ItemRecord:
        return ItemRecord(question=q, answer="a", answer_lp=[-0.5, -1.0], perturbed_lp=[[-2.0]], generation="g")

    runs = {
        "retain": RunRecords(
            method="retain",
            splits={
                "forget": SplitRecords(split="forget", items=[item("q1"), item("q2")]),
                "retain": SplitRecords(split="retain", items=[item("q3")]),
            },
        ),
        "target": RunRecords(method="target", splits={"forget": SplitRecords(split="forget", items=[item("x")])}),
    }
    records = json.loads(json.dumps(item_records(runs)))  # as read back from the gzip file
    assert run_from_item_records(records, "retain") == runs["retain"]
    with pytest.raises(ValueError):
        run_from_item_records(records, "npo")
