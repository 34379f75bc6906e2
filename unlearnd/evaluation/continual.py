"""Continual forget requests through the served pipeline.

Users add forget requests one after another. Each new request must not undo the earlier ones (O3's
orthogonal LoRAs exist for this) and must not change what the model says about everything else. This
harness registers TOFU author groups on a running server in order and, before the first and after each
one, asks the forget questions of every group and questions about authors no request names:

* forget ROUGE-L recall per group (lower = forgotten; a group must stay low once requested),
* the share of each group's prompts the pipeline flagged (route other than "none"),
* untouched authors: ROUGE-L recall of their answers and the share of greedy answers unchanged from
  before any request (drift).

Everything goes over HTTP, so the numbers are what users get.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from unlearnd.data.qa import spread
from unlearnd.data.tofu import TofuData, author_names
from unlearnd.domain import QAItem
from unlearnd.evaluation.metrics import rouge_l_recall
from unlearnd.evaluation.model_under_test import ServedModelUnderTest
from unlearnd.evaluation.report import PARTIAL_NOTE, fmt, run_stamp, stamp_lines, write_records, write_report_files
from unlearnd.evaluation.robustness import mean_or_none
from unlearnd.prompting import user_messages

log = logging.getLogger(__name__)


class ContinualConfig(BaseModel):
    method: str = "lora"
    groups: list[list[int]] = Field(description="TOFU author ids; one forget request per group, in this order")
    untouched_authors: list[int] = Field(description="authors no request names (drift is measured on them)")
    items_per_group: int = 10
    untouched_items: int = 20
    max_new_tokens: int = 48
    options: dict[str, Any] = Field(default_factory=dict, description="the requests' method options")
    request_timeout_s: float = 3600.0


def request_spec(
    name: str,
    method: str,
    forget: Sequence[QAItem],
    retain: Sequence[QAItem],
    options: dict[str, Any] | None = None,
    names: dict[int, str] | None = None,
) -> dict[str, Any]:
    """The forget request a user would register: QA pairs, retain QA and the authors' names as entities.

    `names`: each author's name as the user knows it (`TofuData.names_of`). Without them, names are derived
    from `forget` alone, which misses an author whose pairs there rarely use the name like a person's (half
    of Xin Lee Williams' forget05 pairs give no name at all): a user always names the person."""
    present = {it.author for it in forget if it.author is not None}
    names = {a: n for a, n in names.items() if a in present} if names is not None else author_names(forget)
    spec: dict[str, Any] = {
        "name": name,
        "method": method,
        "forget": [{"question": it.question, "answer": it.answer} for it in forget],
        "retain": [{"question": it.question, "answer": it.answer} for it in retain],
        "entities": [names[a] for a in sorted(names)],
    }
    if options:
        spec["options"] = dict(options)
    return spec


def item_records(
    stage: str,
    split: str,
    items: Sequence[QAItem],
    generations: Sequence[str],
    routes: Sequence[str],
    before: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """One record per question asked at one step: what was asked, what came back and on which route.
    `before`: the same questions' answers before any request (untouched authors), for drift."""
    records = []
    for i, (item, generation, route) in enumerate(zip(items, generations, routes, strict=True)):
        record: dict[str, Any] = {
            "stage": stage,
            "split": split,
            "author": item.author,
            "question": item.question,
            "answer": item.answer,
            "generation": generation,
            "route": route,
            "rouge_l_recall": rouge_l_recall(item.answer, generation),
        }
        if before is not None:
            record["unchanged"] = generation == before[i]
        records.append(record)
    return records


def split_summary(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """A split's row at one step, computed from its records only (so the report can be recomputed)."""
    routes = Counter(r["route"] for r in records)
    summary: dict[str, Any] = {
        "rouge": mean_or_none([r["rouge_l_recall"] for r in records]),
        "flagged": 1.0 - routes.get("none", 0) / len(records) if records else None,
        "routes": dict(routes),
    }
    if records and "unchanged" in records[0]:
        summary["unchanged"] = mean_or_none([float(r["unchanged"]) for r in records])
    return summary


def summary_from_records(records: Sequence[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """Every step's split rows recomputed from committed records: {stage: {split: row}}."""
    grouped: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for record in records:
        grouped.setdefault(record["stage"], {}).setdefault(record["split"], []).append(record)
    return {stage: {split: split_summary(rs) for split, rs in splits.items()} for stage, splits in grouped.items()}


def run_continual(
    cfg: ContinualConfig,
    served: ServedModelUnderTest,
    tofu: TofuData | None = None,
    on_stage: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Register the groups one by one; measure every group and the untouched authors after each step.

    `on_stage` gets the results so far after every step (the CLI rewrites its report with them)."""
    tofu = tofu or TofuData()
    overlap = {a for g in cfg.groups for a in g} & set(cfg.untouched_authors)
    if overlap:
        raise ValueError(f"authors {sorted(overlap)} are both requested and untouched")
    group_items = [tofu.by_authors(g) for g in cfg.groups]
    for authors, items in zip(cfg.groups, group_items):
        if not items:
            raise ValueError(f"no TOFU questions for authors {authors}")
    untouched_pool = tofu.by_authors(cfg.untouched_authors)
    probes = {f"group{i + 1}": spread(items, cfg.items_per_group) for i, items in enumerate(group_items)}
    probes["untouched"] = spread(untouched_pool, cfg.untouched_items)
    before: list[str] = []
    records: list[dict[str, Any]] = []

    def measure(label: str) -> dict[str, Any]:
        row: dict[str, Any] = {"after": label, "splits": {}}
        for name, items in probes.items():
            gens = served.generate(
                [user_messages(it.question) for it in items], cfg.max_new_tokens, desc=f"{label}: {name}"
            )
            routes = served.generation_routes[-len(items) :]
            if name == "untouched" and not before:
                before.extend(gens)
            baseline = before if name == "untouched" else None
            split_records = item_records(label, name, items, gens, routes, baseline)
            records.extend(split_records)
            row["splits"][name] = split_summary(split_records)
        log.info("continual %s: %s", label, {k: round(v["rouge"] or 0.0, 3) for k, v in row["splits"].items()})
        return row

    def results() -> dict[str, Any]:
        return {
            "config": cfg.model_dump(),
            "probe_sizes": {k: len(v) for k, v in probes.items()},
            "stages": stages,
            "records": records,
        }

    request_ids: list[str] = []
    stages = [measure("no request")]
    if on_stage is not None:
        on_stage(results())
    try:
        for i, (authors, items) in enumerate(zip(cfg.groups, group_items)):
            # retain data for the methods that use it: every other group's and the untouched authors' QA
            retain = [it for j, other in enumerate(group_items) if j != i for it in other] + untouched_pool
            spec = request_spec(
                f"continual-{i + 1}-authors-{'-'.join(map(str, authors))}", cfg.method, items, retain, cfg.options
            )
            request_id = served.register(spec)
            request_ids.append(request_id)
            job = served.wait_active(request_id, timeout_s=cfg.request_timeout_s)
            stage = measure(f"+group{i + 1}")
            stage.update(
                request_id=request_id,
                entities=spec["entities"],
                training={k: v for k, v in (job.get("training") or {}).items() if k != "method"},
                method_report=(job.get("training") or {}).get("method"),
            )
            stages.append(stage)
            if on_stage is not None:
                on_stage(results())
    finally:
        for request_id in request_ids:
            try:
                served.deactivate(request_id)
            except Exception:
                log.warning("could not deactivate forget request %s", request_id)
    return results()


def markdown(results: dict[str, Any]) -> list[str]:
    """One row per step: forget ROUGE-L and flagged share per group, then the untouched authors."""
    stages = results.get("stages", [])
    if not stages:
        return []
    groups = [k for k in stages[0]["splits"] if k != "untouched"]
    cfg = results.get("config", {})
    lines = [
        f"## Continual requests ({cfg.get('method')}: groups {cfg.get('groups')}, untouched authors "
        f"{cfg.get('untouched_authors')})",
        "",
        "| After | "
        + " | ".join(f"{g} ROUGE-L (flagged)" for g in groups)
        + " | Untouched ROUGE-L | Untouched unchanged | Train CPU s |",
        "|---|" + "---|" * (len(groups) + 3),
    ]
    for stage in stages:
        splits = stage["splits"]
        cells = [f"{fmt(splits[g]['rouge'])} ({fmt(splits[g]['flagged'])})" for g in groups]
        untouched = splits.get("untouched", {})
        lines.append(
            f"| {stage['after']} | " + " | ".join(cells) + f" | {fmt(untouched.get('rouge'))} | "
            f"{fmt(untouched.get('unchanged'))} | {fmt((stage.get('training') or {}).get('cpu_seconds'), 0)} |"
        )
    return [
        *lines,
        "",
        (
            "A requested group's ROUGE-L must fall once its request is active and stay down as later "
            "requests arrive; untouched authors' answers should not move (unchanged = share of greedy "
            "answers identical to those before any request)."
        ),
        "",
    ]


def write_report(results: dict[str, Any], out: Path, name: str, stamp: dict[str, Any], final: bool) -> dict[str, Path]:
    """`<name>.json`, `<name>.md` and the per-item records `<name>.items.jsonl.gz` under `out`, with the
    run's stamp; PARTIAL until the last request."""
    records = results.get("records", [])
    summary = {k: v for k, v in results.items() if k != "records"}
    results = {**summary, **stamp, "records_file": f"{name}.items.jsonl.gz"}
    cfg = results.get("config", {})
    md = [f"# Continual forget requests: {cfg.get('method')}", "", *stamp_lines(results), *markdown(results)]
    md += [f"Per-item records (question, gold answer, reply, route, ROUGE-L per step): `{name}.items.jsonl.gz`.", ""]
    if not final:
        md.append(f"- {PARTIAL_NOTE} {len(results['stages']) - 1} of {len(cfg.get('groups', []))} requests done.")
    items = write_records(out / name, records)
    files = write_report_files(out / name, results, "\n".join(md).rstrip() + "\n")
    return {"json": files.data, "markdown": files.markdown, "records": items}


def run_and_report(
    cfg: ContinualConfig, served: ServedModelUnderTest, out: Path, name: str, tofu: TofuData | None = None
) -> dict[str, Path]:
    """`run_continual`, rewriting the report after every request."""
    stamp = run_stamp()
    results = run_continual(cfg, served, tofu, on_stage=lambda r: write_report(r, out, name, stamp, final=False))
    return write_report(results, out, name, stamp, final=True)
