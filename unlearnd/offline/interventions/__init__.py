"""Offline training / tuning of the serve-time interventions: ECO, SPUL soft prompts, O3 LoRAs.

Each method has one function the registry worker calls (`train_eco`, `train_soft_prompt`,
`train_lora`; or the worker-signature wrappers in `jobs`) and one `unlearnd train` command.
"""

from unlearnd.offline.interventions.jobs import intervention_jobs

__all__ = ["intervention_jobs"]
