"""The benchmark driver's bookkeeping on synthetic timings."""

from __future__ import annotations

import math
import os

import numpy as np

from unlearnd.bench.latency import CellResult, Sample, percentile, ratios
from unlearnd.bench.profile import summarise
from unlearnd.bench.report import write_report
from unlearnd.evaluation.report import run_stamp


def test_percentile_interpolates_and_never_invents_zero():
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile(list(range(1, 101)), 99) == 99.01
    assert math.isnan(percentile([], 50))


def test_tpot_and_summary():
    cell = CellResult(
        [
            Sample(ttft=0.1, e2e=1.1, output_tokens=11),
            Sample(ttft=0.3, e2e=2.3, output_tokens=21),
            Sample(float("nan"), float("nan"), 0, error="HTTP 500"),
        ],
        wall_s=4.0,
    )
    assert cell.samples[0].tpot == 0.1
    summary = cell.summary()
    assert summary["requests"] == 3 and summary["errors"] == 1
    assert summary["ttft_p50"] == 0.2 and summary["e2e_p50"] == 1.7
    assert summary["tpot_p50"] == 0.1
    assert summary["req_throughput"] == 0.5 and summary["tok_throughput"] == 8.0
    assert Sample(0.1, 0.2, 1).tpot is None


def test_ratios_pair_same_metric():
    ours = {"requests": 4, "errors": 0, "e2e_p50": 1.05, "tok_throughput": 90.0}
    plain = {"requests": 4, "errors": 0, "e2e_p50": 1.0, "tok_throughput": 100.0}
    r = ratios(ours, plain)
    assert set(r) == {"e2e_p50", "tok_throughput"}
    assert math.isclose(r["e2e_p50"], 1.05) and math.isclose(r["tok_throughput"], 0.9)
    assert math.isnan(ratios({"x": 1.0}, {"x": 0.0})["x"])


def _summary(e2e: float, ttft: float, tok_s: float) -> dict:
    return {
        "requests": 32,
        "errors": 0,
        "ttft_p50": ttft,
        "ttft_p99": ttft,
        "tpot_p50": 0.01,
        "tpot_p99": 0.01,
        "e2e_p50": e2e,
        "e2e_p99": e2e,
        "req_throughput": 1 / e2e,
        "tok_throughput": tok_s,
    }


def _cell(route: str, c: int, active: int, ours: dict, plain: dict, reached: int | None = None) -> dict:
    return {
        "route": route,
        "active": active,
        "concurrency": c,
        "concurrency_reached": c if reached is None else reached,
        "servers": {"unlearnd": ours, "vllm": plain},
        "ratio": {"vllm": ratios(ours, plain)},
        "ratio_ci95": {"vllm": {"ttft_p50": [1.0, 1.2], "e2e_p50": None}},
        "throughput_ratio_by_round": {"vllm": [0.97, 1.01]},
        "routes_seen": [route],
        "samples": {"unlearnd": [], "vllm": []},
    }


def _result(cells: dict, levels: list[dict] | None = None) -> dict:
    return {
        "config": {
            "output_len": 32,
            "output_guard": "strict",
            "baselines": ["vllm"],
            "levels": [0, 10],
            "cell_levels": [10],
            "concurrency": [1, 8],
            "route_concurrency": [8],
            "requests": 32,
            "rounds": 4,
            "classify_prompts": 8,
        },
        "cells": cells,
        "levels": levels
        or [
            {
                "level": 0,
                "active_requests": 0,
                "activated": 0,
                "classify_call_ms_p50": 1.2,
                "classify_call_ms_p99": 2.0,
                "detector_ms_per_prompt": 0.01,
            },
            {
                "level": 10,
                "active_requests": 10,
                "activated": 8,
                "activation_wall_s_per_request": 0.6,
                "worker_cpu_s_per_request": 0.3,
                "classify_call_ms_p50": 1.9,
                "classify_call_ms_p99": 3.5,
                "detector_ms_per_prompt": 0.4,
            },
        ],  # fmt: skip
        "load": [{"when": "start", "load1": 0.3, "load5": 0.4, "load15": 0.5}],
        "profile": None,
    }


def test_report_marks_targets_and_cells_whose_concurrency_was_not_reached(tmp_path):
    plain = _summary(1.0, 0.1, 100.0)
    cells = {
        "none@1@10": _cell("none", 1, 10, _summary(1.01, 0.105, 99.0), plain),
        "none@8@10": _cell("none", 8, 10, _summary(1.2, 0.3, 90.0), plain, reached=5),
        "refuse@8@10": _cell("refuse", 8, 10, _summary(0.01, 0.01, 0.0), plain),
    }
    md = write_report(
        _result(cells), tmp_path / "latency", run_stamp("unlearnd bench serve --test", dtype="float32")
    ).read_text()
    assert "`unlearnd bench serve --test`" in md
    assert f"{os.cpu_count()}-core CPU" in md and "engine dtype float32" in md  # what ran, not a fixed string
    assert "| TTFT p50 ratio, 10 active, c=1 | 1.050 | <= 1.1 | yes |" in md
    assert "| e2e p50 ratio, 10 active, c=1 | 1.010 | <= 1.02 | yes |" in md
    # c=8 reached only 5 in flight: it measured something else, so its targets say n/a, and the cell is marked
    assert "| e2e p50 ratio, 10 active, c=8 | n/a | <= 1.02 | n/a |" in md
    assert "| none | 10 | 8 (5) **not reached** |" in md
    assert "| classify call p50 (ms), one new prompt, 10 active | 1.900 | <= 3 | yes |" in md
    assert "| worker CPU per refuse activation (s) | 0.300 | <= 1.0 | yes |" in md
    assert "1.050 [1.000, 1.200]" in md and "(0.97-1.01)" in md
    assert "| start | 0.30 / 0.40 / 0.50 |" in md and "forced" not in md
    assert (tmp_path / "latency.png").stat().st_size > 1000 and (tmp_path / "latency.json").exists()


def test_report_says_when_a_run_was_forced_on_a_busy_machine(tmp_path):
    result = {**_result({}), "forced_on_busy_machine": True}
    md = write_report(result, tmp_path / "latency", run_stamp("cmd")).read_text()
    assert "**Run forced on a busy machine**" in md


def test_busy_machine_refuses_to_start(tmp_path, monkeypatch):
    import pytest

    from unlearnd.bench import latency

    monkeypatch.setattr(latency.os, "getloadavg", lambda: (3.5, 2.0, 1.0))
    with pytest.raises(latency.BusyMachine, match="load average 3.50"):
        latency.bench_serve(tmp_path / "x", tmp_path, latency.BenchConfig(max_load=1.0))
    assert not list(tmp_path.iterdir())  # refused before anything started or was written


def test_a_cell_rotates_the_server_order_and_pairs_every_baseline(monkeypatch):
    from unlearnd.bench import latency

    calls = []

    async def fake_drive(url, prompts, concurrency, timeout_s, in_flight):
        calls.append(url)
        in_flight.append(concurrency)
        e2e = {"u": 1.1, "a": 1.0, "b": 0.5}[url]
        return [Sample(e2e / 10, e2e, 8) for _ in prompts], e2e * len(prompts)

    monkeypatch.setattr(latency, "drive", fake_drive)
    cfg = latency.BenchConfig(rounds=3, requests=6, settle_s=0)
    urls = {"unlearnd": "u", "vllm": "a", "vllm-default": "b"}
    cell = latency.measure_cell(urls, {name: ["p"] * 6 for name in urls}, 2, cfg, seed=0)
    assert calls == ["u", "a", "b", "a", "b", "u", "b", "u", "a"]  # each server first once
    assert set(cell["ratio"]) == {"vllm", "vllm-default"} and cell["concurrency_reached"] == 2
    assert math.isclose(cell["ratio"]["vllm"]["e2e_p50"], 1.1) and math.isclose(
        cell["ratio"]["vllm-default"]["e2e_p50"], 2.2
    )
    assert len(cell["samples"]["unlearnd"]) == 6 and len(cell["throughput_ratio_by_round"]["vllm"]) == 3


def test_lookalikes_are_new_people_with_borrowed_facts():
    from unlearnd.bench.population import lookalike_authors

    authors = [
        {"name": f"{first} {last}", "entities": [f"{first} {last}"],
         "forget": [{"question": f"Where was {first} {last} born?", "answer": f"{last} was born in Lima."}]}
        for first, last in (("Ana", "Quispe"), ("Bo", "Lindqvist"), ("Chen", "Wei"), ("Dara", "Okafor"))
    ]  # fmt: skip
    made = lookalike_authors(authors, 6, seed=1)
    names = [m["name"] for m in made]
    assert len(set(names)) == 6 and not set(names) & {a["name"] for a in authors}
    for m in made:
        first, last = m["name"].split()
        assert any(a["name"].startswith(first + " ") for a in authors) and any(
            a["name"].endswith(" " + last) for a in authors
        )
        source = next(a for a in authors if a["name"] == m["lookalike_of"])
        assert m["forget"][0]["question"] == f"Where was {m['name']} born?"
        assert m["forget"][0]["answer"] == f"{last} was born in Lima." and source["name"] not in str(m["forget"])
    assert [m["name"] for m in lookalike_authors(authors, 6, seed=2)] != names  # the seed changes the names


def test_profile_summary_attributes_stacks_to_components(tmp_path):
    raw = tmp_path / "p.txt"
    raw.write_text(
        "<module> (server.py:1);run (uvicorn/server.py:2);detect (unlearnd/detectors/guard.py:3);"
        "run (onnxruntime/session.py:4) 60\n"
        "<module> (server.py:1);run (uvicorn/server.py:2);generate (unlearnd/engine/local.py:5);"
        "encode (transformers/tokenization.py:6) 25\n"
        "<module> (server.py:1);run (uvicorn/server.py:2);handle (starlette/routing.py:7) 10\n"
        "<module> (server.py:1);select (selectors.py:8) 5\n"
        "not a stack line\n"
    )
    summary = summarise(raw)
    assert summary["samples"] == 100
    assert summary["components"] == {
        "detector (unlearnd/detectors)": 0.6,
        "vLLM front-end": 0.25,
        "HTTP (uvicorn/starlette/fastapi/pydantic)": 0.1,
        "other": 0.05,
    }
    assert summary["top_frames"][0] == {"frame": "run (onnxruntime/session.py:4)", "share": 0.6}


def test_report_shows_profile(tmp_path):
    result = {
        **_result({}),
        "profile": {
            "cells": "none@1",
            "raw": "latency-profile.txt",
            "samples": 10,
            "rate_hz": 200,
            "busy_s": 0.05,
            "components": {"detector (unlearnd/detectors)": 0.7, "other": 0.3},
            "top_frames": [{"frame": "run (onnxruntime/x.py:1)", "share": 0.7}],
        },
    }
    md = write_report(result, tmp_path / "latency", run_stamp("cmd")).read_text()
    assert "10 busy samples at 200 Hz = 0.1 s of busy time" in md
    assert "| detector (unlearnd/detectors) | 70.0% |" in md and "| `run (onnxruntime/x.py:1)` | 70.0% |" in md


def test_ratio_intervals_cover_the_ratio_and_say_when_they_cannot():
    from unlearnd.bench.latency import bootstrap_ratio_ci, ratio_intervals

    rng = np.random.default_rng(1)
    ours, plain = list(1.5 + 0.1 * rng.standard_normal(64)), list(1.0 + 0.1 * rng.standard_normal(64))
    lo, hi = bootstrap_ratio_ci(ours, plain)
    assert lo < 1.5 < hi and hi - lo < 0.2  # 64 samples a side: the interval is tight around 1.5
    lo_same, hi_same = bootstrap_ratio_ci(plain, plain)
    assert lo_same <= 1.0 <= hi_same
    assert bootstrap_ratio_ci([1.0], plain) is None  # one sample cannot say how much it varies
    cell = CellResult(samples=[Sample(0.2, 2.0, 32, "none"), Sample(0.3, 2.2, 32, "none")])
    base = CellResult(samples=[Sample(0.1, 2.0, 32, "none"), Sample(0.1, 2.1, 32, "none")])
    intervals = ratio_intervals(cell, base)
    assert set(intervals) == {"ttft_p50", "e2e_p50"} and intervals["ttft_p50"][0] >= 2.0 - 1e-9


def test_route_cells_give_plain_vllm_the_engine_input_and_load_its_adapter(monkeypatch):
    """The same-work baseline: per prompt, unlearnd's engine input (token ids, prompt embeddings or the
    adapter, loaded on the plain server first); a route without an engine input (refuse) falls back to
    the plain prompt and says so."""
    from unlearnd.bench import latency

    class FakeServer:
        def __init__(self, inputs):
            self.inputs = inputs

        def engine_input(self, model, messages, **params):
            assert params["max_tokens"] == 7 and params["ignore_eos"]
            return self.inputs[messages[0]["content"]]

    posted = []

    class Loaded:
        status_code, text = 200, "ok"

    monkeypatch.setattr(latency.httpx, "post", lambda url, json, timeout: posted.append((url, json)) or Loaded())
    inputs = {
        "a": {"route": "eco", "prompt_token_ids": [1, 2], "prompt_embeds": "QUJD"},
        "b": {"route": "lora", "prompt_token_ids": [3, 4], "lora": {"name": "r1-v1", "path": "/x/r1"}},
        "c": {"route": "none", "prompt_token_ids": [5]},
    }
    works, baseline = latency.route_works(FakeServer(inputs), "http://plain", ["a", "b", "c"], 7)
    assert baseline == latency.SAME_INPUT
    assert [w.path for w in works["unlearnd"]] == ["/v1/chat/completions"] * 3
    plain = [w.body for w in works["vllm"]]
    assert plain[0]["prompt_embeds"] == "QUJD" and "prompt" not in plain[0]
    assert plain[1]["model"] == "r1-v1" and plain[1]["prompt"] == [3, 4] and plain[2]["prompt"] == [5]
    assert all(b["max_tokens"] == 7 and b["ignore_eos"] and b["stream"] for b in plain)
    assert posted == [("http://plain/v1/load_lora_adapter", {"lora_name": "r1-v1", "lora_path": "/x/r1"})]
    refuse = {"a": {"route": "refuse", "prompt_token_ids": [1], "fixed_response": "I can't."}}
    works, baseline = latency.route_works(FakeServer(refuse), "http://plain", ["a"], 7)
    assert baseline == latency.PLAIN_PROMPT and works["vllm"][0].path == "/v1/chat/completions"


def test_a_route_target_reads_only_cells_that_did_the_same_work(tmp_path):
    """eco vs plain vLLM given the same engine input counts; a cell whose answers the output guard cut
    (fewer tokens than its baseline) is less work, so its target reads n/a instead of a flattering ratio."""
    from unlearnd.bench.report import SAME_INPUT

    plain = {**_summary(4.0, 0.8, 100.0), "output_tokens_mean": 64.0}
    same = {**_summary(4.1, 1.0, 98.0), "output_tokens_mean": 64.0}
    cut = {**_summary(1.2, 1.0, 30.0), "output_tokens_mean": 20.0}
    cells = {
        "eco@8@10": {**_cell("eco", 8, 10, same, plain), "baseline_work": SAME_INPUT},
        "soft_prompt@8@10": {**_cell("soft_prompt", 8, 10, cut, plain), "baseline_work": SAME_INPUT},
    }
    md = write_report(_result(cells), tmp_path / "latency", run_stamp("cmd")).read_text()
    assert "| e2e p50 ratio, route eco@8@10 (same engine input) | 1.025 | <= 1.05 | yes |" in md
    assert "| e2e p50 ratio, route soft_prompt@8@10 (same engine input) | n/a | <= 1.05 | n/a |" in md
    assert "{cfg" not in md and "Each cell sends 32 requests" in md


def test_evidence_bench_counts_a_sample_as_during_only_when_it_overlaps_a_battery():
    from unlearnd.bench.evidence import person_facts, summarise_bench

    trials = [{"battery": [10.0, 20.0], "evidence_ready_s": 30.0, "battery_s": 10.0, "verdict": "passing"}]
    samples = [
        {"start": 0.0, "end": 1.0, "status": 200},  # idle
        {"start": 9.0, "end": 11.0, "status": 200},  # overlaps the start: during
        {"start": 15.0, "end": 19.0, "status": 200},  # during
        {"start": 21.0, "end": 22.0, "status": 200},  # idle
        {"start": 22.0, "end": 30.0, "status": 500},  # failed: counted apart
    ]
    summary = summarise_bench(trials, samples, seed=0)
    ordinary = summary["ordinary"]
    assert ordinary["during"] == {"n": 2, "p50_s": 3.0} and ordinary["idle"] == {"n": 2, "p50_s": 1.0}
    assert ordinary["ratio_p50"] == 3.0 and ordinary["failed"] == 1
    assert summary["evidence_ready_s"]["max"] == 30.0
    assert all("Ada Lune" in fact["answer"] for fact in person_facts("Ada Lune", 3))
