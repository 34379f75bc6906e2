"""Interventions: what happens to a flagged prompt. One `Intervention` interface, registered by route."""

from unlearnd.interventions.base import INTERVENTIONS, Intervention, PipelineContext, register_intervention
from unlearnd.interventions import guardrails as _guardrails  # noqa: F401  (registers refuse, prompt)
from unlearnd.interventions import eco as _eco  # noqa: F401  (registers eco)
from unlearnd.interventions import lora as _lora  # noqa: F401  (registers lora)
from unlearnd.interventions import soft_prompt as _soft_prompt  # noqa: F401  (registers soft_prompt)

__all__ = ["INTERVENTIONS", "Intervention", "PipelineContext", "register_intervention"]
