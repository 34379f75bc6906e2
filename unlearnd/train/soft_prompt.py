"""SPUL's offline step: learn n virtual-token embeddings with the LLM frozen.

Loss (SPUL): L = L_forget + alpha * L_retain + beta * KL(original || prompted), where L_forget is
the cross-entropy of a non-answer ("I don't know"-style) to each forget question, L_retain the
cross-entropy of the true answers to retain questions, and the KL keeps the prompted model's
next-token distributions on the retain answers close to the original model's. Only the soft
prompt trains; the loop is the shared `Trainer`, the steps the per-request template (`SPULJob`).
The soft prompt starts from the embeddings of the system-prompt baseline's instruction for the
request's entities (prompt tuning's text initialisation), so step 0 is already a sensible "forget
these" prompt.
"""

from __future__ import annotations

import logging
import math
import random
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel

from unlearnd.data.qa import subsample
from unlearnd.domain import ForgetRequest, ForgetSpec
from unlearnd.interventions.guardrails import forget_instruction
from unlearnd.interventions.soft_prompt import SoftPromptConfig, save_soft_prompt
from unlearnd.train.data import EncodedQA, collate, pad_id_of
from unlearnd.train.job import (
    JobContext,
    TrainedRequestJob,
    answer_items,
    answered,
    default_preset,
    greedy_samples,
    refusal_items,
)
from unlearnd.train.objectives import TrainingObjective, register_objective
from unlearnd.train.scoring import answer_probability, mean, target_logits

log = logging.getLogger(__name__)


class SoftPromptPreset(BaseModel):
    n_tokens: int = 30
    steps: int = 20
    batch_forget: int = 4
    batch_retain: int = 2
    learning_rate: float = 1e-2
    warmup_steps: int = 0
    alpha: float = 0.5
    beta: float = 0.5
    max_len: int = 160
    n_retain: int | None = 64  # retain QAs trained on (a fixed random subset)
    n_eval: int | None = 8  # forget / retain QAs scored before and after
    n_samples: int = 2  # greedy generations kept in the artifact for inspection
    sample_tokens: int = 24
    seed: int = 0
    dtype: str = "float32"


PRESETS = {
    "cpu": SoftPromptPreset(),
    "full": SoftPromptPreset(
        steps=400,
        batch_forget=16,
        batch_retain=16,
        learning_rate=3e-3,
        warmup_steps=20,
        n_retain=None,
        n_eval=None,
        n_samples=8,
        sample_tokens=64,
    ),
}


class SoftPromptModel(torch.nn.Module):
    """A frozen LLM with n trainable virtual tokens in front of every sequence."""

    def __init__(self, llm: torch.nn.Module, init: torch.Tensor):
        super().__init__()
        self.llm = llm
        self.prompt = torch.nn.Parameter(init.detach().to(torch.float32).clone())

    @property
    def n_tokens(self) -> int:
        return int(self.prompt.shape[0])

    def embeds(self, batch: dict[str, torch.Tensor], with_prompt: bool = True):
        """(inputs_embeds, attention_mask, labels) with the virtual tokens prepended."""
        embeds = self.llm.get_input_embeddings()(batch["input_ids"])
        mask, labels = batch["attention_mask"], batch["labels"]
        if not with_prompt:
            return embeds, mask, labels
        b, n = embeds.shape[0], self.n_tokens
        prompt = self.prompt.to(embeds.dtype).unsqueeze(0).expand(b, -1, -1)
        return (
            torch.cat([prompt, embeds], dim=1),
            torch.cat([mask.new_ones(b, n), mask], dim=1),
            torch.cat([labels.new_full((b, n), -100), labels], dim=1),
        )


def text_init(embedding: torch.nn.Embedding, tokenizer, text: str, n_tokens: int) -> torch.Tensor:
    """The embeddings of `text`'s tokens, repeated/truncated to n_tokens rows."""
    ids = tokenizer.encode(text, add_special_tokens=False) or [0]
    ids = (ids * math.ceil(n_tokens / len(ids)))[:n_tokens]
    return embedding.weight[torch.tensor(ids, device=embedding.weight.device)].detach().clone()


def kl_original_prompted(original_logits: torch.Tensor, prompted_logits: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(p_original || p_prompted)."""
    log_p = torch.log_softmax(original_logits.float(), dim=-1)
    log_q = torch.log_softmax(prompted_logits.float(), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean()


@register_objective
class SPULMethod(TrainingObjective):
    """L_forget + alpha * L_retain + beta * KL(original || prompted), soft prompt only."""

    name = "soft_prompt"

    def __init__(self, alpha: float = 0.5, beta: float = 0.5):
        self.alpha, self.beta = alpha, beta

    def setup(self, model: SoftPromptModel) -> None:
        for p in model.llm.parameters():
            p.requires_grad_(False)
        model.prompt.requires_grad_(True)

    def trainable_parameters(self, model: SoftPromptModel):
        return [model.prompt]

    def forget_loss(self, model: SoftPromptModel, batch: dict) -> torch.Tensor:
        logits, targets = target_logits(model.llm, *model.embeds(batch))
        return torch.nn.functional.cross_entropy(logits, targets)

    def loss(self, model: SoftPromptModel, batch: dict):
        l_forget = self.forget_loss(model, batch["forget"])
        logs = {"forget": float(l_forget.detach())}
        total = l_forget
        retain = batch.get("retain")
        if retain is not None:
            logits, targets = target_logits(model.llm, *model.embeds(retain))
            l_retain = torch.nn.functional.cross_entropy(logits, targets)
            with torch.no_grad():
                original, _ = target_logits(model.llm, *model.embeds(retain, with_prompt=False))
            kl = kl_original_prompted(original, logits)
            total = total + self.alpha * l_retain + self.beta * kl
            logs.update(retain=float(l_retain.detach()), kl=float(kl.detach()))
        return total, logs


def make_batches(
    forget: list[EncodedQA], retain: list[EncodedQA], cfg: SoftPromptPreset, pad_id: int, device: torch.device
) -> list[dict]:
    """One epoch of (forget, retain) batch pairs: as many pairs as the larger set needs, the
    smaller set cycling; both shuffled with the preset's seed."""
    rng = random.Random(cfg.seed)
    forget, retain = forget[:], retain[:]
    rng.shuffle(forget)
    rng.shuffle(retain)
    n_f = math.ceil(len(forget) / cfg.batch_forget)
    n_r = math.ceil(len(retain) / cfg.batch_retain) if retain else 0
    batches = []
    for i in range(max(n_f, n_r)):
        j = i % n_f
        batch = {"forget": collate(forget[j * cfg.batch_forget : (j + 1) * cfg.batch_forget], pad_id)}
        if retain:
            k = i % n_r
            batch["retain"] = collate(retain[k * cfg.batch_retain : (k + 1) * cfg.batch_retain], pad_id)
        batches.append({key: {n: t.to(device) for n, t in value.items()} for key, value in batch.items()})
    return batches


def prompted_fn(model: SoftPromptModel, with_prompt: bool):
    return lambda batch, items: model.embeds(batch, with_prompt=with_prompt)


class SPULJob(TrainedRequestJob[SoftPromptPreset]):
    """SPUL's steps of the request template: relabel the forget set, train the soft prompt (text
    initialised) with the LLM frozen, score without / with it, write soft_prompt.safetensors + .json."""

    presets = PRESETS

    def prepare(self) -> None:
        """The relabelled forget set, the retain set, the scored subsets and the initial prompt."""
        cfg, tokenizer = self.cfg, self.tokenizer
        self.pad_id = pad_id_of(tokenizer)
        forget_qas = ForgetSpec.as_qa(self.request.spec.forget)
        retain_qas = answered(ForgetSpec.as_qa(self.request.spec.retain))
        if not retain_qas:
            log.warning("SPUL %s: no retain QAs with answers; training on L_forget only", self.request.id)
        retain_qas = subsample(retain_qas, cfg.n_retain, cfg.seed)
        self.forget_items = refusal_items(tokenizer, forget_qas, cfg.max_len)
        self.retain_items = answer_items(tokenizer, retain_qas, cfg.max_len, end_of_turn=True)
        instruction = forget_instruction(self.request.spec.entities)
        init = text_init(self.model.get_input_embeddings(), tokenizer, instruction, cfg.n_tokens)
        self.trainable = SoftPromptModel(self.model, init).to(self.device)
        self.eval_forget = answer_items(
            tokenizer, subsample(answered(forget_qas), cfg.n_eval, cfg.seed + 1), cfg.max_len
        )
        self.eval_retain = answer_items(tokenizer, subsample(retain_qas, cfg.n_eval, cfg.seed + 1), cfg.max_len)
        self.objective = SPULMethod(cfg.alpha, cfg.beta)
        self.eval_refusals = self.forget_items[: max(cfg.n_eval or len(self.forget_items), 1)]
        self.forget_loss: dict[str, float] = {}

    def score(self, before: bool) -> dict[str, Any]:
        """L_forget on the refusals and answer probabilities without (before) or with the prompt; before
        also scores the initial prompt."""
        when = "before" if before else "after"
        batch = {k: v.to(self.device) for k, v in collate(self.eval_refusals, self.pad_id).items()}
        with torch.no_grad():
            self.forget_loss[when] = float(self.objective.forget_loss(self.trainable, batch))
        if not before:
            return {
                "forget_prob": self.probability(self.eval_forget, True, "forget P, prompt"),
                "retain_prob": self.probability(self.eval_retain, True, "retain P, prompt"),
            }
        return {
            "forget_prob": self.probability(self.eval_forget, False, "forget P, no prompt"),
            "retain_prob": self.probability(self.eval_retain, False, "retain P, no prompt"),
            "forget_prob_init": self.probability(self.eval_forget, True, "forget P, init prompt"),
        }

    def probability(self, items: list[EncodedQA], with_prompt: bool, desc: str) -> float | None:
        """Mean answer probability of `items` with or without the prompt (None when there are none)."""
        if not items:
            return None
        embed_fn = prompted_fn(self.trainable, with_prompt)
        batch_size = self.cfg.batch_forget * 2
        return mean(
            answer_probability(
                self.model, self.tokenizer, items, batch_size, embed_fn=embed_fn, progress=self.progress, desc=desc
            )
        )

    def batches(self) -> list[dict]:
        return make_batches(self.forget_items, self.retain_items, self.cfg, self.pad_id, self.device)

    def samples(self) -> list[dict[str, str]]:
        llm, prompt = self.model, self.trainable.prompt

        def embeds_of(item: EncodedQA) -> torch.Tensor:
            ids = torch.tensor(item.prompt_ids, device=self.device)
            return torch.cat([prompt, llm.get_input_embeddings()(ids)], dim=0)

        n, tokens = self.cfg.n_samples, self.cfg.sample_tokens
        return greedy_samples(llm, self.tokenizer, self.eval_forget[:n], embeds_of, tokens)

    def write_artifact(self) -> None:
        cfg, cost = self.cfg, self.cost
        evaluation = {
            "before": self.before,
            "after": self.after,
            "forget_loss_before": self.forget_loss["before"],
            "forget_loss_after": self.forget_loss["after"],
            "n_eval_forget": len(self.eval_forget),
            "n_eval_retain": len(self.eval_retain),
            "samples": self.outputs,
        }
        config = SoftPromptConfig(
            n_tokens=cfg.n_tokens,
            hidden_size=int(self.trainable.prompt.shape[1]),
            position="start",
            model=str(self.model_path),
            training={
                "method": self.objective.name,
                "preset": cfg.model_dump(mode="json"),
                "losses": self.result.losses,
                "n_forget": len(self.forget_items),
                "n_retain": len(self.retain_items),
                "cost": cost,
            },
            evaluation=evaluation,
        )
        save_soft_prompt(self.artifact_dir, self.trainable.prompt.detach().cpu(), config)

    def report(self) -> dict[str, Any]:
        before, after, losses = self.before, self.after, self.forget_loss
        summary = {
            "method": "soft_prompt",
            "n_tokens": self.cfg.n_tokens,
            "steps": self.cfg.steps,
            "forget_loss_before": losses["before"],
            "forget_loss_after": losses["after"],
            "forget_prob_before": before["forget_prob"],
            "forget_prob_after": after["forget_prob"],
            "retain_prob_before": before["retain_prob"],
            "retain_prob_after": after["retain_prob"],
            **self.cost,
        }
        log.info(
            "SPUL %s: L_forget %.3f -> %.3f, forget P %.4f -> %.4f, %.0fs",
            self.request.id,
            losses["before"],
            losses["after"],
            before["forget_prob"] or math.nan,
            after["forget_prob"] or math.nan,
            self.cost["wall_seconds"],
        )
        return summary


def train_soft_prompt(
    request: ForgetRequest,
    artifact_dir: Path,
    model_path: str | Path,
    preset: str = "cpu",
    device: str | None = None,
    progress: bool = True,
    overrides: dict | None = None,
) -> dict:
    """Train SPUL's soft prompt for `request`; writes soft_prompt.safetensors + soft_prompt.json."""
    return SPULJob(request, artifact_dir, model_path, preset, device, progress, overrides).run()


def soft_prompt_job(request: ForgetRequest, artifact_dir: Path, ctx: JobContext) -> dict:
    """The worker's job for a `soft_prompt` request."""
    return train_soft_prompt(request, artifact_dir, ctx.model_path(), preset=default_preset(request), progress=False)
