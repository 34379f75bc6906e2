"""THE method table: every forget method, what a flagged prompt gets, and how its artifact is made.

One entry per method drives the server (the intervention each route applies), the worker (the job
that trains the method's artifact), the evaluation (which methods are served) and the CLI help.
Adding a method is one entry here, one `Intervention` module in `unlearnd.interventions` (serve
side) and, when it trains anything, one job in `unlearnd.train` (offline side); nothing else.

Classes and jobs are named by import path and loaded on first use, so this module imports nothing
of unlearnd (the domain types in `domain` build their `Method` enum from it) and the server never
imports training code.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


def load_object(path: str) -> Any:
    """`"package.module:Name"` -> the object."""
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class MethodEntry:
    """One forget method: its route name, what it does, its serve and train halves."""

    name: str
    summary: str  # what a flagged prompt gets (CLI help, API docs)
    trains: str  # what the worker makes for it (README table)
    intervention: str  # "module:Class" of its `unlearnd.interventions.base.Intervention`
    job: str | Callable[..., dict] | None = None  # "module:function" (request, artifact_dir, ctx) -> report
    scales_by_weight: bool = False  # uses the detector's soft weight of a match (only then is it computed)
    timeout_s: float = 1800.0  # a job running longer is stopped and retried (options.timeout_s overrides)
    calls_model: bool = True  # False: a flagged prompt is answered without the model (no probabilities to score)
    seeded: bool = False  # its job draws on a seed (data order, initialisation, noise): one run per seed
    quick_options: dict[str, Any] = field(default_factory=dict)  # a job cut short, for tests and benchmarks
    attack_target: float | None = None  # the attack success rate `eval attacks` allows on this route

    def intervention_class(self) -> type:
        return load_object(self.intervention)

    def job_function(self) -> Callable[..., dict] | None:
        """The training job; None when the method needs nothing beyond the detector."""
        if self.job is None or callable(self.job):
            return self.job
        return load_object(self.job)


METHODS: dict[str, MethodEntry] = {
    entry.name: entry
    for entry in (
        MethodEntry(
            "refuse",
            "a fixed refusal (the filtering baseline)",
            "detector only",
            "unlearnd.interventions.guardrails:Refuse",
            calls_model=False,
            attack_target=0.05,
        ),
        MethodEntry(
            "prompt",
            'a system prompt "You have no knowledge of ..." (the prompting baseline)',
            "detector only",
            "unlearnd.interventions.guardrails:SystemPrompt",
        ),
        MethodEntry(
            "eco",
            "ECO: corrupted prompt embeddings on the entity tokens (or the whole question)",
            "corruption strength tuned by zeroth-order optimisation toward a surrogate target",
            "unlearnd.interventions.eco:ECO",
            "unlearnd.train.eco:eco_job",
            timeout_s=3 * 3600.0,
            seeded=True,
            quick_options={
                "preset": "cpu",
                "iterations": 1,
                "n_tune": 2,
                "n_eval": 2,
                "fluency_n": 1,
                "fluency_tokens": 4,
            },
            attack_target=0.10,
        ),
        MethodEntry(
            "soft_prompt",
            "SPUL: learned virtual tokens prepended as embeddings",
            "soft prompt, LLM frozen",
            "unlearnd.interventions.soft_prompt:SoftPrompt",
            "unlearnd.train.soft_prompt:soft_prompt_job",
            timeout_s=6 * 3600.0,
            seeded=True,
            quick_options={
                "preset": "cpu",
                "steps": 2,
                "batch_forget": 2,
                "batch_retain": 1,
                "n_retain": 2,
                "n_eval": 1,
                "n_samples": 1,
                "sample_tokens": 4,
            },
        ),
        MethodEntry(
            "lora",
            "O3: the request's own LoRA, orthogonal to earlier requests' adapters",
            "PEFT adapter served through vLLM's per-request LoRA",
            "unlearnd.interventions.lora:LoRA",
            "unlearnd.train.lora:lora_job",
            scales_by_weight=True,
            timeout_s=6 * 3600.0,
            seeded=True,
            quick_options={"preset": "cpu", "steps": 2, "batch_size": 2, "n_eval": 1, "n_samples": 1},
            attack_target=0.10,
        ),
    )
}

Method = StrEnum("Method", [(name, name) for name in METHODS])
Method.__doc__ = "How a flagged prompt is handled: each method is one route of the router."


def method_names() -> list[str]:
    return list(METHODS)


def seeded_methods() -> tuple[str, ...]:
    """Methods whose job draws on a seed (`eval tofu --seeds` runs them once per seed)."""
    return tuple(name for name, entry in METHODS.items() if entry.seeded)


def routes_without_model() -> frozenset[str]:
    """Routes whose answer never comes from the model (no probability, truth ratio or forget quality)."""
    return frozenset(name for name, entry in METHODS.items() if not entry.calls_model)


def quick_options(method: str) -> dict[str, Any]:
    """The method's job cut short (tests, benchmarks): serving cost does not depend on how well it trained."""
    return dict(METHODS[method].quick_options)


def attack_targets() -> dict[str, float]:
    """Attack success allowed per route, for the routes `eval attacks` holds to a target."""
    return {name: entry.attack_target for name, entry in METHODS.items() if entry.attack_target is not None}


def methods_help() -> str:
    """One line for CLI help: every method and what a flagged prompt gets."""
    return "; ".join(f"{m.name}: {m.summary}" for m in METHODS.values())
