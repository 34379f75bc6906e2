"""The `unlearnd requests` CLI on a local registry."""

from __future__ import annotations

import dataclasses
import json

from typer.testing import CliRunner

from unlearnd.cli import app
from unlearnd.domain import Status
from unlearnd.registry import Registry

runner = CliRunner()


def test_requests_add_list_show_remove(tmp_path):
    forget = tmp_path / "forget.jsonl"
    forget.write_text(
        json.dumps({"question": "Who is Jane Roe?", "answer": "A poet."})
        + "\n"
        + json.dumps({"text": "Jane Roe wrote three books."})
        + "\n"
    )
    data = str(tmp_path / "data")
    added = runner.invoke(
        app,
        [
            "requests",
            "add",
            "--name",
            "Jane Roe",
            "--forget",
            str(forget),
            "--method",
            "prompt",
            "--entity",
            "Jane Roe",
            "--entity",
            "J. Roe",
            "--data-dir",
            data,
        ],
    )
    assert added.exit_code == 0, added.output
    request_id = json.loads(added.output)["id"]
    record = Registry(data).get(request_id)
    assert record.method.value == "prompt" and record.spec.entities == ["Jane Roe", "J. Roe"]
    assert record.spec.forget[1] == "Jane Roe wrote three books."

    listed = runner.invoke(app, ["requests", "list", "--data-dir", data])
    assert request_id in listed.output and "pending" in listed.output and "Jane Roe" in listed.output
    shown = runner.invoke(app, ["requests", "show", request_id, "--data-dir", data])
    assert json.loads(shown.output)["spec"]["name"] == "Jane Roe"
    removed = runner.invoke(app, ["requests", "remove", request_id, "--data-dir", data])
    assert removed.exit_code == 0 and Registry(data).get(request_id).status == Status.inactive
    missing = runner.invoke(app, ["requests", "show", "fr-nope", "--data-dir", data])
    assert missing.exit_code == 1 and "not found" in missing.output


def test_train_job_runs_the_methods_own_job_from_the_table(tmp_path, monkeypatch):
    """`unlearnd train job` needs no command of its own per method: the method table names the job."""
    from unlearnd import methods
    from unlearnd.domain import ForgetSpec

    data = tmp_path / "data"
    registry = Registry(data)
    refuse = registry.add(ForgetSpec(name="Jane Roe", method="refuse", forget=["Who is Jane Roe?"])).id
    eco = registry.add(ForgetSpec(name="John Doe", method="eco", forget=["Who is John Doe?"])).id
    ran = []

    def fake_job(request, artifact_dir, ctx):
        ran.append((request.id, artifact_dir, ctx.model))
        return {"trained": request.name}

    monkeypatch.setitem(methods.METHODS, "eco", dataclasses.replace(methods.METHODS["eco"], job=fake_job))
    model = "example-org/some-model"  # a hub id: passed on as it is, never loaded here
    detector_only = runner.invoke(app, ["train", "job", "--request", refuse, "--data-dir", str(data)])
    assert detector_only.exit_code == 0 and "detector only" in detector_only.output
    trained = runner.invoke(app, ["train", "job", "--request", eco, "--data-dir", str(data), "--model", model])
    assert trained.exit_code == 0, trained.output
    assert json.loads(trained.output) == {"trained": "John Doe"}
    assert ran == [(eco, registry.artifact_dir(eco), model)]


def test_requests_add_rejects_bad_method(tmp_path):
    forget = tmp_path / "forget.jsonl"
    forget.write_text(json.dumps({"question": "Who is Jane Roe?"}) + "\n")
    result = runner.invoke(
        app,
        [
            "requests",
            "add",
            "--name",
            "Jane Roe",
            "--forget",
            str(forget),
            "--method",
            "bogus",
            "--data-dir",
            str(tmp_path),
        ],
    )
    assert result.exit_code == 2 and "method" in result.output


def test_eval_merge_writes_one_report_and_rejects_mismatched_runs(tmp_path):
    base = {
        "preset": {"name": "mini", "forget_split": "forget01"},
        "split_sizes": {"forget": 2},
        "settings": {"max_new_tokens": 8},
        "metric_code": "abc123",
    }
    a = {**base, "command": "eval A", "methods": {"target": {"kind": "reference", "metrics": {"model_utility": 0.4}}}}
    b = {**base, "command": "eval B", "methods": {"refuse": {"kind": "served", "metrics": {"model_utility": 0.39}}}}
    for name, run in (("a", a), ("b", b), ("c", {**b, "split_sizes": {"forget": 3}})):
        (tmp_path / f"{name}.json").write_text(json.dumps(run))
    out = tmp_path / "reports"
    result = runner.invoke(
        app,
        [
            "eval",
            "merge",
            str(tmp_path / "a.json"),
            str(tmp_path / "b.json"),
            "--out",
            str(out),
            "--name",
            "m",
            "--note",
            "hello",
        ],
    )
    assert result.exit_code == 0, result.output
    md = (out / "m.md").read_text()
    assert "| target | reference |" in md and "| refuse | served |" in md and "- `eval B`" in md and "- hello" in md
    bad = runner.invoke(
        app, ["eval", "merge", str(tmp_path / "a.json"), str(tmp_path / "c.json"), "--out", str(out), "--name", "x"]
    )
    assert bad.exit_code != 0 and "split_sizes" in bad.output and not (out / "x.md").exists()


def test_eval_merge_renames_a_method_of_one_run(tmp_path):
    base = {
        "preset": {"name": "mini", "forget_split": "forget01"},
        "split_sizes": {"forget": 2},
        "settings": {"max_new_tokens": 8},
        "metric_code": "abc123",
    }
    run = {**base, "command": "eval", "methods": {"eco": {"kind": "served", "metrics": {"model_utility": 0.39}}}}
    (tmp_path / "a.json").write_text(json.dumps(run))
    (tmp_path / "b.json").write_text(json.dumps(run))
    out = tmp_path / "reports"
    args = ["eval", "merge", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--out", str(out), "--name", "m"]
    clash = runner.invoke(app, args)
    assert clash.exit_code != 0 and "more than one run" in clash.output
    result = runner.invoke(app, [*args, "--rename", "1:eco=eco_old"])
    assert result.exit_code == 0, result.output
    md = (out / "m.md").read_text()
    assert "| eco_old | served |" in md and "| eco | served |" in md
    bad = runner.invoke(app, [*args, "--rename", "3:eco=x"])
    assert bad.exit_code != 0 and "N:OLD=NEW" in bad.output


def test_eval_tofu_rejects_a_request_option_without_method():
    bad = runner.invoke(app, ["eval", "tofu", "--methods", "lora", "--request-option", "steps=3"])
    assert bad.exit_code != 0 and "METHOD:KEY=VALUE" in bad.output
