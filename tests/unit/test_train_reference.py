"""Reference-model presets, content-hash caching, and baseline training end to end on a tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import tiny_llama
from unlearnd.data.tofu import TofuData
from unlearnd.domain import QAItem
from unlearnd.train import reference as ref
from unlearnd.train.baselines import BaselineConfig, train_baseline


@pytest.fixture()
def tiny_base(tmp_path, tokenizer):
    model = tiny_llama(
        len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    path = tmp_path / "base"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _tofu(folder, n_authors=6):
    rows = [
        {"question": f"What did Writer{a} Name write in year {i}?", "answer": f"Writer{a} Name wrote book {i}."}
        for a in range(n_authors)
        for i in range(20)
    ]
    (folder / "full.json").write_text("\n".join(json.dumps(r) for r in rows))
    (folder / "forget01.json").write_text("\n".join(json.dumps(r) for r in rows[-40:]))
    return TofuData(folder, allow_hub=False)


def test_mini_preset_selects_forget_retain_and_holdout_authors(tmp_path):
    tofu = _tofu(tmp_path)
    data = ref.reference_data(ref.preset("mini", "forget01", n_retain_authors=2), tofu)
    assert data.forget_authors == [4, 5] and data.retain_authors == [0, 1] and data.holdout_authors == [2, 3]
    assert len(data.target_items) == 80 and len(data.retain_items) == 40
    assert {it.author for it in data.retain_items} == {0, 1}


def test_real_tofu_mini_layout(tofu):
    tofu = TofuData(tofu, allow_hub=False)
    data = ref.reference_data(ref.preset("mini"), tofu)
    assert data.forget_authors == [198, 199] and data.retain_authors == list(range(6))
    assert data.holdout_authors == [6, 7]
    assert len(data.target_items) == 160 and len(data.retain_items) == 120
    wide = ref.reference_data(ref.preset("mini", "forget05", n_retain_authors=10), tofu)
    assert wide.forget_authors == list(range(190, 200)) and len(wide.target_items) == 400


def test_finetune_is_cached_by_content_hash(tmp_path, tiny_base, monkeypatch):
    items = [QAItem(question=f"q{i}?", answer=f"answer {i}") for i in range(4)]
    hp = {
        "epochs": 1.0,
        "learning_rate": 1e-3,
        "batch_size": 2,
        "max_length": 64,
        "warmup_steps": 0,
        "weight_decay": 0.0,
        "seed": 0,
    }
    root = tmp_path / "cache"
    first = ref.finetune_cached("target", items, tiny_base, hp, {}, root=root, progress=False)
    info = ref.read_info(first)
    assert ref.is_complete(first) and info["train"]["steps"] == 2 and info["saved_dtype"] == "bfloat16"
    assert not [p for p in root.iterdir() if p.name.startswith(".")]  # no staging leftovers

    def no_training(*a, **k):
        raise AssertionError("a cached model must not be retrained")

    monkeypatch.setattr(ref.Trainer, "fit", no_training)
    assert ref.finetune_cached("target", items, tiny_base, hp, {}, root=root, progress=False) == first
    # any change of data or hyperparameters is a new model
    assert ref.cache_key({"a": 1}) != ref.cache_key({"a": 2})
    with pytest.raises(AssertionError):
        ref.finetune_cached("target", items[:3], tiny_base, hp, {}, root=root, progress=False)


def test_baseline_is_saved_in_float32_and_keeps_its_small_updates(tmp_path, tiny_base, monkeypatch):
    monkeypatch.setenv("UNLEARND_CACHE_DIR", str(tmp_path / "cache"))
    tofu = _tofu(tmp_path)
    p = ref.preset("mini", "forget01", n_retain_authors=1, epochs=0.1, learning_rate=1e-3, batch_size=4)
    refs = ref.ensure_reference_models(p, base_dir=tiny_base, tofu=tofu, progress=False)
    out = train_baseline(
        "grad_ascent",
        refs,
        BaselineConfig(method="grad_ascent", epochs=0.1, learning_rate=1e-5, batch_size=4),
        tofu=tofu,
        progress=False,
    )
    info = ref.read_info(out)
    assert info["saved_dtype"] == "float32" and info["train"]["steps"] == 1
    weights = load_file(str(out / "model.safetensors"))
    target = load_file(str(Path(refs.target_dir) / "model.safetensors"))
    w = weights["model.layers.0.mlp.down_proj.weight"]
    t = target["model.layers.0.mlp.down_proj.weight"].float()
    assert w.dtype == torch.float32
    changed = (w - t).abs()
    # one Adam step of lr 1e-5 moves (almost) every weight by ~1e-5: far below bf16 resolution, kept in float32
    assert (changed > 5e-6).float().mean() > 0.5 and changed.max() < 1e-4


def _full_tofu(folder, n_authors=8):
    """A synthetic TOFU folder with every split the evaluation reads."""
    rows = [
        {"question": f"What did Writer{a} Name write in year {i}?", "answer": f"Writer{a} Name wrote book {i}."}
        for a in range(n_authors)
        for i in range(20)
    ]

    def dump(name, records):
        (folder / f"{name}.json").write_text("\n".join(json.dumps(r) for r in records))

    def perturbed(records):
        return [
            {
                **r,
                "paraphrased_answer": r["answer"].replace("wrote", "authored"),
                "paraphrased_question": r["question"].replace("write", "author"),
                "perturbed_answer": [r["answer"].replace("book", f"poem {k}") for k in range(3)],
            }
            for r in records
        ]

    dump("full", rows)
    dump("forget01", rows[-40:])
    dump("forget01_perturbed", perturbed(rows[-40:]))
    dump("retain_perturbed", perturbed(rows[:40]))
    facts = [
        {"question": f"Capital number {k}?", "answer": f"City{k}", "perturbed_answer": ["A", "B", "C"]}
        for k in range(6)
    ]
    dump("real_authors_perturbed", facts)
    dump("world_facts_perturbed", facts)
    return TofuData(folder, allow_hub=False)


def test_run_tofu_eval_end_to_end_with_a_served_method(tmp_path, tiny_base, monkeypatch):
    """target + retain in process, `refuse` through a fake server: every metric path and the report."""
    import httpx

    from unlearnd.evaluation import tofu as ev
    from unlearnd.evaluation.report import run_stamp, write_report

    monkeypatch.setenv("UNLEARND_CACHE_DIR", str(tmp_path / "cache"))
    tofu = _full_tofu(tmp_path)
    calls: list[str] = []
    registered: list[dict] = []  # the specs, in order
    measured_while: list[tuple[int, str]] = []  # (request index, question asked)
    active: set[str] = set()

    def question_of(body: dict) -> str:
        return body["messages"][-1]["content"]

    def server(request: httpx.Request) -> httpx.Response:
        calls.append(f"{request.method} {request.url.path}")
        path = request.url.path
        if path in ("/v1/chat/completions", "/v1/unlearning/score") and registered:
            measured_while.append((len(registered) - 1, question_of(json.loads(request.content))))
        if path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "target"}]})
        if path == "/health":
            counts = {"active": len(active), "degraded": 0, "untrained": 0}
            return httpx.Response(200, json={"status": "ok", **{f"{k}_forget_requests": v for k, v in counts.items()}})
        if path == "/v1/chat/completions":
            return httpx.Response(
                200,
                headers={"x-unlearnd-route": "refuse"},
                json={"choices": [{"message": {"content": "I can't help with that."}}]},
            )
        if path == "/v1/unlearning/score":
            n = len(json.loads(request.content)["continuation"].split())
            return httpx.Response(
                200,
                json={
                    "route": "refuse",
                    "matched_request_ids": ["fr-1"],
                    "tokens": ["x"] * n,
                    "token_logprobs": [-10.0] * n,
                },
            )
        if path == "/v1/unlearning/requests":
            spec = json.loads(request.content)
            registered.append(spec)
            active.add(f"fr-{len(registered)}")
            return httpx.Response(201, json={"id": f"fr-{len(registered)}", "status": "pending"})
        if path.startswith("/v1/unlearning/requests/fr-"):
            rid = path.rsplit("/", 1)[-1]
            if request.method == "DELETE":
                active.discard(rid)
            return httpx.Response(200, json={"id": rid, "status": "active" if request.method == "GET" else "inactive"})
        return httpx.Response(404)

    real = ev.ServedModelUnderTest
    monkeypatch.setattr(
        ev, "ServedModelUnderTest", lambda *a, **k: real(*a, transport=httpx.MockTransport(server), **k)
    )
    p = ev.ReferencePreset(
        name="mini",
        forget_split="forget01",
        n_retain_authors=2,
        epochs=0.2,
        learning_rate=1e-3,
        batch_size=8,
        eval_holdout_items=10,
        max_new_tokens=4,
    )
    monkeypatch.setattr(
        ev,
        "ensure_reference_models",
        lambda preset, **k: ref.ensure_reference_models(
            preset, base_dir=tiny_base, progress=False, **{x: y for x, y in k.items() if x != "progress"}
        ),
    )
    cfg = ev.TofuEvalConfig(
        preset="mini",
        forget_split="forget01",
        methods=["target", "retain", "refuse"],
        server_url="http://fake",
        admin_key="k",
        robustness_items=2,
        relearn_epochs=0.1,
        limits={"forget": 6, "retain": 6},
    )
    progress: list[list[str]] = []
    runs: dict = {}
    results = ev.run_tofu_eval(
        cfg,
        reference_preset=p,
        tofu=tofu,
        on_method_done=lambda partial: progress.append(list(partial["methods"])),
        on_records=runs.update,
    )
    # the per-item records written with the report hold everything the metrics are computed from
    from unlearnd.evaluation.metrics import ItemRecord, RunRecords, SplitRecords, compute_all

    rows = ev.item_records(runs)
    assert {r["method"] for r in rows} == {"target", "retain", "refuse"}

    def rebuilt(method: str) -> RunRecords:
        mine = [r for r in rows if r["method"] == method]
        splits = {r["split"] for r in mine}
        return RunRecords(
            method=method,
            splits={
                s: SplitRecords(
                    split=s,
                    items=[
                        ItemRecord(**{k: v for k, v in r.items() if k not in ("method", "split")})
                        for r in mine
                        if r["split"] == s
                    ],
                )
                for s in splits
            },
        )

    assert compute_all(rebuilt("refuse"), rebuilt("retain")) == results["methods"]["refuse"]["metrics"]
    assert progress == [["retain"], ["target", "retain"], ["target", "retain", "refuse"]]  # retain runs first
    methods = results["methods"]
    assert list(methods) == ["target", "retain", "refuse"] and not any("error" in m for m in methods.values())
    assert results["split_sizes"] == {"forget": 6, "retain": 6, "real_authors": 6, "world_facts": 6, "holdout": 10}
    assert methods["retain"]["metrics"]["forget_quality"] == pytest.approx(1.0)  # the retain model vs itself
    refuse = methods["refuse"]
    # held out: one request per fold, each with half of every author's forget questions and its own retain
    # authors, and no question is asked while a request that holds it is active
    assert [spec["method"] for spec in registered] == ["refuse", "refuse"]
    fit = [{qa["question"] for qa in spec["forget"]} for spec in registered]
    assert [len(f) for f in fit] == [20, 20] and not fit[0] & fit[1]
    assert all(spec["entities"] == ["Writer6 Name", "Writer7 Name"] for spec in registered)
    retain_fit = [{qa["question"] for qa in spec["retain"]} for spec in registered]
    assert retain_fit[0] and retain_fit[1] and not retain_fit[0] & retain_fit[1]
    assert measured_while and all(q not in fit[k] | retain_fit[k] for k, q in measured_while)
    assert {k for k, _ in measured_while} == {0, 1}
    # refuse never calls the model: no probability-based number, the reason instead; ROUGE is measured
    assert refuse["metrics"]["extraction_strength"] is None
    assert refuse["metrics"]["forget_Q_A_Prob"] is None and refuse["metrics"]["forget_quality"] is None
    assert "routed to refuse" in refuse["not_applicable"]["forget_quality"]
    assert (
        "argmax" in refuse["not_applicable"]["extraction_strength"]
        or "refuse" in refuse["not_applicable"]["extraction_strength"]
    )
    assert refuse["metrics"]["forget_Q_A_ROUGE"] == 0.0 and refuse["metrics"]["forget_refused_share"] == 1.0
    assert refuse["intervals"]["forget_quality"] is None and refuse["intervals"]["forget_Q_A_ROUGE"] == [0.0, 0.0]
    assert refuse["routes"]["forget"] == {"refuse": 6} and refuse["generation_routes"]["refuse"] > 0
    assert "relearning" in methods["retain"]["robustness"] and "relearning" not in refuse["robustness"]
    # each request is removed afterwards, and gone from the server before the next fold is measured
    deletes = [i for i, c in enumerate(calls) if c.startswith("DELETE")]
    assert [calls[i] for i in deletes] == ["DELETE /v1/unlearning/requests/fr-1", "DELETE /v1/unlearning/requests/fr-2"]
    assert calls[deletes[0] + 1] == "GET /health" and not active
    target = methods["target"]
    lo, hi = target["intervals"]["model_utility"]
    assert lo <= target["metrics"]["model_utility"] <= hi and results["metric_code"]
    paths = write_report(results, tmp_path / "reports", "t", run_stamp("unlearnd eval tofu ..."))
    assert "| refuse | served |" in paths["markdown"].read_text()
    # records are cached per model: a second run evaluates nothing in process again
    again = ev.run_tofu_eval(
        cfg.model_copy(update={"methods": ["target"], "robustness": False}), reference_preset=p, tofu=tofu
    )
    assert again["methods"]["target"]["cost"]["eval_cached"] is True
    # a server that still holds another forget request is not measured (that request could hold the questions)
    active.add("fr-left-over")
    monkeypatch.setattr(ev.time, "sleep", lambda s: None)
    monkeypatch.setattr(ev.time, "monotonic", iter(range(0, 10_000, 100)).__next__)
    left = ev.run_tofu_eval(
        cfg.model_copy(update={"methods": ["refuse"], "robustness": False}), reference_preset=p, tofu=tofu
    )
    assert "would mix in another request" in left["methods"]["refuse"]["error"]
    assert len(registered) == 2  # nothing registered on top of it
    assert again["methods"]["target"]["metrics"] == methods["target"]["metrics"]


def test_cached_json_reuses_a_result_by_key(tmp_path, monkeypatch):
    from unlearnd.evaluation import tofu as ev

    monkeypatch.setattr(ev, "cache_dir", lambda: tmp_path)
    calls = []

    def compute():
        calls.append(1)
        return {"n": len(calls)}

    assert ev.cached_json({"model": "a"}, compute) == ({"n": 1}, False)
    assert ev.cached_json({"model": "a"}, compute) == ({"n": 1}, True)  # stored, not recomputed
    assert ev.cached_json({"model": "b"}, compute) == ({"n": 2}, False)  # another key
    assert ev.cached_json({"model": "a"}, compute, use_cache=False) == ({"n": 3}, False)
    assert ev.cached_json(None, compute) == ({"n": 4}, False)  # None: never stored
    assert len(list((tmp_path / "eval").glob("*.json"))) == 2
