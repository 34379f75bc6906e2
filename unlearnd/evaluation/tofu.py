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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from unlearnd.config import cache_dir
from unlearnd.data.qa import spread
from unlearnd.data.tofu import TofuData, has_tofu_split
from unlearnd.domain import QAItem
from unlearnd.evaluation.folds import EvalSplits, Fold, check_disjoint, make_folds, pool_runs
from unlearnd.evaluation.metrics import (
    NO_MODEL_ROUTES,
    ItemRecord,
    RunRecords,
    SplitRecords,
    bootstrap_intervals,
    compute_all,
    metric_code_version,
    not_applicable,
    rouge_backend,
    truth_ratios,
)
from unlearnd.evaluation.model_under_test import HFModelUnderTest, ModelUnderTest, ServedModelUnderTest
from unlearnd.evaluation.report import PARTIAL_NOTE, run_stamp, write_records, write_report
from unlearnd.methods import METHODS, seeded_methods
from unlearnd.prompting import user_messages
from unlearnd.train.baselines import (
    BASELINE_CODE_VERSION,
    BASELINES,
    BaselineConfig,
    default_baseline_config,
    train_baseline,
)
from unlearnd.train.reference import (
    ReferenceModels,
    ReferencePreset,
    cache_key,
    ensure_reference_models,
    is_complete,
    items_digest,
    model_fingerprint,
    read_info,
    weights_digest,
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
                route=item_route([x.route for x in s]),
            )
        )
    return SplitRecords(split=name, items=records)


def item_route(routes: Sequence[str | None]) -> str | None:
    """An item's route: refused when any of its continuations was (the scoring endpoint scans prompt and
    continuation, so one perturbed answer naming a forgotten author can be refused while the answer is
    not, and a refused continuation's score is not the model's), else the answer's route."""
    return next((r for r in routes if r in NO_MODEL_ROUTES), routes[0] if routes else None)


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


def surrogate_model_dir(refs: ReferenceModels) -> str | None:
    """What a user has that never saw the forget set: the base model the target was finetuned from.

    ECO's surrogate target comes from it, never from the retain model (the model forget quality is
    measured against: tuning toward it would be tuning on the answer key)."""
    base = read_info(Path(refs.target_dir)).get("base_model")
    return str(base) if base else None


def forget_request_spec(
    method: str,
    refs: ReferenceModels,
    forget: Sequence[QAItem],
    retain: Sequence[QAItem],
    options: dict[str, Any] | None = None,
    name: str | None = None,
    names: dict[int, str] | None = None,
) -> dict[str, Any]:
    """The forget request a user would register: the QA pairs it is given (one fold's fit items, never
    the questions it is measured on), retain QA and the authors' names; `options` are the method's
    request options (preset fields such as `steps`)."""
    from unlearnd.evaluation.continual import request_spec

    defaults: dict[str, Any] = {}
    if method == "eco":
        surrogate = surrogate_model_dir(refs)
        if surrogate:
            defaults["surrogate_model"] = surrogate
        else:
            log.warning(
                "the target names no base model: ECO's target falls back to the served model's own scores "
                "(perturbed or other questions' answers)"
            )
    options = {**defaults, **(options or {})} or None
    return request_spec(name or f"tofu-{refs.preset.forget_split}-{method}", method, forget, retain, options, names)


# --------------------------------------------------------------------------- the whole evaluation

RANDOM_METHODS = (*BASELINES, *seeded_methods())  # trained with a seed (data order, init, noise)


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
    n_folds: int = Field(2, ge=2, description="cross-fitting folds: fit on one, measured on the next")
    seeds: list[int] = Field(default_factory=lambda: [0], description="seeds for methods that train with one")
    robustness: bool = True
    robustness_items: int = 20
    relearn_epochs: float = 1.0
    relearn_lr: float | None = None  # None: the reference models' finetuning lr (how the facts were learned)
    use_cache: bool = True
    request_timeout_s: float = 3600.0
    served_concurrency: int = 8
    score_route_from: Literal["prompt", "prompt+continuation"] = Field(
        "prompt",
        description="what routes a served method's scored items: the question alone (what a user sends) or "
        "the question and the gold answer being scored (which names the subject: a flattering route)",
    )
    bootstrap: int = Field(1000, ge=0, description="bootstrap resamples for the confidence intervals (0: none)")
    baseline_overrides: dict[str, dict[str, Any]] = Field(default_factory=dict)
    baseline_grid: str | None = Field(
        None, description="a budget grid (`baseline_grid.GRIDS`) each baseline's fold picks its config from"
    )
    request_options: dict[str, dict[str, Any]] = Field(default_factory=dict)  # served method -> request options


def _hf_maker(path: str | Path, name: str) -> Any:
    return lambda: HFModelUnderTest.from_dir(path, name=name)


def seeded_name(method: str, seed: int) -> str:
    """A method's row name for one seed: the plain name for seed 0, `method@seed<k>` otherwise."""
    return method if seed == 0 else f"{method}@seed{seed}"


def expand_seeds(methods: Sequence[str], seeds: Sequence[int]) -> list[tuple[str, str, int]]:
    """(row name, method, seed) for every method, once per seed for those that train with one."""
    rows = []
    for method in dict.fromkeys(methods):
        for seed in dict.fromkeys(seeds) if method in RANDOM_METHODS else [0]:
            rows.append((seeded_name(method, seed), method, seed))
    return rows


def run_tofu_eval(
    cfg: TofuEvalConfig,
    reference_preset: ReferencePreset | None = None,
    tofu: TofuData | None = None,
    train_missing_references: bool = True,
    on_method_done: Callable[[dict[str, Any]], None] | None = None,
    on_records: Callable[[dict[str, RunRecords]], None] | None = None,
) -> dict[str, Any]:
    """Evaluate every method of `cfg` and return the results dict the report is built from; `on_records`
    gets every method's per-item records as they grow (the CLI commits them with the report).

    References are measured on every evaluation item. Every other method is cross-fitted (`folds`):
    fit (trained, registered, tuned) on one fold and measured on the next, its records pooled, so each
    item is measured by a method that never saw it. `on_method_done` gets the results so far after
    every method (the CLI writes a partial report with them, so an evaluation of many hours that is cut
    short still leaves what it measured)."""
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
    folds = make_folds(splits, tofu.split(p.forget_split), refs.data.retain_items, cfg.n_folds)
    for fold in folds:
        check_disjoint(fold, splits)
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
        "metric_code": metric_code_version(),
        "split_sizes": {k: len(v) for k, v in splits.as_dict().items()},
        "cross_fitting": {
            "n_folds": cfg.n_folds,
            "fit_sizes": [{"forget": len(f.fit_forget), "retain": len(f.fit_retain)} for f in folds],
            "rule": "fit on fold k (forget questions at position k mod n within each author; retain authors dealt "
            "to k), measured on fold k+1; references measured on every item",
        },
        "reference": {
            k: {
                "dir": d,
                "weights_sha256": weights_digest(Path(d)),
                **{x: y for x, y in read_info(Path(d)).items() if x != "train"},
                "train": {x: y for x, y in read_info(Path(d)).get("train", {}).items() if x != "losses"},
            }
            for k, d in (("target", refs.target_dir), ("retain", refs.retain_dir))
        },
        "methods": {},
    }
    ctx = _Context(refs=refs, tofu=tofu, splits=splits, folds=folds, settings=settings, judge=judge, cfg=cfg)
    runs: dict[str, RunRecords] = {}
    retain_run: RunRecords | None = None
    # the retain run, every method's forget-quality reference, runs first (asked for or not; it is usually
    # cached), so each method's metrics are final when it ends; the report keeps the user's order
    rows = expand_seeds(["retain", *[m for m in cfg.methods if m != "retain"]], cfg.seeds)
    asked = {row for row, _, _ in expand_seeds(cfg.methods, cfg.seeds)}
    for row, method, seed in rows:
        entry: dict[str, Any] = {"kind": None, "cost": {}, "seed": seed if method in RANDOM_METHODS else None}
        t0 = time.perf_counter()
        try:
            if method in REFERENCE_METHODS:
                records = _evaluate_reference(ctx, method, entry, robustness=row in asked)
            elif method in BASELINES:
                records = _evaluate_baseline(ctx, method, seed, entry)
            else:
                records = _evaluate_served(ctx, method, seed, entry)
            runs[row] = records
            if method == "retain":
                retain_run = ctx.retain_run = records
            entry["metrics"] = compute_all(records, retain_run)
            entry["not_applicable"] = not_applicable(records, retain_run, entry["metrics"])
            entry["intervals"] = bootstrap_intervals(records, retain_run, cfg.bootstrap)
        except Exception as exc:  # one failing method must not lose the others' results
            log.exception("method %s failed", row)
            entry["error"] = f"{type(exc).__name__}: {exc}"
        entry["cost"]["total_wall_seconds"] = time.perf_counter() - t0
        if row in asked:
            results["methods"][row] = entry
        _progress(on_method_done, on_records, _with_metrics(results, cfg, runs), runs)
    return _with_metrics(results, cfg, runs)


def _progress(
    on_method_done: Callable[[dict[str, Any]], None] | None,
    on_records: Callable[[dict[str, RunRecords]], None] | None,
    results: dict[str, Any],
    runs: dict[str, RunRecords],
) -> None:
    if on_method_done is not None:
        on_method_done(results)
    if on_records is not None:
        on_records(dict(runs))  # the retain run too: forget quality is computed against it


def item_records(runs: dict[str, RunRecords]) -> list[dict[str, Any]]:
    """One record per method, split and item: the log-probs, greedy hits and generation every metric is
    computed from."""
    return [
        {"method": method, "split": split, **item.model_dump()}
        for method, run in runs.items()
        for split, records in run.splits.items()
        for item in records.items
    ]


def run_from_item_records(records: Sequence[dict[str, Any]], method: str) -> RunRecords:
    """One method's records back from a report's per-item records (`item_records`'s inverse): a run on
    another machine measures against a committed report's retain model without re-evaluating it."""
    run = RunRecords(method=method)
    for record in records:
        if record["method"] != method:
            continue
        item = ItemRecord.model_validate({k: v for k, v in record.items() if k not in ("method", "split")})
        run.splits.setdefault(record["split"], SplitRecords(split=record["split"], items=[])).items.append(item)
    if not run.splits:
        raise ValueError(f"no records of {method!r}")
    return run


@dataclass
class _Context:
    """What every method's evaluation shares."""

    refs: ReferenceModels
    tofu: TofuData
    splits: EvalSplits
    folds: list[Fold]
    settings: EvalSettings
    judge: ModelUnderTest
    cfg: TofuEvalConfig
    retain_run: RunRecords | None = None  # forget quality's reference, and the budget grid's


def _add_cost(entry: dict[str, Any], key: str, value: float | None) -> None:
    """Add one fold's cost to the method's (None when no fold reported it)."""
    if value is None:
        entry["cost"].setdefault(key, None)
    else:
        entry["cost"][key] = (entry["cost"].get(key) or 0.0) + float(value)


def _probe_items(ctx: _Context) -> EvalSplits:
    """Where the robustness probes draw from: fold 0's measured items (the same for every method)."""
    return ctx.folds[0].eval_splits(ctx.splits)


def _probe(ctx: _Context, mut: ModelUnderTest, relearn_dir: Path | None, measured: EvalSplits) -> dict[str, Any]:
    """The prompt-level probes on `measured` (`_probe_items`), and the relearning attack for a model whose
    weights changed (`relearn_dir`)."""
    from unlearnd.evaluation import robustness

    out = robustness.run_probes(
        mut,
        ctx.tofu,
        ctx.refs,
        n_items=ctx.cfg.robustness_items,
        max_new_tokens=ctx.settings.max_new_tokens,
        forget_pool=measured.forget,
        retain_pool=measured.retain,
    )
    if relearn_dir is not None:
        out["relearning"] = robustness.relearning_attack(
            relearn_dir,
            ctx.tofu.split(ctx.refs.preset.forget_split),
            epochs=ctx.cfg.relearn_epochs,
            lr=ctx.cfg.relearn_lr or ctx.refs.preset.learning_rate,
            max_new_tokens=ctx.settings.max_new_tokens,
            n_eval=ctx.cfg.robustness_items,
        )
    return out


def _cached_probe(ctx: _Context, method: str, model_dir: Path, relearn: bool) -> tuple[dict[str, Any], bool]:
    measured = _probe_items(ctx)
    key = {
        "robustness": model_fingerprint(model_dir),
        "method": method,
        "code": EVAL_CODE_VERSION,
        "n_items": ctx.cfg.robustness_items,
        "max_new_tokens": ctx.settings.max_new_tokens,
        "relearn": [ctx.cfg.relearn_epochs, ctx.cfg.relearn_lr or ctx.refs.preset.learning_rate] if relearn else None,
        "pools": [items_digest(measured.forget), items_digest(measured.retain)],
    }
    return cached_json(
        key,
        lambda: _probe(
            ctx, HFModelUnderTest.from_dir(model_dir, name=method), model_dir if relearn else None, measured
        ),
        ctx.cfg.use_cache,
    )


def _evaluate_reference(ctx: _Context, method: str, entry: dict[str, Any], robustness: bool) -> RunRecords:
    """target / retain: measured on every evaluation item (they are fit on nothing a fold holds out)."""
    model_dir = Path(ctx.refs.target_dir if method == "target" else ctx.refs.retain_dir)
    entry["kind"] = "reference"
    train = read_info(model_dir).get("train", {})
    entry["cost"].update(
        {"train_wall_seconds": train.get("wall_seconds"), "train_cpu_seconds": train.get("cpu_seconds")}
    )
    records, wall, cached = cached_run(
        method,
        model_fingerprint(model_dir),
        _hf_maker(model_dir, method),
        ctx.splits,
        ctx.settings,
        ctx.judge,
        ctx.cfg.use_cache,
    )
    entry["cost"].update({"eval_wall_seconds": wall, "eval_cached": cached})
    if ctx.cfg.robustness and robustness:  # retain = relearning from scratch (the floor)
        entry["robustness"], entry["cost"]["robustness_cached"] = _cached_probe(
            ctx, method, model_dir, relearn=method == "retain"
        )
    return records


def _evaluate_baseline(ctx: _Context, method: str, seed: int, entry: dict[str, Any]) -> RunRecords:
    """A finetuning baseline per fold: trained from the target on the fold's fit items (with the config the
    budget grid picks on them, when one is set), measured on the next fold's items; the records pooled."""
    bcfg = default_baseline_config(method, ctx.refs.preset.name)
    if method in ctx.cfg.baseline_overrides:
        bcfg = bcfg.model_copy(update=ctx.cfg.baseline_overrides[method])
    bcfg = bcfg.model_copy(update={"seed": seed})
    entry.update(kind="baseline", config=bcfg.model_dump(), folds=[])
    fold_runs = []
    cached_all = True
    for fold in ctx.folds:
        fold_cfg, grid = _fold_config(ctx, method, bcfg, fold)
        model_dir = train_baseline(
            method, ctx.refs, fold_cfg, tofu=ctx.tofu, forget=fold.fit_forget, retain=fold.fit_retain
        )
        info = read_info(model_dir)["train"]
        for key in ("wall_seconds", "cpu_seconds"):
            _add_cost(entry, f"train_{key}", info[key])
        _add_cost(entry, "train_steps", info["steps"])
        records, wall, cached = cached_run(
            method,
            model_fingerprint(model_dir),
            _hf_maker(model_dir, method),
            fold.eval_splits(ctx.splits),
            ctx.settings,
            ctx.judge,
            ctx.cfg.use_cache,
        )
        _add_cost(entry, "eval_wall_seconds", wall)
        cached_all = cached_all and cached
        entry["folds"].append(
            {"model_dir": str(model_dir), "final_loss": info["final_loss"], "config": fold_cfg.model_dump(), **grid}
        )
        fold_runs.append(records)
        if fold.index == 0 and ctx.cfg.robustness:
            entry["robustness"], entry["cost"]["robustness_cached"] = _cached_probe(ctx, method, model_dir, True)
    entry["cost"]["eval_cached"] = cached_all
    return pool_runs(method, ctx.splits, ctx.folds, fold_runs)


def _fold_config(ctx: _Context, method: str, bcfg: BaselineConfig, fold: Fold) -> tuple[BaselineConfig, dict[str, Any]]:
    """The config a baseline trains with on `fold`: `bcfg`, or the budget grid's choice on the fold's fit
    items (cached: the grid's cells and choice; its chosen model is in the baseline cache)."""
    if not ctx.cfg.baseline_grid:
        return bcfg, {}
    from unlearnd.evaluation import baseline_grid as bg  # it builds on this module

    grid = bg.GRIDS[ctx.cfg.baseline_grid]
    if ctx.retain_run is None:
        raise ValueError("the budget grid scores against the retain model's records: evaluate retain first")

    def compute() -> dict[str, Any]:
        wall, cpu = time.perf_counter(), time.process_time()
        scorer = bg.FitScorer.for_fold(fold, ctx.splits, ctx.retain_run, ctx.judge)
        found = bg.run_grid(method, ctx.refs, bcfg, grid, fold.fit_forget, fold.fit_retain, scorer)
        return {
            **found.model_dump(),
            "wall_seconds": time.perf_counter() - wall,
            "cpu_seconds": time.process_time() - cpu,
        }

    key = {
        "grid": grid.model_dump(),
        "baseline": bcfg.model_dump(),
        "target": model_fingerprint(Path(ctx.refs.target_dir)),
        "forget": items_digest(fold.fit_forget),
        "retain": items_digest(fold.fit_retain),
        "retain_truth_ratios": truth_ratios(ctx.retain_run.splits["forget"].items),
        "code": [EVAL_CODE_VERSION, BASELINE_CODE_VERSION, bg.GRID_CODE_VERSION],
    }
    result, cached = cached_json(key, compute, ctx.cfg.use_cache)
    grid_entry = {
        "grid": ctx.cfg.baseline_grid,
        "grid_cells": result["cells"],
        "grid_diverged": result["diverged"],
        "grid_retain_floor": grid.retain_floor,
        "grid_wall_seconds": result["wall_seconds"],
        "grid_cpu_seconds": result["cpu_seconds"],
        "grid_cached": cached,
    }
    return BaselineConfig.model_validate(result["config"]), grid_entry


def _evaluate_served(ctx: _Context, method: str, seed: int, entry: dict[str, Any]) -> RunRecords:
    """A served guardrail per fold: a forget request registered with the fold's fit items only,
    measured on the next fold's items through the server, then removed; the records pooled.
    `served_target` registers nothing (the pass-through check). The server must hold no other forget
    request while a fold is measured (another fold's request would hold the questions measured)."""
    cfg = ctx.cfg
    entry.update(kind="served", folds=[], score_route_from=cfg.score_route_from)
    fold_runs: list[RunRecords] = []
    generation_routes: Counter[str] = Counter()
    for fold in ctx.folds:
        served = ServedModelUnderTest(
            cfg.server_url or "",
            name=method,
            api_key=cfg.api_key,
            admin_key=cfg.admin_key,
            model=cfg.served_model,
            concurrency=cfg.served_concurrency,
            route_from=cfg.score_route_from,
        )
        request_id: str | None = None
        fold_entry: dict[str, Any] = {}
        try:
            wait_for_request_counts(served, expected_active=0)
            if method != "served_target":
                options = dict(cfg.request_options.get(method, {}))
                if method in RANDOM_METHODS:
                    options.setdefault("seed", seed)
                spec = forget_request_spec(
                    method,
                    ctx.refs,
                    fold.fit_forget,
                    fold.fit_retain,
                    options,
                    name=f"tofu-{ctx.refs.preset.forget_split}-{method}-seed{seed}-fold{fold.index}",
                    names=ctx.tofu.names_of([it.author for it in fold.fit_forget if it.author is not None]),
                )
                request_id = served.register(spec)
                t_reg = time.perf_counter()
                activated = served.wait_active(request_id, timeout_s=cfg.request_timeout_s)
                _add_cost(entry, "activation_wall_seconds", time.perf_counter() - t_reg)
                wait_for_request_counts(served, expected_active=1)
                job = activated.get("training") or {}  # the server's offline job for this request
                _add_cost(entry, "train_wall_seconds", job.get("wall_seconds"))
                _add_cost(entry, "train_cpu_seconds", job.get("cpu_seconds"))
                entry["training"] = job.get("method")
                entry["entities"] = spec["entities"]
                fold_entry.update(
                    request_id=request_id,
                    fit_forget=len(spec["forget"]),
                    fit_retain=len(spec["retain"]),
                    options=spec.get("options"),
                    job={k: v for k, v in job.items() if k != "losses"} if job else None,
                )
            records, wall, _ = cached_run(
                method, None, lambda s=served: s, fold.eval_splits(ctx.splits), ctx.settings, ctx.judge, False
            )
            _add_cost(entry, "eval_wall_seconds", wall)
            fold_runs.append(records)
            generation_routes.update(served.generation_routes)  # the measured items' routes, not the probes'
            if fold.index == 0 and cfg.robustness:  # while fold 0's request is the active one
                entry["robustness"] = _probe(ctx, served, None, _probe_items(ctx))
                entry["cost"]["robustness_cached"] = False
        finally:
            try:
                if request_id is not None:
                    served.deactivate(request_id)
                    wait_for_request_counts(served, expected_active=0)
            finally:
                served.close()
        entry["folds"].append(fold_entry)
    entry["cost"]["eval_cached"] = False
    pooled = pool_runs(method, ctx.splits, ctx.folds, fold_runs)
    entry["routes"] = {name: dict(Counter(it.route for it in sr.items)) for name, sr in pooled.splits.items()}
    entry["generation_routes"] = dict(generation_routes)
    return pooled


def wait_for_request_counts(served: ServedModelUnderTest, expected_active: int, timeout_s: float = 60.0) -> None:
    """Wait until the server serves exactly `expected_active` forget requests and none degraded or
    untrained; raise otherwise (a request left over from another fold or another user would be measured
    too, and a removed one can take a sync to leave the pipeline)."""
    deadline = time.monotonic() + timeout_s
    while True:
        health = served.client.health()
        counts = {k: health.get(f"{k}_forget_requests") for k in ("active", "degraded", "untrained")}
        if None in counts.values():
            raise RuntimeError("the server's /health gives no forget-request counts: is the admin key right?")
        if counts == {"active": expected_active, "degraded": 0, "untrained": 0}:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"the server serves {counts} forget requests, {expected_active} active expected: measuring now "
                "would mix in another request (remove it, or use a server of its own)"
            )
        time.sleep(0.5)


def _with_metrics(results: dict[str, Any], cfg: TofuEvalConfig, runs: dict[str, RunRecords]) -> dict[str, Any]:
    """The results with methods in the user's order (each seed's row after the first), and example
    generations."""
    order = [row for row, _, _ in expand_seeds(cfg.methods, cfg.seeds)]
    methods = {m: dict(results["methods"][m]) for m in order if m in results["methods"]}
    examples = {
        m: [
            {"question": it.question, "answer": it.answer, "generation": it.generation}
            for it in r.splits["forget"].items[:3]
        ]
        for m, r in runs.items()
        if m in methods and "forget" in r.splits
    }
    return {**results, "methods": methods, "examples": examples}


def engine_dtypes(cfg: TofuEvalConfig) -> str:
    """The dtypes the numbers were computed in: in-process models run in float32; a server says its own."""
    text = "float32 (in-process models)"
    if cfg.server_url:
        served = ServedModelUnderTest(cfg.server_url, name="health", api_key=cfg.api_key, admin_key=cfg.admin_key)
        try:
            dtype = served.client.health().get("engine_dtype")
        except Exception:
            dtype = None
        finally:
            served.close()
        text += f"; served: {dtype or 'not reported by the server'}"
    return text


def evaluate_and_report(
    cfg: TofuEvalConfig,
    reference_preset: ReferencePreset,
    out: Path,
    name: str,
    train_missing_references: bool = True,
    allow_dirty: bool | None = None,
) -> tuple[dict[str, Any], dict[str, Path]]:
    """`run_tofu_eval`, rewriting the report after every method (marked PARTIAL until the run ends, so a
    run of many hours that is cut short still leaves what it measured); returns the results and files.
    A dirty tree is refused before anything runs unless `allow_dirty` (see `run_stamp`)."""
    # the code that runs is the code at the start, whatever is committed meanwhile
    stamp = run_stamp(allow_dirty=allow_dirty)
    stamp["dtype"] = engine_dtypes(cfg)
    n_rows = len(expand_seeds(cfg.methods, cfg.seeds))

    def partial(results: dict[str, Any]) -> None:
        done = len(results["methods"])
        write_report(
            results,
            out,
            name,
            stamp,
            notes=[f"{PARTIAL_NOTE} {done} of {n_rows} methods done; the run is still going or was cut short."],
        )

    results = run_tofu_eval(
        cfg,
        reference_preset=reference_preset,
        train_missing_references=train_missing_references,
        on_method_done=partial,
        on_records=lambda runs: write_records(Path(out) / name, item_records(runs)),
    )
    return results, write_report(results, out, name, stamp)


def methods_list(text: str | Sequence[str]) -> list[str]:
    items = text.split(",") if isinstance(text, str) else list(text)
    return [m.strip() for m in items if m.strip()]
