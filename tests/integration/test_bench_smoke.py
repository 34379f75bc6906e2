"""A tiny real run of `unlearnd bench serve` against the session's servers."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.integration.conftest import ADMIN_KEY

pytestmark = pytest.mark.integration


def test_bench_serve_smoke(plain_vllm, unlearnd_server, tofu, tmp_path):
    out = tmp_path / "latency"
    cmd = [
        sys.executable,
        "-m",
        "unlearnd.cli",
        "bench",
        "serve",
        "--out",
        str(out),
        "--data",
        str(tofu),
        "--concurrency",
        "1,2",
        "--requests",
        "4",
        "--rounds",
        "2",
        "--output-len",
        "4",
        "--routes",
        "refuse",
        "--route-concurrency",
        "2",
        "--levels",
        "0,2",
        "--cell-levels",
        "2",
        "--classify-prompts",
        "2",
        "--baselines",
        "vllm",
        "--force",  # the test machine is busy by design
        "--no-profile",
        "--plain-url",
        plain_vllm.url,
        "--unlearnd-url",
        unlearnd_server.url,
        "--admin-key",
        ADMIN_KEY,
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.with_suffix(".json").read_text())
    assert set(result["cells"]) == {"none@1@2", "none@2@2", "refuse@2@2"}
    for cell in result["cells"].values():
        servers = cell["servers"]
        assert set(servers) == {"unlearnd", "vllm"} and set(cell["ratio"]) == {"vllm"}
        assert servers["unlearnd"]["requests"] == 4 and servers["vllm"]["requests"] == 4
        assert servers["unlearnd"]["errors"] == 0 and servers["vllm"]["errors"] == 0
        assert cell["routes_seen"] == [cell["route"]] and cell["concurrency_reached"] == cell["concurrency"]
        assert cell["ratio"]["vllm"]["e2e_p50"] > 0 and len(cell["samples"]["unlearnd"]) == 4
    levels = result["levels"]
    assert [row["level"] for row in levels] == [0, 2] and levels[1]["active_requests"] >= 2
    assert all(row["classify_call_ms_p50"] > 0 for row in levels)
    md = out.with_suffix(".md").read_text()
    assert "Command:" in md and ("**Run forced on a busy machine**" in md) == result["forced_on_busy_machine"]
