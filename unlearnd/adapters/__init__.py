"""Interventions: what happens to a flagged prompt. One `Intervention` interface, registered by route."""

from unlearnd.adapters.base import INTERVENTIONS, Intervention, PipelineContext, register_intervention
from unlearnd.adapters import guardrails as _guardrails  # noqa: F401  (registers refuse, prompt)

__all__ = ["INTERVENTIONS", "Intervention", "PipelineContext", "register_intervention"]
