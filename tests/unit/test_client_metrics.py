"""`UnlearndClient.metrics`: the one reader of /metrics samples the benchmarks use (evidence, latency)."""

from __future__ import annotations

import httpx

from unlearnd.client import UnlearndClient

EXPOSITION = """# HELP unlearnd_background_preempted_total Background calls aborted for a user
# TYPE unlearnd_background_preempted_total counter
unlearnd_background_preempted_total 32.0
unlearnd_background_preempted_created 1.7e9
unlearnd_classifier_latency_seconds_bucket{le="0.005"} 3.0
unlearnd_classifier_latency_seconds_sum 0.0125
unlearnd_classifier_latency_seconds_count 5.0
unlearnd_requests_total{route="none"} 7.0
"""


def test_unlabelled_samples_are_read_by_name_with_the_admin_key():
    seen = []

    def server(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("authorization"))
        return httpx.Response(200, text=EXPOSITION)

    client = UnlearndClient("http://u", admin_key="k", transport=httpx.MockTransport(server))
    names = ("unlearnd_background_preempted_total", "unlearnd_classifier_latency_seconds_sum", "missing_total")
    assert client.metrics(*names) == {
        "unlearnd_background_preempted_total": 32.0,
        "unlearnd_classifier_latency_seconds_sum": 0.0125,
    }
    assert seen == ["Bearer k"]
