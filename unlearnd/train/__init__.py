"""Offline training: the shared trainer, data encoding, the finetuning baselines, reference models and
the per-request jobs of the served interventions (ECO tuning, SPUL soft prompts, O3 LoRAs)."""
