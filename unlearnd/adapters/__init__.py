"""Interventions: what happens to a flagged prompt. One `Intervention` interface, registered by route."""

from unlearnd.adapters.base import INTERVENTIONS, Intervention, PipelineContext, register_intervention
from unlearnd.adapters import guardrails as _guardrails  # noqa: F401  (registers refuse, prompt)
from unlearnd.adapters import eco as _eco  # noqa: F401  (registers eco)
from unlearnd.adapters import lora as _lora  # noqa: F401  (registers lora)
from unlearnd.adapters import soft_prompt as _soft_prompt  # noqa: F401  (registers soft_prompt)

__all__ = ["INTERVENTIONS", "Intervention", "PipelineContext", "register_intervention"]
