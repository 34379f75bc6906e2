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
        "2",
        "--rounds",
        "2",
        "--output-len",
        "4",
        "--routes",
        "refuse",
        "--sweep",
        "1,2",
        "--sweep-requests",
        "2",
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
    assert set(result["cells"]) == {"none@1", "none@2", "refuse@1", "refuse@2"}
    for cell in result["cells"].values():
        assert cell["unlearnd"]["requests"] == 2 and cell["vllm"]["requests"] == 2
        assert cell["unlearnd"]["errors"] == 0 and cell["vllm"]["errors"] == 0
        assert cell["routes_seen"] == [cell["route"]]
        assert cell["ratio"]["e2e_p50"] > 0
    counts = [row["active_requests"] for row in result["sweep"]]
    assert counts[0] >= 1 and counts[1] >= 2 and counts == sorted(counts)
    assert all(row["classifier_ms_per_prompt"] > 0 for row in result["sweep"])
    assert "Command:" in out.with_suffix(".md").read_text()
