"""Prometheus metrics served at /metrics."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry()

REQUESTS = Counter(
    "unlearnd_requests", "Generation requests by route and endpoint", ["route", "endpoint"], registry=REGISTRY
)
ERRORS = Counter("unlearnd_errors", "Error responses by status code", ["status"], registry=REGISTRY)
CLASSIFIER_LATENCY = Histogram(
    "unlearnd_classifier_latency_seconds",
    "Detector latency per prompt",
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0),
    registry=REGISTRY,
)
ENGINE_TTFT = Histogram(
    "unlearnd_engine_ttft_seconds",
    "Engine time to first token",
    ["route"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
    registry=REGISTRY,
)
ENGINE_LATENCY = Histogram(
    "unlearnd_engine_latency_seconds",
    "Engine end-to-end generation latency",
    ["route"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
    registry=REGISTRY,
)
OUTPUT_BLOCKED = Counter(
    "unlearnd_output_blocked",
    "Choices whose generated text the output guard cut (it gave a forget request away), by route and reason",
    ["route", "reason"],
    registry=REGISTRY,
)
BACKGROUND_PREEMPTED = Counter(
    "unlearnd_background_preempted",
    "Background generations (evidence probes) aborted to give way to a user's and started again",
    registry=REGISTRY,
)
ACTIVE_REQUESTS = Gauge("unlearnd_active_forget_requests", "Forget requests being served", registry=REGISTRY)
UNTRAINED_REQUESTS = Gauge(
    "unlearnd_untrained_forget_requests",
    "Forget requests not trained yet (or whose training failed): matched by name and refused meanwhile",
    registry=REGISTRY,
)
DEGRADED_REQUESTS = Gauge(
    "unlearnd_degraded_forget_requests",
    "Forget requests whose artifacts could not be loaded: matched by name and refused until re-trained",
    registry=REGISTRY,
)
EVIDENCE = Gauge(
    "unlearnd_evidence_requests",
    "Forget requests by their evidence (passing, failing, error, pending, running); failing: a probe leaked",
    ["verdict"],
    registry=REGISTRY,
)
ENGINE_DEAD = Gauge("unlearnd_engine_dead", "1 once the engine can serve nothing any more", registry=REGISTRY)
