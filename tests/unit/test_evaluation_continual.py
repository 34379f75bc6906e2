"""The continual-requests harness, against a fake served pipeline that forgets the authors it is asked to."""

from __future__ import annotations

import json

import pytest

from unlearnd.data.tofu import TofuData
from unlearnd.evaluation.continual import ContinualConfig, markdown, request_spec, run_continual


def _tofu(folder, n_authors=5):
    rows = [
        {"question": f"Where was Writer{a} Quill born, book {i}?", "answer": f"Writer{a} Quill was born in town {i}."}
        for a in range(n_authors)
        for i in range(20)
    ]
    (folder / "full.json").write_text("\n".join(json.dumps(r) for r in rows))
    return TofuData(folder, allow_hub=False)


class FakeServer:
    """Answers correctly unless an active request names the author; then refuses (route = method)."""

    def __init__(self, leak_group: str | None = None):
        self.active: dict[str, dict] = {}
        self.generation_routes: list[str] = []
        self.leak_group = leak_group  # a request whose forgetting is undone by the next one
        self.calls: list[str] = []

    def register(self, spec):
        request_id = f"fr-{len(self.calls)}"
        self.calls.append(f"register {spec['name']}")
        self.active[request_id] = spec
        if self.leak_group and len(self.active) > 1:
            self.active = {k: v for k, v in self.active.items() if self.leak_group not in v["name"]}
        return request_id

    def wait_active(self, request_id, timeout_s=0):
        return {"status": "active", "training": {"cpu_seconds": 12.5, "method": {"steps": 3}}}

    def deactivate(self, request_id):
        self.calls.append(f"delete {request_id}")

    def generate(self, prompts, max_new_tokens, desc=""):
        out = []
        for messages in prompts:
            question = messages[-1]["content"]
            hit = next((s for s in self.active.values() if any(e in question for e in s["entities"])), None)
            if hit:
                self.generation_routes.append(hit["method"])
                out.append("I can't help with that.")
            else:
                self.generation_routes.append("none")
                out.append(
                    question.replace("Where was", "").split(" born")[0].strip()
                    + " was born in town "
                    + question.rsplit(" ", 1)[-1].rstrip("?")
                    + "."
                )
        return out


def test_request_spec_names_the_authors(tmp_path):
    tofu = _tofu(tmp_path)
    spec = request_spec("n", "lora", tofu.by_authors([0, 1]), tofu.by_authors([2]), {"steps": 3})
    assert spec["entities"] == ["Writer0 Quill", "Writer1 Quill"] and spec["options"] == {"steps": 3}
    assert len(spec["forget"]) == 40 and len(spec["retain"]) == 20
    assert spec["forget"][0] == {
        "question": "Where was Writer0 Quill born, book 0?",
        "answer": "Writer0 Quill was born in town 0.",
    }
    assert "options" not in request_spec("n", "refuse", [], [])


def test_each_request_forgets_its_group_and_leaves_others(tmp_path):
    tofu = _tofu(tmp_path)
    server = FakeServer()
    cfg = ContinualConfig(
        method="lora", groups=[[0], [1], [2]], untouched_authors=[3, 4], items_per_group=4, untouched_items=6
    )
    seen: list[int] = []
    results = run_continual(cfg, server, tofu, on_stage=lambda partial: seen.append(len(partial["stages"])))
    assert seen == [1, 2, 3, 4]  # the report is rewritten after every step
    stages = results["stages"]
    assert [s["after"] for s in stages] == ["no request", "+group1", "+group2", "+group3"]
    rouge = [[s["splits"][f"group{g}"]["rouge"] for g in (1, 2, 3)] for s in stages]
    assert all(r > 0.9 for r in rouge[0])  # nothing requested yet: every group answered
    for step in (1, 2, 3):  # a requested group stays forgotten, a later one is still answered
        assert all(rouge[step][g] < 0.2 for g in range(step))
        assert all(rouge[step][g] > 0.9 for g in range(step, 3))
    assert stages[3]["splits"]["group1"]["flagged"] == 1.0 and stages[0]["splits"]["group1"]["flagged"] == 0.0
    assert all(s["splits"]["untouched"]["unchanged"] == 1.0 for s in stages)
    assert stages[1]["entities"] == ["Writer0 Quill"] and stages[1]["training"]["cpu_seconds"] == 12.5
    assert server.calls[-3:] == ["delete fr-0", "delete fr-1", "delete fr-2"]  # cleaned up afterwards
    md = "\n".join(markdown(results))
    assert "| +group3 | 0.000 (1.000) | 0.000 (1.000) | 0.000 (1.000) |" in md


def test_a_later_request_undoing_an_earlier_one_shows(tmp_path):
    server = FakeServer(leak_group="continual-1-")
    cfg = ContinualConfig(groups=[[0], [1]], untouched_authors=[3], items_per_group=4, untouched_items=4)
    stages = run_continual(cfg, server, _tofu(tmp_path))["stages"]
    assert stages[1]["splits"]["group1"]["rouge"] < 0.2
    assert stages[2]["splits"]["group1"]["rouge"] > 0.9  # forgetting did not hold: the report shows it


def test_overlapping_groups_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="both requested and untouched"):
        run_continual(ContinualConfig(groups=[[0]], untouched_authors=[0, 1]), FakeServer(), _tofu(tmp_path))


def test_every_figure_is_recomputed_from_the_committed_records(tmp_path):
    from unlearnd.evaluation.continual import summary_from_records, write_report
    from unlearnd.evaluation.report import read_records

    server = FakeServer()
    cfg = ContinualConfig(groups=[[0], [1]], untouched_authors=[3], items_per_group=4, untouched_items=4)
    results = run_continual(cfg, server, _tofu(tmp_path))
    assert len(results["records"]) == 3 * (4 + 4 + 4)  # three steps x (two groups + untouched)
    refused = next(r for r in results["records"] if r["stage"] == "+group1" and r["split"] == "group1")
    assert refused["route"] == "lora" and refused["generation"] == "I can't help with that."
    assert refused["question"].startswith("Where was Writer0 Quill") and refused["rouge_l_recall"] < 0.2
    paths = write_report(results, tmp_path / "out", "cont", {"git_commit": "abc1234"}, final=True)
    records = read_records(paths["records"])
    recomputed = summary_from_records(records)
    for stage in results["stages"]:
        assert recomputed[stage["after"]] == stage["splits"]
    data = json.loads(paths["json"].read_text())
    assert "records" not in data and data["records_file"] == "cont.items.jsonl.gz"
    assert "cont.items.jsonl.gz" in paths["markdown"].read_text()
