"""Registry-worker entry points: one job per method, with the worker's `MethodJob` signature
(request, artifact_dir, ctx) -> report dict, where `ctx` offers `model_path()` and `registry`.

Method options read from `spec.options` (all optional): `preset` ("cpu" | "full"; default "full"
when a GPU is visible), any field of the method's preset (e.g. `steps`, `n_tokens`, ECO's `kind` /
`dims` / `target`), and for ECO `retain_model` (a model dir) and `perturbed_answers` (a list
aligned with `spec.forget`, each a list of wrong answers, or a {question: [answers]} map).
"""

from __future__ import annotations

from pathlib import Path

import torch

from unlearnd.registry import ForgetRequest


def default_preset(request: ForgetRequest) -> str:
    return str(request.spec.options.get("preset") or ("full" if torch.cuda.is_available() else "cpu"))


def perturbed_from_options(request: ForgetRequest) -> dict[str, list[str]] | None:
    raw = request.spec.options.get("perturbed_answers")
    if not raw:
        return None
    if isinstance(raw, dict):
        return {str(q): list(a) for q, a in raw.items()}
    questions = [qa.question for qa in request.spec.as_qa(request.spec.forget)]
    return {q: list(a) for q, a in zip(questions, raw) if a}


def read_wrong_answers(path: Path) -> dict[str, list[str]]:
    """TOFU *_perturbed files (JSON lines or a JSON list of {question, perturbed_answer: [...]})."""
    from unlearnd.train.data import read_jsonl

    rows = read_jsonl(path)
    out = {}
    for row in rows:
        answers = row.get("perturbed_answer") or row.get("perturbed_answers") or []
        out[row["question"]] = [answers] if isinstance(answers, str) else list(answers)
    return out


def eco_job(request: ForgetRequest, artifact_dir: Path, ctx) -> dict:
    from unlearnd.train.eco import train_eco

    # Tune on embeddings rounded to the dtype the server will send them in (its --dtype).
    return train_eco(request, artifact_dir, ctx.model_path(), preset=default_preset(request),
                     retain_model_path=request.spec.options.get("retain_model"),
                     wrong_answers=perturbed_from_options(request), progress=False,
                     overrides={"serve_dtype": ctx.serve_dtype})


def soft_prompt_job(request: ForgetRequest, artifact_dir: Path, ctx) -> dict:
    from unlearnd.train.soft_prompt import train_soft_prompt

    return train_soft_prompt(request, artifact_dir, ctx.model_path(), preset=default_preset(request), progress=False)


def lora_job(request: ForgetRequest, artifact_dir: Path, ctx) -> dict:
    from unlearnd.train.lora import prior_lora_adapters, train_lora

    return train_lora(request, artifact_dir, ctx.model_path(), prior_adapters=prior_lora_adapters(ctx.registry, request),
                      preset=default_preset(request), progress=False)


def intervention_jobs() -> dict:
    """{Method: job} for the worker's METHOD_JOBS."""
    from unlearnd.registry import Method

    return {Method.eco: eco_job, Method.soft_prompt: soft_prompt_job, Method.lora: lora_job}
