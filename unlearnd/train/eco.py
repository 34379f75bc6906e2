"""ECO's offline step: tune the corruption strength of one forget request by zeroth-order search.

The goal is not "as much noise as possible" but the forget-set answer probability a model that
never learned the data would give (ECO's surrogate target). That target is, in order of
preference: a number given in the request options (`target`); the value of a surrogate model the
user has that never saw the forget set (`surrogate_model`, e.g. the base model the served one was
finetuned from; never a model the evaluation compares against); the served model's probability of
wrong (perturbed) answers to the same questions; or, needing nothing extra, its probability of the
*other* forget questions' answers (shuffled). The strength is tuned on the request's own forget QA
only, so an evaluation that holds questions out of the request measures it on questions it never saw.
Evaluation runs the HF model on `inputs_embeds` built with the serve-time corruption code
(`unlearnd.interventions.eco`), on the prompt rendered and tokenised as the server does, rounded to
the serving engine's dtype, so the tuned strength is the served one. The rows corrupted are the
entity tokens; when no strength brings those down to the target (the rest of the question still
gives the answer away) the search is repeated over the whole question, and the closer one is kept.
The steps are the per-request template (`ECOJob`, a `unlearnd.train.job.RequestJob`).
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel

from unlearnd.data.qa import read_jsonl, subsample
from unlearnd.domain import ForgetRequest, ForgetSpec
from unlearnd.engine.dtype import resolve_dtype
from unlearnd.interventions.eco import (
    Corruption,
    CorruptionKind,
    DimSelect,
    ECOArtifact,
    RowScope,
    corrupt,
    entity_spans,
    prompt_seed,
    select_rows,
)
from unlearnd.models import load_causal_lm
from unlearnd.prompting import prompt_ids, render_chat, stop_ids, user_messages
from unlearnd.train.data import EncodedQA, encode_qa
from unlearnd.train.job import JobContext, RequestJob, default_preset, torch_dtype
from unlearnd.train.scoring import answer_probability, fluency_report, greedy_generate, mean
from unlearnd.train.zo import zo_solve

log = logging.getLogger(__name__)


class ECOPreset(BaseModel):
    kind: CorruptionKind = CorruptionKind.noise
    dims: DimSelect = DimSelect.all
    scope: RowScope | None = None  # None: the entity tokens, then the whole prompt if those can't reach the target
    n_dims: int | None = None
    n_tune: int | None = 8  # forget QAs the strength is tuned on
    n_eval: int | None = 16  # forget QAs the achieved value is reported on
    iterations: int = 5  # ZO iterations (2 evaluations each)
    batch_size: int = 8
    max_len: int = 512
    n_wrong: int = 1  # perturbed answers per question for the surrogate target
    rel_tol: float = 0.05  # stop once |metric - target| <= rel_tol * target; 'reached' allows twice that
    fluency_n: int = 3
    fluency_tokens: int = 20
    max_ppl: float = 1000.0
    max_non_ascii: float = 0.2
    max_repetition: float = 0.5
    seed: int = 0
    dtype: str = "float32"
    serve_dtype: str = "auto"  # the serving engine's dtype (its --dtype; auto as the server resolves it)
    target: float | None = None


PRESETS = {
    "cpu": ECOPreset(),
    "full": ECOPreset(n_tune=64, n_eval=None, iterations=20, batch_size=32, n_wrong=5, fluency_n=16, fluency_tokens=64),
}


@dataclass
class ECOItem:
    item: EncodedQA
    prompt: str  # the rendered prompt, as the server renders it
    rows: list[int]
    seed: int
    mode: str


def prepare_items(
    tokenizer,
    qas: list[tuple[str, str]],
    entities: list[str],
    max_len: int,
    seed: int,
    scope: RowScope = RowScope.entity,
) -> list[ECOItem]:
    """Tokenise each QA as the server would and pick the rows the served corruption would hit."""
    prepared = []
    for question, answer in qas:
        item = encode_qa(tokenizer, question, answer, max_len, end_of_turn=False)
        prompt = render_chat(tokenizer, user_messages(question))
        ids, rows, mode = select_rows(
            tokenizer, prompt, [question], entity_spans(question, entities), add_special_tokens=False, scope=scope
        )
        assert ids == item.prompt_ids, "ECO must corrupt the tokens the server sends"
        prepared.append(ECOItem(item, prompt, rows, prompt_seed(prompt, seed), mode))
    return prepared


def corrupted_embeds_fn(model, prepared: list[ECOItem], corruption: Corruption, serve_dtype: torch.dtype):
    """An `embed_fn` for `answer_probability` that corrupts each prompt's selected rows."""
    by_id = {id(p.item): p for p in prepared}

    def fn(batch, items):
        embeds = model.get_input_embeddings()(batch["input_ids"])
        out = embeds.clone()
        for b, item in enumerate(items):
            p, n = by_id[id(item)], len(item.prompt_ids)
            served = corrupt(embeds[b, :n].to(serve_dtype), p.rows, corruption, p.seed)
            out[b, :n] = served.to(out.dtype)
        return out, batch["attention_mask"], batch["labels"]

    return fn


def surrogate_target(
    model,
    tokenizer,
    prepared: list[ECOItem],
    cfg: ECOPreset,
    surrogate_model_path: str | None,
    wrong_answers: dict[str, list[str]] | None,
    device,
    progress: bool,
) -> tuple[float, str]:
    """What a model that never learned the forget set would score (see the module docstring)."""
    questions = [p.item.question for p in prepared]
    if cfg.target is not None:
        return float(cfg.target), "given"
    if surrogate_model_path:
        surrogate, _ = load_causal_lm(surrogate_model_path, torch_dtype(cfg.dtype), device, frozen=True)
        items = [p.item for p in prepared]
        desc = "target (surrogate model)"
        value = mean(answer_probability(surrogate, tokenizer, items, cfg.batch_size, progress=progress, desc=desc))
        del surrogate
        return value, "surrogate_model"
    if wrong_answers and all(wrong_answers.get(q) for q in questions):
        items = [
            encode_qa(tokenizer, q, w, cfg.max_len, end_of_turn=False)
            for q in questions
            for w in wrong_answers[q][: cfg.n_wrong]
        ]
        value = mean(
            answer_probability(model, tokenizer, items, cfg.batch_size, progress=progress, desc="target (perturbed)")
        )
        return value, "perturbed"
    items = shuffled_items(tokenizer, prepared, cfg)
    value = mean(
        answer_probability(model, tokenizer, items, cfg.batch_size, progress=progress, desc="target (shuffled)")
    )
    return value, "shuffled"


def shuffled_items(tokenizer, prepared: list[ECOItem], cfg: ECOPreset) -> list[EncodedQA]:
    """Each forget question with another one's answer: the target that needs nothing extra."""
    if len(prepared) < 2:
        raise ValueError("ECO needs a target: give options.target, a surrogate model, wrong answers, or >= 2 QAs")
    order = list(range(len(prepared)))
    random.Random(cfg.seed).shuffle(order)
    shuffled = order[1:] + order[:1]  # a derangement: every question gets another one's answer
    answers = {order[i]: shuffled[i] for i in range(len(order))}
    return [
        encode_qa(
            tokenizer,
            p.item.question,
            tokenizer.decode(prepared[answers[i]].item.target_ids),
            cfg.max_len,
            end_of_turn=False,
        )
        for i, p in enumerate(prepared)
    ]


def fill_answers(model, tokenizer, qas: list, max_new_tokens: int) -> list[tuple[str, str]]:
    """Forget entries without an answer are scored on the model's own greedy answer: the
    knowledge it shows is what must go."""
    eos = stop_ids(tokenizer)
    out = []
    for qa in qas:
        answer = qa.answer
        if not answer:
            ids = prompt_ids(tokenizer, messages=user_messages(qa.question))
            emb = model.get_input_embeddings()(torch.tensor(ids, device=next(model.parameters()).device))
            answer = tokenizer.decode(greedy_generate(model, emb, max_new_tokens, eos), skip_special_tokens=True)
        out.append((qa.question, answer or qa.question))
    return out


def search_space(cfg: ECOPreset, emb_std: float, hidden: int) -> dict | None:
    """How sigma is parametrised for the ZO search; None when the corruption has no strength."""
    if cfg.kind == CorruptionKind.noise:
        # u = ln(sigma / std of the embedding entries): scale-free, and sigma stays > 0.
        return {
            "to_sigma": lambda u: emb_std * math.exp(u),
            "x0": 0.0,
            "lo": math.log(0.01),
            "hi": math.log(20.0),
            "max_step": 1.5,
            "eps": 0.5,
            "min_eps": 0.02,
        }
    if cfg.dims == DimSelect.all:
        return None
    # u = sigma = share of the hidden size zeroed / flipped; eps above one dimension.
    return {
        "to_sigma": lambda u: u,
        "x0": 0.25,
        "lo": 0.0,
        "hi": 1.0,
        "max_step": 0.3,
        "eps": 0.1,
        "min_eps": max(1.5 / hidden, 0.005),
    }


class ECOJob(RequestJob[ECOPreset]):
    """ECO's steps of the request template: prepare the tuning / evaluation QA, score the clean model
    against the surrogate target, fit the strength by ZO search, score it on the evaluation QA, check
    fluency, write `eco.json`."""

    presets = PRESETS

    def __init__(
        self,
        *args: Any,
        surrogate_model_path: str | None = None,
        wrong_answers: dict[str, list[str]] | None = None,
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        self.surrogate_model_path = surrogate_model_path
        self.wrong_answers = wrong_answers
        self.cache: dict[tuple, float] = {}

    def prepare(self) -> None:
        """Answer-filled tuning and (held-out) evaluation QA, tokenised and row-selected as served."""
        # Corruption is rounded to the dtype the server sends embeddings in; the artifact records which.
        cfg = self.cfg = self.cfg.model_copy(update={"serve_dtype": resolve_dtype(self.cfg.serve_dtype)})
        self.serve_dtype = torch_dtype(cfg.serve_dtype)
        forget = ForgetSpec.as_qa(self.request.spec.forget)
        self.entities = list(self.request.spec.entities)
        tuned = subsample(forget, cfg.n_tune, cfg.seed)
        rest = [qa for qa in forget if qa not in tuned]  # the achieved value is reported on QA it was not tuned on
        self.tune_qas = fill_answers(self.model, self.tokenizer, tuned, cfg.fluency_tokens)
        eval_subset = subsample(rest or forget, cfg.n_eval, cfg.seed + 1)
        self.eval_qas = fill_answers(self.model, self.tokenizer, eval_subset, cfg.fluency_tokens)
        emb = self.model.get_input_embeddings().weight
        self.emb_dtype, self.emb_std, hidden = emb.dtype, float(emb.float().std()), int(emb.shape[1])
        self.space = search_space(cfg, self.emb_std, hidden)
        self.first_scope = cfg.scope or RowScope.entity
        self.tune = self.prepared(self.tune_qas, self.first_scope)
        self.tuning: dict[str, Any] = {
            "emb_std": self.emb_std,
            "n_tune": len(self.tune),
            "n_eval": len(self.eval_qas),
            "eval_held_out": bool(rest),  # False: too few QA to hold any out, reported on the tuning QA
            "modes": {m: sum(p.mode == m for p in self.tune) for m in ("entity", "prompt")},
        }

    def prepared(self, qas: list[tuple[str, str]], scope: RowScope) -> list[ECOItem]:
        return prepare_items(self.tokenizer, qas, self.entities, self.cfg.max_len, self.cfg.seed, scope)

    def metric(self, corruption: Corruption, items: list[ECOItem]) -> float:
        """Mean P(a|q)^(1/|a|) of `items` under `corruption` (cached: the ZO search revisits points)."""
        key = (corruption.scope, round(corruption.sigma, 10), id(items))
        if key not in self.cache:
            fn = corrupted_embeds_fn(self.model, items, corruption, self.serve_dtype)
            probs = answer_probability(
                self.model, self.tokenizer, [p.item for p in items], self.cfg.batch_size, embed_fn=fn
            )
            self.cache[key] = mean(probs)
        return self.cache[key]

    def corruption_at(self, scope: RowScope, sigma: float) -> Corruption:
        cfg = self.cfg
        return Corruption(scope=scope, kind=cfg.kind, dims=cfg.dims, n_dims=cfg.n_dims, sigma=sigma)

    def score(self, before: bool) -> dict[str, Any]:
        """Before: the target and the clean model on the tuning QA. After: the chosen corruption on
        the evaluation QA, and whether the target was reached."""
        return self.score_target() if before else self.score_eval()

    def score_target(self) -> dict[str, Any]:
        target, source = surrogate_target(
            self.model,
            self.tokenizer,
            self.tune,
            self.cfg,
            self.surrogate_model_path,
            self.wrong_answers,
            self.device,
            self.progress,
        )
        clean = self.metric(self.corruption_at(self.first_scope, 0.0), self.tune)
        log.info("ECO %s: clean P(a|q)^(1/|a|) = %.4f, target %.4f (%s)", self.request.id, clean, target, source)
        self.tolerance = 2 * self.cfg.rel_tol * target
        return {"target": target, "target_source": source, "clean_tune": clean}

    def score_eval(self) -> dict[str, Any]:
        self.evals = self.prepared(self.eval_qas, self.scope)  # kept, as the tuning items are
        target, clean = self.before["target"], self.before["clean_tune"]
        return {
            "clean_eval": self.metric(self.corruption_at(self.scope, 0.0), self.evals),
            "achieved_eval": self.metric(self.corruption, self.evals),
            "reached": clean <= target or abs(self.chosen["achieved_tune"] - target) <= self.tolerance,
        }

    def fit(self) -> None:
        """Search the strength on the entity rows (or the preset's scope); when those cannot bring the
        answer down to the target, search again over the whole prompt and keep the closer one."""
        target = self.before["target"]
        attempts = [(self.first_scope, self.tune, self.search(self.first_scope, self.tune))]
        first = attempts[0][2]["achieved_tune"]
        if (
            self.cfg.scope is None
            and abs(first - target) > self.tolerance
            and first > target
            and self.tuning["modes"]["entity"]
        ):
            # Corrupting the name alone left the answer too likely: the rest of the question gives it away.
            log.info(
                "ECO %s: entity rows reach %.4f only (target %.4f); tuning over the whole prompt",
                self.request.id,
                first,
                target,
            )
            whole = self.prepared(self.tune_qas, RowScope.prompt)
            attempts.append((RowScope.prompt, whole, self.search(RowScope.prompt, whole)))
        self.attempts = attempts  # kept, with their items: the metric cache keys on the items' id
        self.scope, self.tune, chosen = min(attempts, key=lambda a: abs(a[2]["achieved_tune"] - target))
        self.tuning["attempts"] = [a[2] for a in attempts]
        keys = ("history", "final", "evaluations", "best_distance", "note")
        self.tuning.update({k: chosen[k] for k in keys if k in chosen})
        self.chosen = chosen
        self.corruption = self.corruption_at(self.scope, chosen["sigma"])

    def search(self, scope: RowScope, items: list[ECOItem]) -> dict[str, Any]:
        """One search of the strength with the rows of `scope`; returns what it found."""
        attempt: dict[str, Any] = {"scope": scope.value}
        if self.before["clean_tune"] <= self.before["target"]:
            sigma, attempt["note"] = 0.0, "the clean model is already at or below the target"
        elif self.space is None:
            sigma, attempt["note"] = 1.0, f"{self.cfg.kind.value} on all dimensions has no strength to tune"
        else:
            sigma = self.zo_search(scope, items, attempt)
        attempt["sigma"] = sigma
        attempt["achieved_tune"] = self.metric(self.corruption_at(scope, sigma), items)
        return attempt

    def zo_search(self, scope: RowScope, items: list[ECOItem], attempt: dict[str, Any]) -> float:
        """The ZO search proper; records its trace in `attempt` and returns the strength found."""
        cfg, space, target = self.cfg, self.space, self.before["target"]
        to_sigma = space["to_sigma"]
        result = zo_solve(
            lambda u: self.metric(self.corruption_at(scope, to_sigma(u)), items),
            target,
            space["x0"],
            space["lo"],
            space["hi"],
            space["eps"],
            cfg.iterations,
            space["max_step"],
            min_eps=space["min_eps"],
            tol=cfg.rel_tol * target,
            progress=self.progress,
            desc=f"eco zo ({cfg.kind.value}, {scope.value})",
        )
        attempt.update(
            {
                "evaluations": result.evaluations,
                "best_distance": result.fx,
                "history": [
                    {**h, "sigma_plus": to_sigma(h["x_plus"]), "sigma_minus": to_sigma(h["x_minus"])}
                    for h in result.history
                ],
                "final": {"sigma": to_sigma(result.final[0]), "m": result.final[1]} if result.final else None,
            }
        )
        return to_sigma(result.x)

    def samples(self) -> dict[str, Any]:
        """The fluency report: greedy answers with and without the corruption, on tuning QA."""
        cfg, flu_items = self.cfg, self.tune[: self.cfg.fluency_n]
        by_id = {id(p.item): p for p in flu_items}

        def embeds_of(item: EncodedQA) -> torch.Tensor:
            p = by_id[id(item)]
            ids = torch.tensor(item.prompt_ids, device=self.device)
            raw = self.model.get_input_embeddings()(ids).to(self.serve_dtype)
            return corrupt(raw, p.rows, self.corruption, p.seed).to(self.emb_dtype)

        items = [p.item for p in flu_items]
        limits = (cfg.max_ppl, cfg.max_non_ascii, cfg.max_repetition)
        return fluency_report(self.model, self.tokenizer, items, embeds_of, cfg.fluency_tokens, *limits, self.progress)

    def cost_extra(self) -> dict[str, Any]:
        return {"metric_evaluations": len(self.cache)}

    def write_artifact(self) -> None:
        self.tuning.update(
            {
                "achieved_tune": self.chosen["achieved_tune"],
                "clean_eval": self.after["clean_eval"],
                "tolerance": self.tolerance,
                "cost": self.cost,
                "preset": self.cfg.model_dump(mode="json"),
            }
        )
        ECOArtifact(
            corruption=self.corruption,
            seed=self.cfg.seed,
            entities=self.entities,
            target=self.before["target"],
            target_source=self.before["target_source"],
            clean_value=self.before["clean_tune"],
            achieved=self.after["achieved_eval"],
            reached=self.after["reached"],
            fluency=self.outputs,
            tuning=self.tuning,
        ).write(self.artifact_dir)

    def report(self) -> dict[str, Any]:
        before, after, fluency, cfg = self.before, self.after, self.outputs, self.cfg
        summary = {
            "method": "eco",
            "kind": cfg.kind.value,
            "dims": cfg.dims.value,
            "scope": self.scope.value,
            "sigma": self.chosen["sigma"],
            **before,
            "achieved_tune": self.chosen["achieved_tune"],
            **after,
            "fluent": fluency["fluent"],
            "fluency_ppl": fluency["intervened"]["ppl"],
            "clean_ppl": fluency["clean"]["ppl"],
            **self.cost,
        }
        log.info(
            "ECO %s: %s rows, sigma=%.4g, P %.4f -> %.4f (target %.4f), fluent=%s, %.0fs",
            self.request.id,
            self.scope.value,
            summary["sigma"],
            after["clean_eval"],
            after["achieved_eval"],
            before["target"],
            fluency["fluent"],
            self.cost["wall_seconds"],
        )
        return summary


def train_eco(
    request: ForgetRequest,
    artifact_dir: Path,
    model_path: str | Path,
    preset: str = "cpu",
    surrogate_model_path: str | None = None,
    wrong_answers: dict[str, list[str]] | None = None,
    device: str | None = None,
    progress: bool = True,
    overrides: dict | None = None,
) -> dict:
    """Tune ECO for `request`; writes `eco.json` into `artifact_dir` and returns a summary."""
    job = ECOJob(
        request,
        artifact_dir,
        model_path,
        preset,
        device,
        progress,
        overrides,
        surrogate_model_path=surrogate_model_path,
        wrong_answers=wrong_answers,
    )
    return job.run()


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
    rows = read_jsonl(path)
    out = {}
    for row in rows:
        answers = row.get("perturbed_answer") or row.get("perturbed_answers") or []
        out[row["question"]] = [answers] if isinstance(answers, str) else list(answers)
    return out


def surrogate_model_option(request: ForgetRequest) -> str | None:
    """The request's surrogate model dir (`surrogate_model`, or its older name `retain_model`)."""
    options = request.spec.options
    return options.get("surrogate_model") or options.get("retain_model")


def eco_job(request: ForgetRequest, artifact_dir: Path, ctx: JobContext) -> dict:
    """The worker's job for an `eco` request. Options beyond the preset's fields: `surrogate_model` (a
    model dir that never saw the forget set; `retain_model` is the older name) and `perturbed_answers`
    (a list aligned with `spec.forget`, each a list of wrong answers, or a
    {question: [answers]} map)."""
    # Tune on embeddings rounded to the dtype the server will send them in (its --dtype).
    return train_eco(
        request,
        artifact_dir,
        ctx.model_path(),
        preset=default_preset(request),
        surrogate_model_path=surrogate_model_option(request),
        wrong_answers=perturbed_from_options(request),
        progress=False,
        overrides={"serve_dtype": ctx.serve_dtype},
    )
