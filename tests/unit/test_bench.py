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


def test_report_marks_targets(tmp_path):
    def cell(route, c, ours, plain):
        def summary(e2e):
            return {
                "requests": 2,
                "errors": 0,
                "ttft_p50": e2e / 10,
                "ttft_p99": e2e / 10,
                "tpot_p50": 0.01,
                "tpot_p99": 0.01,
                "e2e_p50": e2e,
                "e2e_p99": e2e,
                "req_throughput": 1 / e2e,
                "tok_throughput": 32 / e2e,
            }

        o, p = summary(ours), summary(plain)
        return {
            "route": route,
            "concurrency": c,
            "unlearnd": o,
            "vllm": p,
            "ratio": ratios(o, p),
            "routes_seen": [route],
            "e2e_unlearnd": [ours, ours],
            "e2e_vllm": [plain, plain],
        }

    result = {
        "config": {"output_len": 32},
        "cells": {"none@1": cell("none", 1, 1.01, 1.0), "none@16": cell("none", 16, 1.2, 1.0)},
        "sweep": [
            {"active_requests": 1, "classifier_ms_per_prompt": 1.0, "e2e_p50": 1.0},
            {"active_requests": 100, "classifier_ms_per_prompt": 1.1, "e2e_p50": 1.0},
        ],
    }
    md = write_report(
        result, tmp_path / "latency", run_stamp("unlearnd bench serve --test", dtype="float32")
    ).read_text()
    assert "`unlearnd bench serve --test`" in md
    assert f"{os.cpu_count()}-core CPU" in md and "engine dtype float32" in md  # what ran, not a fixed string
    assert "| non-flagged e2e p50 ratio, c=1 | 1.010 | <= 1.03 | yes |" in md
    assert "| non-flagged e2e p50 ratio, c=16 | 1.200 | <= 1.03 | **no** |" in md
    assert "| classifier cost 100 vs 1 requests | 1.100 | <= 1.2 | yes |" in md
    assert "| ECO route e2e p50 ratio, c=1 | n/a |" in md
    assert (tmp_path / "latency.png").stat().st_size > 1000 and (tmp_path / "latency.json").exists()


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
        "config": {"output_len": 8},
        "cells": {},
        "sweep": [],
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
