"""TOFU evaluation of every method through one path: build the model under test, collect records, compute metrics.

Methods come in three kinds:
* references - `target` and `retain` (in-process, from `reference.py`);
* baselines - weight-changing unlearning from the target (`methods.py`), trained once and cached;
* served - guardrail methods (`refuse`, `prompt`, ...) measured through the running server: a forget
  request is registered, polled until active, evaluated over HTTP, then deactivated. The server must
  serve the *target* model (the one that knows the fictitious authors). `served_target` evaluates the
  server with no request registered - the pass-through check that served and in-process numbers agree.

Collected records are cached per (model, evaluation config) under `cache_dir()/eval`, so adding a
method to a report does not re-evaluate the others.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from unlearnd.config import cache_dir
from unlearnd.evaluation.metrics import ItemRecord, RunRecords, SplitRecords, compute_all, rouge_backend
from unlearnd.evaluation.model_under_test import HFModelUnderTest, ModelUnderTest, ServedModelUnderTest
from unlearnd.evaluation.report import PARTIAL_NOTE, run_stamp, write_report
from unlearnd.methods import METHODS
from unlearnd.prompting import user_messages
from unlearnd.tofu import TofuData, has_tofu_split
from unlearnd.train.baselines import BASELINES, default_baseline_config, train_baseline
from unlearnd.train.data import QAItem, spread
from unlearnd.train.reference import (
    ReferenceModels,
    ReferencePreset,
    cache_key,
    ensure_reference_models,
    is_complete,
    items_digest,
    model_fingerprint,
    read_info,
)

log = logging.getLogger(__name__)

REFERENCE_METHODS = ("target", "retain")
SERVED_METHODS = (*METHODS, "served_target")  # every forget method, plus the server with no request
EVAL_CODE_VERSION = 2  # 2: baselines saved in float32
SHORT_ANSWER_SPLITS = ("real_authors", "world_facts")
SHORT_ANSWER_TOKENS = 32


class EvalSettings(BaseModel):
    """What is measured (hashed into the record cache key)."""

    max_new_tokens: int = 96
    limits: dict[str, int | None] = Field(default_factory=dict, description="items per split (None = all)")


class EvalSplits(BaseModel):
    """The items of each evaluation split (forget carries paraphrased / perturbed answers)."""

    forget: list[QAItem]
    retain: list[QAItem]
    real_authors: list[QAItem]
    world_facts: list[QAItem]
    holdout: list[QAItem] = Field(default_factory=list)

    def as_dict(self) -> dict[str, list[QAItem]]:
        return {
            "forget": self.forget,
            "retain": self.retain,
            "real_authors": self.real_authors,
            "world_facts": self.world_facts,
            "holdout": self.holdout,
        }


def eval_splits(
    refs: ReferenceModels, tofu: TofuData | None = None, limits: dict[str, int | None] | None = None
) -> EvalSplits:
    tofu = tofu or TofuData()
    p = refs.preset
    limits = limits or {}
    retain_authors = set(refs.data.retain_authors)
    retain = [it for it in tofu.split("retain_perturbed") if it.author in retain_authors]
    if refs.data.holdout_authors:
        holdout = tofu.by_authors(refs.data.holdout_authors)
    else:
        name = "holdout" + p.forget_split.removeprefix("forget")
        holdout = tofu.split(name) if has_tofu_split(name, tofu.folder) else []
        if not holdout:
            log.warning("no held-out split %s: the membership-inference AUC is left out", name)
    defaults = {
        "forget": p.eval_forget_items,
        "retain": p.eval_retain_items,
        "holdout": p.eval_holdout_items,
        "real_authors": p.eval_real_authors_items,
        "world_facts": p.eval_world_facts_items,
    }
    pick = {**defaults, **limits}
    return EvalSplits(
        forget=spread(tofu.perturbed_for(p.forget_split), pick.get("forget")),
        retain=spread(retain, pick.get("retain")),
        real_authors=spread(tofu.split("real_authors_perturbed"), pick.get("real_authors")),
        world_facts=spread(tofu.split("world_facts_perturbed"), pick.get("world_facts")),
        holdout=spread(holdout, pick.get("holdout")),
    )


# --------------------------------------------------------------------------- collection


def collect_split(
    mut: ModelUnderTest, name: str, items: list[QAItem], max_new_tokens: int, generate: bool = True
) -> SplitRecords:
    """Score [answer, paraphrased?, perturbed...] per item and (optionally) generate greedily."""
    prompts = [user_messages(it.question) for it in items]
    conts: list[list[str]] = []
    for it in items:
        c = [it.answer]
        if it.paraphrased_answer is not None:
            c.append(it.paraphrased_answer)
        c.extend(it.perturbed_answers)
        conts.append(c)
    scored = mut.score(prompts, conts, desc=f"score {name}")
    gens = mut.generate(prompts, max_new_tokens, desc=f"generate {name}") if generate else [None] * len(items)
    records = []
    for it, s, g in zip(items, scored, gens):
        k = 1
        para = None
        if it.paraphrased_answer is not None:
            para = s[1].logprobs
            k = 2
        records.append(
            ItemRecord(
                question=it.question,
                answer=it.answer,
                answer_lp=s[0].logprobs,
                greedy_hits=s[0].greedy_hits,
                paraphrased_lp=para,
                perturbed_lp=[x.logprobs for x in s[k:]],
                generation=g,
                route=s[0].route,
            )
        )
    return SplitRecords(split=name, items=records)


def add_generation_perplexity(records: SplitRecords, judge: ModelUnderTest) -> None:
    """Perplexity of each generation under the judge (target) model, given its question."""
    todo = [(i, r) for i, r in enumerate(records.items) if r.generation]
    if not todo:
        return
    scored = judge.score(
        [user_messages(r.question) for _, r in todo],
        [[r.generation or ""] for _, r in todo],
        desc=f"perplexity {records.split}",
    )
    for (_, r), s in zip(todo, scored):
        lp = s[0].mean_logprob
        r.generation_ppl = math.exp(-lp) if math.isfinite(lp) else None


def collect_run(
    method: str, mut: ModelUnderTest, splits: EvalSplits, settings: EvalSettings, judge: ModelUnderTest | None
) -> RunRecords:
    run = RunRecords(method=method)
    for name, items in splits.as_dict().items():
        if not items:
            continue
        # real_authors / world_facts answers are a few tokens (99th percentile 10): 32 new tokens suffice
        budget = (
            min(settings.max_new_tokens, SHORT_ANSWER_TOKENS)
            if name in SHORT_ANSWER_SPLITS
            else settings.max_new_tokens
        )
        run.splits[name] = collect_split(mut, name, items, budget, generate=name != "holdout")
    if judge is not None and "forget" in run.splits:
        add_generation_perplexity(run.splits["forget"], judge)
    return run


def cached_json(key_parts: dict[str, Any] | None, compute: Any, use_cache: bool = True) -> tuple[Any, bool]:
    """`compute()`'s JSON result, stored under the eval cache by a hash of `key_parts` (None: never cached).

    Lets a long evaluation be resumed or extended (e.g. a later run adding served rows) without
    recomputing what a model that has not changed already answered."""
    if key_parts is None:
        return compute(), False
    path = cache_dir() / "eval" / f"{cache_key(key_parts)}.json"
    if use_cache and path.exists():
        return json.loads(path.read_text()), True
    value = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value))
    os.replace(tmp, path)
    return value, False


def cached_run(
    method: str,
    model_key: str | None,
    make: Any,
    splits: EvalSplits,
    settings: EvalSettings,
    judge: ModelUnderTest | None,
    use_cache: bool = True,
) -> tuple[RunRecords, float, bool]:
    """Collect (or load) a run's records; returns (records, eval wall seconds, came from cache)."""

    def collect() -> dict[str, Any]:
        t0 = time.perf_counter()
        records = collect_run(method, make(), splits, settings, judge)
        return {"eval_wall_seconds": time.perf_counter() - t0, "records": records.model_dump()}

    key = (
        None
        if model_key is None
        else {
            "model": model_key,
            "settings": settings.model_dump(),
            "code": EVAL_CODE_VERSION,
            "splits": {k: items_digest(v) for k, v in splits.as_dict().items()},
        }
    )
    data, cached = cached_json(key, collect, use_cache)
    return RunRecords.model_validate(data["records"]), float(data["eval_wall_seconds"]), cached


# --------------------------------------------------------------------------- served


def forget_request_spec(
    method: str, refs: ReferenceModels, tofu: TofuData | None = None, options: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The forget request a user would register for this forget split (QA pairs + author names);
    `options` are the method's request options (preset fields such as `steps`)."""
    from unlearnd.evaluation.continual import request_spec

    tofu = tofu or TofuData()
    # ECO's surrogate target: what the retain model (never saw these authors) gives the forget answers
    options = {**({"retain_model": refs.retain_dir} if method == "eco" else {}), **(options or {})} or None
    return request_spec(
        f"tofu-{refs.preset.forget_split}-{method}",
        method,
        tofu.split(refs.preset.forget_split),
        refs.data.retain_items,
        options,
    )


# --------------------------------------------------------------------------- the whole evaluation


class TofuEvalConfig(BaseModel):
    preset: str = "mini"
    forget_split: str | None = None  # None: the preset's
    methods: list[str] = Field(default_factory=lambda: ["target", "retain"])
    server_url: str | None = None
    api_key: str | None = None
    admin_key: str | None = None
    served_model: str | None = None
    max_new_tokens: int | None = None
    limits: dict[str, int | None] = Field(default_factory=dict)
    robustness: bool = True
    robustness_items: int = 20
    relearn_epochs: float = 1.0
    relearn_lr: float | None = None  # None: the reference models' finetuning lr (how the facts were learned)
    use_cache: bool = True
    request_timeout_s: float = 3600.0
    baseline_overrides: dict[str, dict[str, Any]] = Field(default_factory=dict)
    request_options: dict[str, dict[str, Any]] = Field(default_factory=dict)  # served method -> request options


def _hf_maker(path: str | Path, name: str) -> Any:
    return lambda: HFModelUnderTest.from_dir(path, name=name)


def run_tofu_eval(
    cfg: TofuEvalConfig,
    reference_preset: ReferencePreset | None = None,
    tofu: TofuData | None = None,
    train_missing_references: bool = True,
    on_method_done: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Evaluate every method of `cfg` and return the results dict the report is built from.

    `on_method_done` gets the results so far after every method (the CLI writes a partial report with
    them, so an evaluation of many hours that is cut short still leaves what it measured)."""
    from unlearnd.evaluation import robustness
    from unlearnd.train import reference as ref_mod

    tofu = tofu or TofuData()
    p = reference_preset or ref_mod.preset(cfg.preset, cfg.forget_split)
    if not train_missing_references:
        refs = ensure_reference_models(p, tofu=tofu, which=())
        for d in (refs.target_dir, refs.retain_dir):
            if not is_complete(Path(d)):
                raise FileNotFoundError(
                    f"reference model missing at {d}: run `unlearnd train reference --preset {p.name}`"
                )
    else:
        refs = ensure_reference_models(p, tofu=tofu)
    settings = EvalSettings(max_new_tokens=cfg.max_new_tokens or p.max_new_tokens, limits=cfg.limits)
    splits = eval_splits(refs, tofu, cfg.limits)
    unknown = [m for m in cfg.methods if m not in REFERENCE_METHODS + BASELINES + SERVED_METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}")
    needs_server = [m for m in cfg.methods if m in SERVED_METHODS]
    if needs_server and not cfg.server_url:
        raise ValueError(f"methods {needs_server} are served guardrails: pass --server-url")

    judge = HFModelUnderTest.from_dir(refs.target_dir, name="target")  # perplexity judge = target model
    results: dict[str, Any] = {
        "preset": p.model_dump(),
        "settings": settings.model_dump(),
        "rouge_backend": rouge_backend(),
        "split_sizes": {k: len(v) for k, v in splits.as_dict().items()},
        "reference": {
            k: {
                "dir": d,
                **{x: y for x, y in read_info(Path(d)).items() if x != "train"},
                "train": {x: y for x, y in read_info(Path(d)).get("train", {}).items() if x != "losses"},
            }
            for k, d in (("target", refs.target_dir), ("retain", refs.retain_dir))
        },
        "methods": {},
    }
    runs: dict[str, RunRecords] = {}
    retain_run: RunRecords | None = None
    # the user's order (served methods first lets their server jobs start at once); the retain run, every
    # method's forget-quality reference, comes first when not asked for (it is usually cached), so every
    # partial report already has forget quality
    order = cfg.methods if "retain" in cfg.methods else ["retain", *cfg.methods]
    for method in order:
        entry: dict[str, Any] = {"kind": None, "cost": {}}
        served: ServedModelUnderTest | None = None
        request_id: str | None = None
        model_dir: Path | None = None
        t0 = time.perf_counter()
        try:
            if method in REFERENCE_METHODS:
                model_dir = Path(refs.target_dir if method == "target" else refs.retain_dir)
                entry["kind"] = "reference"
                train = read_info(model_dir).get("train", {})
                entry["cost"].update(
                    {"train_wall_seconds": train.get("wall_seconds"), "train_cpu_seconds": train.get("cpu_seconds")}
                )
            elif method in BASELINES:
                bcfg = default_baseline_config(method, p.name)
                if method in cfg.baseline_overrides:
                    bcfg = bcfg.model_copy(update=cfg.baseline_overrides[method])
                model_dir = train_baseline(method, refs, bcfg, tofu=tofu)
                info = read_info(model_dir)
                entry.update(kind="baseline", config=info["config"], model_dir=str(model_dir))
                entry["cost"].update(
                    {
                        "train_wall_seconds": info["train"]["wall_seconds"],
                        "train_cpu_seconds": info["train"]["cpu_seconds"],
                        "train_steps": info["train"]["steps"],
                        "final_loss": info["train"]["final_loss"],
                    }
                )
            else:
                entry["kind"] = "served"
                served = ServedModelUnderTest(
                    cfg.server_url or "",
                    name=method,
                    api_key=cfg.api_key,
                    admin_key=cfg.admin_key,
                    model=cfg.served_model,
                )
                if method != "served_target":
                    spec = forget_request_spec(method, refs, tofu, cfg.request_options.get(method))
                    request_id = served.register(spec)
                    t_reg = time.perf_counter()
                    activated = served.wait_active(request_id, timeout_s=cfg.request_timeout_s)
                    entry["cost"]["activation_wall_seconds"] = time.perf_counter() - t_reg
                    job = activated.get("training") or {}  # the server's offline job for this request
                    entry["cost"].update(
                        {"train_wall_seconds": job.get("wall_seconds"), "train_cpu_seconds": job.get("cpu_seconds")}
                    )
                    entry["training"] = job.get("method")
                    entry["request_id"] = request_id
                    entry["entities"] = spec["entities"]
            if model_dir is not None:
                md = model_dir
                records, wall, cached = cached_run(
                    method, model_fingerprint(md), _hf_maker(md, method), splits, settings, judge, cfg.use_cache
                )
            else:
                assert served is not None
                records, wall, cached = cached_run(method, None, lambda s=served: s, splits, settings, judge, False)
                entry["routes"] = {
                    name: dict(Counter(it.route for it in sr.items)) for name, sr in records.splits.items()
                }
                entry["generation_routes"] = dict(Counter(served.generation_routes))
            entry["cost"].update({"eval_wall_seconds": wall, "eval_cached": cached})
            runs[method] = records
            if method == "retain":
                retain_run = records
            if cfg.robustness and method in cfg.methods:

                def probe(
                    md: Path | None = model_dir, s: ServedModelUnderTest | None = served, m: str = method
                ) -> dict[str, Any]:
                    mut: ModelUnderTest = s if s is not None else HFModelUnderTest.from_dir(md, name=m)
                    out = robustness.run_probes(
                        mut, tofu, refs, n_items=cfg.robustness_items, max_new_tokens=settings.max_new_tokens
                    )
                    if m in BASELINES or m == "retain":  # retain = relearning from scratch
                        assert md is not None
                        out["relearning"] = robustness.relearning_attack(
                            md,
                            tofu.split(p.forget_split),
                            epochs=cfg.relearn_epochs,
                            lr=cfg.relearn_lr or p.learning_rate,
                            max_new_tokens=settings.max_new_tokens,
                            n_eval=cfg.robustness_items,
                        )
                    return out

                # a served method's probes always run (the server's state is not part of any key)
                key = (
                    None
                    if model_dir is None
                    else {
                        "robustness": model_fingerprint(model_dir),
                        "method": method,
                        "code": EVAL_CODE_VERSION,
                        "n_items": cfg.robustness_items,
                        "max_new_tokens": settings.max_new_tokens,
                        "relearn": [cfg.relearn_epochs, cfg.relearn_lr or p.learning_rate],
                        "forget": items_digest(tofu.split(p.forget_split)),
                        "retain_authors": refs.data.retain_authors,
                    }
                )
                entry["robustness"], entry["cost"]["robustness_cached"] = cached_json(key, probe, cfg.use_cache)
        except Exception as exc:  # one failing method must not lose the others' results
            log.exception("method %s failed", method)
            entry["error"] = f"{type(exc).__name__}: {exc}"
        finally:
            if served is not None:
                if request_id is not None:
                    try:
                        served.deactivate(request_id)
                    except Exception:  # noqa: BLE001
                        log.warning("could not deactivate forget request %s", request_id)
                served.close()
        entry["cost"]["total_wall_seconds"] = time.perf_counter() - t0
        if method in cfg.methods:
            results["methods"][method] = entry
        if on_method_done is not None:
            on_method_done(_with_metrics(results, cfg, runs, retain_run))
    return _with_metrics(results, cfg, runs, retain_run)


def _with_metrics(
    results: dict[str, Any], cfg: TofuEvalConfig, runs: dict[str, RunRecords], retain_run: RunRecords | None
) -> dict[str, Any]:
    """The results with methods in the user's order, their metrics and example generations."""
    methods = {m: dict(results["methods"][m]) for m in cfg.methods if m in results["methods"]}
    for method, records in runs.items():
        if method in methods:
            methods[method]["metrics"] = compute_all(records, retain_run)
    examples = {
        m: [
            {"question": it.question, "answer": it.answer, "generation": it.generation}
            for it in r.splits["forget"].items[:3]
        ]
        for m, r in runs.items()
        if m in methods and "forget" in r.splits
    }
    return {**results, "methods": methods, "examples": examples}


def evaluate_and_report(
    cfg: TofuEvalConfig, reference_preset: ReferencePreset, out: Path, name: str, train_missing_references: bool = True
) -> tuple[dict[str, Any], dict[str, Path]]:
    """`run_tofu_eval`, rewriting the report after every method (marked PARTIAL until the run ends, so a
    run of many hours that is cut short still leaves what it measured); returns the results and files."""
    stamp = run_stamp()  # the code that runs is the code at the start, whatever is committed meanwhile

    def partial(results: dict[str, Any]) -> None:
        done = len(results["methods"])
        write_report(
            results,
            out,
            name,
            stamp,
            notes=[
                f"{PARTIAL_NOTE} {done} of {len(cfg.methods)} methods done; the run is still going or was cut short."
            ],
        )

    results = run_tofu_eval(
        cfg,
        reference_preset=reference_preset,
        train_missing_references=train_missing_references,
        on_method_done=partial,
    )
    return results, write_report(results, out, name, stamp)


def methods_list(text: str | Sequence[str]) -> list[str]:
    items = text.split(",") if isinstance(text, str) else list(text)
    return [m.strip() for m in items if m.strip()]
