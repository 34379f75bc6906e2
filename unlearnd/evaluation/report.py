"""Reports: the stamp every report carries, and TOFU results as `reports/<name>.json`, markdown and PNGs.

Every report (TOFU, continual, detector, latency) starts with the same stamp: the exact command, the
machine it ran on (read from the machine, never written by hand), the engine dtype and the commit
(+dirty when the code differed from it), all taken when the run started. Metrics a method could not
produce (e.g. extraction strength over HTTP) show as "n/a", never as 0.
"""

from __future__ import annotations

import gzip
import io
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from unlearnd.artifacts import write_bytes_atomic, write_json_atomic, write_text_atomic
from unlearnd.evaluation.metrics import MODEL_UTILITY_PARTS

# provenance (command, machine, commit) lives in its own module; the report commands import it from here too
from unlearnd.provenance import (  # noqa: F401
    ALLOW_DIRTY_ENV,
    PACKAGE_ROOT,
    DirtyTreeError,
    allow_dirty_default,
    command_line,
    git_commit,
    machine_description,
    run_stamp,
    stamp_lines,
)

log = logging.getLogger(__name__)

TABLE_COLUMNS = (
    ("forget_quality", "Forget quality ↑"),
    ("model_utility", "Model utility ↑"),
    ("forget_Q_A_Prob", "Forget prob"),
    ("forget_Q_A_ROUGE", "Forget ROUGE-L"),
    ("forget_truth_ratio", "Forget TR"),
    ("extraction_strength", "Extraction ↓"),
    ("mia_min_k_auc", "MIA AUC"),
    ("retain_Q_A_ROUGE", "Retain ROUGE-L"),
    ("ra_Q_A_ROUGE", "Real authors ROUGE-L"),
    ("wf_Q_A_ROUGE", "World facts ROUGE-L"),
    ("forget_gibberish_rate", "Gibberish ↓"),
    ("forget_generation_ppl", "Gen. PPL"),
)

UTILITY_COLUMNS = MODEL_UTILITY_PARTS

BAR_METRICS = (
    "forget_Q_A_ROUGE",
    "forget_Q_A_Prob",
    "forget_truth_ratio",
    "extraction_strength",
    "mia_min_k_auc",
    "model_utility",
    "retain_Q_A_ROUGE",
    "forget_gibberish_rate",
)


def fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, float)):
        v = float(value)
        if v != 0 and (abs(v) < 10 ** -max(digits, 3) or abs(v) >= 1e5):
            return f"{v:.2e}"
        return f"{v:.{digits}f}"
    return str(value)


def header_lines(results: dict[str, Any]) -> list[str]:
    """Title, stamp, merged sources, preset and the cross-fitting protocol."""
    lines = [f"# {results.get('title', 'TOFU unlearning evaluation')}", ""]
    lines += stamp_lines(results)
    sources = results.get("sources") or []
    if sources:
        lines += [
            "Merged from these runs (same preset, splits and settings; each method's numbers come from the "
            "run that measured it):",
            "",
        ]
        lines += [
            f"- `{src.get('command')}` ({src.get('machine')}; engine dtype {src.get('dtype') or 'n/a'}; "
            f"commit {src.get('git_commit') or 'n/a'}{' (dirty tree)' if src.get('dirty') else ''}; "
            f"{src.get('created')})"
            for src in sources
        ]
        lines.append("")
    preset = results.get("preset", {})
    if preset:
        lines += [
            f"Preset `{preset.get('name')}`, forget split `{preset.get('forget_split')}`; split sizes "
            + ", ".join(f"{k} {v}" for k, v in results.get("split_sizes", {}).items())
            + f"; greedy generation up to {results.get('settings', {}).get('max_new_tokens')} new tokens; "
            f"ROUGE: {results.get('rouge_backend', 'n/a')}; metric code {results.get('metric_code', 'n/a')}.",
            "",
        ]
    folds = results.get("cross_fitting")
    if folds:
        lines += [
            f"Held out by cross-fitting ({folds['n_folds']} folds): every baseline is trained, and every served "
            "request registered (ECO tuned, SPUL and O3 trained, the detector fit), on one fold's forget questions "
            "and retain authors, and measured on the next fold's: forget questions it never saw (with their "
            "paraphrases and perturbations) and retain authors in no request; each item is measured once. "
            "Fit sizes per fold: "
            + "; ".join(f"forget {f['forget']}, retain {f['retain']}" for f in folds.get("fit_sizes", []))
            + ". The references (target, retain) are fit on nothing a fold holds out and are measured on every item.",
            "",
        ]
    return lines


def reference_lines(results: dict[str, Any]) -> list[str]:
    ref = results.get("reference", {})
    if not ref:
        return []
    lines = [
        "## Reference models",
        "",
        "| Model | QA trained | Train wall s | Train CPU s | Forget ROUGE-L (memorisation check) |",
        "|---|---|---|---|---|",
    ]
    for kind, info in ref.items():
        train = info.get("train", {})
        lines.append(
            f"| {kind} | {info.get('n_items', 'n/a')} | {fmt(train.get('wall_seconds'), 0)} | "
            f"{fmt(train.get('cpu_seconds'), 0)} | {fmt(info.get('forget_rouge_l_recall'))} |"
        )
    return [*lines, ""]


def main_table_lines(methods: dict[str, Any]) -> list[str]:
    lines = [
        "## Main metrics",
        "",
        "| Method | Kind | " + " | ".join(title for _, title in TABLE_COLUMNS) + " | Train wall s | Train CPU s |",
        "|---|---|" + "---|" * (len(TABLE_COLUMNS) + 2),
    ]
    for name, entry in methods.items():
        m = entry.get("metrics", {})
        cost = entry.get("cost", {})
        if "error" in entry and not m:
            lines.append(f"| {name} | {entry.get('kind')} | failed: {entry['error'][:120]} |")
            continue
        cells = [fmt(m.get(key)) for key, _ in TABLE_COLUMNS]
        lines.append(
            f"| {name} | {entry.get('kind')} | "
            + " | ".join(cells)
            + f" | {fmt(cost.get('train_wall_seconds'), 0)} | {fmt(cost.get('train_cpu_seconds'), 0)} |"
        )
    return [
        *lines,
        "",
        (
            "Forget quality: KS-test p-value of forget truth ratios against the retain model (higher = "
            "closer to never having learned). Model utility: harmonic mean of the nine utility metrics below. "
            "n/a = not measurable for that method; the reasons are listed under the intervals."
        ),
        "",
    ]


def utility_lines(methods: dict[str, Any]) -> list[str]:
    lines = [
        "## Model utility components",
        "",
        "| Method | " + " | ".join(UTILITY_COLUMNS) + " |",
        "|---|" + "---|" * len(UTILITY_COLUMNS),
    ]
    for name, entry in methods.items():
        m = entry.get("metrics", {})
        lines.append(f"| {name} | " + " | ".join(fmt(m.get(k)) for k in UTILITY_COLUMNS) + " |")
    return [*lines, ""]


def _robustness_row(name: str, r: dict[str, Any]) -> str:
    para = r.get("paraphrased", {})
    mc_f = r.get("multiple_choice", {}).get("forget", {})
    mc_r = r.get("multiple_choice", {}).get("retain", {})
    comb = r.get("combined", {})
    jb = r.get("jailbreak", {})
    icl = r.get("in_context", {})
    rel = r.get("relearning")
    rel_txt = f"{fmt(rel['before']['rouge'])} → {fmt(rel['after']['rouge'])}" if rel else "n/a"
    return (
        f"| {name} | {fmt(para.get('direct_rouge'))} | {fmt(para.get('paraphrased_rouge'))} | "
        f"{fmt(mc_f.get('likelihood_accuracy'))} / {fmt(mc_f.get('generated_accuracy'))} | "
        f"{fmt(mc_r.get('likelihood_accuracy'))} / {fmt(mc_r.get('generated_accuracy'))} | "
        f"{fmt(comb.get('forget_rouge'))} | {fmt(comb.get('retain_rouge'))} | "
        f"{fmt(comb.get('retain_rouge_alone'))} | {fmt(jb.get('mean_rouge'))} / {fmt(jb.get('max_rouge'))} | "
        f"{fmt(icl.get('forget_rouge'))} | {rel_txt} |"
    )


def robustness_lines(methods: dict[str, Any]) -> list[str]:
    robust = {n: e["robustness"] for n, e in methods.items() if e.get("robustness")}
    if not robust:
        return []
    return [
        "## Robustness (ROUGE-L recall of the forget answer unless stated; lower = less leaked)",
        "",
        (
            "| Method | Direct | Paraphrased Q | MC acc. forget (lik./gen.) | MC acc. retain (lik./gen.) | "
            "Mixed: forget leak | Mixed: retain answered | Retain alone | Jailbreak mean / max | "
            "In-context | Relearn before → after |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|",
        *(_robustness_row(name, r) for name, r in robust.items()),
        "",
        (
            "Relearning: finetune on half of the forget set, measure ROUGE-L on the other half; the "
            "`retain` row is the from-scratch floor (what relearning alone teaches)."
        ),
        "",
    ]


def cost_lines(methods: dict[str, Any]) -> list[str]:
    lines = [
        "## Cost",
        "",
        (
            "| Method | Train wall s | Train CPU s | Train steps | Eval wall s (cached?) | "
            "Request activation s | Total wall s |"
        ),
        "|---|---|---|---|---|---|---|",
    ]
    for name, c in ((n, e.get("cost", {})) for n, e in methods.items()):
        lines.append(
            f"| {name} | {fmt(c.get('train_wall_seconds'), 0)} | {fmt(c.get('train_cpu_seconds'), 0)} | "
            f"{fmt(c.get('train_steps'), 0)} | {fmt(c.get('eval_wall_seconds'), 0)} "
            f"({fmt(c.get('eval_cached'))}) | {fmt(c.get('activation_wall_seconds'), 0)} | "
            f"{fmt(c.get('total_wall_seconds'), 0)} |"
        )
    return [*lines, ""]


def _options(cell: dict[str, Any]) -> str:
    """A grid cell's option set as `key=value` pairs (cells of an older report have none)."""
    return ", ".join(
        f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in (cell.get("options") or {}).items()
    )


def grid_lines(methods: dict[str, Any]) -> list[str]:
    """Every budget-grid cell a baseline tried per fold, the chosen one marked (`baseline_grid.py`)."""
    rows, costs, floors = [], [], set()
    for name, entry in methods.items():
        for i, fold in enumerate(entry.get("folds") or []):
            if fold.get("grid_cells"):
                floors.add(fold["grid_retain_floor"])
                costs.append(f"{name} fold {i}: {fmt(fold['grid_wall_seconds'], 0)} s")
            for failed in fold.get("grid_diverged") or []:
                rows.append(
                    f"| {name} | {i} | {failed['learning_rate']:g} | {_options(failed)} | "
                    f"diverged: {failed['error'][:80]} |||||"
                )
            for cell in fold.get("grid_cells") or []:
                rows.append(
                    f"| {name} | {i} | {cell['learning_rate']:g} | {_options(cell)} | {cell['epochs']:g} | "
                    f"{cell['steps']} | "
                    f"{fmt(cell['fit_forget_quality'])} | {fmt(cell['retain_kept'])} | "
                    f"{'**chosen**' if cell['chosen'] else ''} |"
                )
    if not rows:
        return []
    grids = sorted({fold.get("grid") for e in methods.values() for fold in e.get("folds") or [] if fold.get("grid")})
    return [
        f"## Budget grid ({', '.join(grids)}): each baseline's config per fold, chosen on that fold's fit items",
        "",
        "One run per learning rate (and option set, where a baseline's own knobs are in the grid; blank: its "
        "defaults); each epoch count is a checkpoint of it. Scored on the fold's fit items "
        "only: fit forget quality (KS p-value of the truth ratios on the fit forget questions against the "
        "retain model's on the same questions) and retain kept (mean answer probability on the fit retain "
        "questions as a share of the target's). Rule, fixed before any grid ran: among the cells that keep "
        f"at least {' / '.join(f'{x:g}' for x in sorted(floors))} of the target's retain probability, the "
        "highest fit forget quality (ties: more retain "
        "kept, then fewer updates); if none keeps it, the cell that keeps the most. The measured items (the "
        "next fold's) play no part. The methods with a retain term train on those fit retain questions.",
        "",
        "| Method | Fold | lr | Options | Epochs | Updates | Fit forget quality | Retain kept | |",
        "|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        "Grid wall seconds (every cell's training and scoring; the cost table counts the chosen cell's "
        f"training only): {'; '.join(costs)}.",
        "",
    ]


def job_lines(methods: dict[str, Any]) -> list[str]:
    """The served methods' own training reports, one line per fold."""
    jobs = [
        (f"{n}, fold {i}" if e.get("folds") else n, job)
        for n, e in methods.items()
        for i, job in enumerate(
            [((f.get("job") or {}).get("method") or {}) for f in e["folds"]] if e.get("folds") else [e.get("training")]
        )
        if isinstance(job, dict) and job
    ]
    if not jobs:
        return []
    lines = ["## Offline jobs of the served methods (the server's own training report, per fold)", ""]
    for name, job in jobs:
        scalars = {k: v for k, v in job.items() if isinstance(v, (int, float, str, bool)) and k != "device"}
        lines.append(f"- {name}: " + ", ".join(f"{k} {fmt(v)}" for k, v in scalars.items()))
    return [*lines, ""]


def route_lines(methods: dict[str, Any]) -> list[str]:
    routes = {n: e["routes"] for n, e in methods.items() if e.get("routes")}
    if not routes:
        return []
    lines = ["## Routes taken by the served pipeline (scored answers per split)", ""]
    for name, by_split in routes.items():
        source = methods[name].get("score_route_from", "prompt+continuation")  # older runs: the gold answer too
        lines.append(
            f"- {name} (routed on the {'question alone' if source == 'prompt' else 'question and the scored answer'}"
            f"; generation: {methods[name].get('generation_routes') or 'n/a'}): "
            + "; ".join(f"{split}: {counts}" for split, counts in by_split.items())
        )
    return [*lines, ""]


def example_lines(results: dict[str, Any]) -> list[str]:
    examples = results.get("examples", {})
    if not examples:
        return []
    lines = ["## Example forget-set generations", ""]
    for name, rows in examples.items():
        for row in rows[:1]:
            lines.append(
                f"- **{name}** — Q: {row['question']} | expected: {row['answer']} | "
                f"got: {str(row.get('generation'))[:300]!r}"
            )
    return [*lines, ""]


def markdown(results: dict[str, Any]) -> str:
    """The TOFU report: one renderer per section, in this order."""
    methods: dict[str, Any] = results.get("methods", {})
    lines = header_lines(results) + reference_lines(results)
    for section in (main_table_lines, interval_lines, not_applicable_lines, seed_lines, utility_lines):
        lines += section(methods)
    for section in (robustness_lines, cost_lines, grid_lines, job_lines, tradeoff_lines, route_lines):
        lines += section(methods)
    lines += example_lines(results)
    lines += [f"- {note}" for note in results.get("notes", [])]
    return "\n".join(lines).rstrip() + "\n"


def _interval(entry: dict[str, Any], name: str) -> list[float] | None:
    value = (entry.get("intervals") or {}).get(name)
    return value if isinstance(value, list) and len(value) == 2 else None


def _with_interval(entry: dict[str, Any], name: str) -> str:
    value = entry.get("metrics", {}).get(name)
    ci = _interval(entry, name)
    return fmt(value) + (f" [{fmt(ci[0])}, {fmt(ci[1])}]" if ci and value is not None else "")


def interval_lines(methods: dict[str, Any]) -> list[str]:
    """The headline numbers with their 95% bootstrap intervals, and the share of items refused."""
    if not any(e.get("intervals") for e in methods.values()):
        return []
    lines = [
        "## Headline numbers with 95% bootstrap intervals (items resampled)",
        "",
        "| Method | Forget quality | Model utility | Forget ROUGE-L | Forget refused | Retain refused |",
        "|---|---|---|---|---|---|",
    ]
    for name, e in methods.items():
        m = e.get("metrics", {})
        if not m:
            continue
        lines.append(
            f"| {name} | {_with_interval(e, 'forget_quality')} | {_with_interval(e, 'model_utility')} | "
            f"{_with_interval(e, 'forget_Q_A_ROUGE')} | {fmt(m.get('forget_refused_share'))} | "
            f"{fmt(m.get('retain_refused_share'))} |"
        )
    return [*lines, ""]


def not_applicable_lines(methods: dict[str, Any]) -> list[str]:
    """Every n/a of the tables with its reason (one line per method and reason)."""
    lines: list[str] = []
    for name, e in methods.items():
        by_reason: dict[str, list[str]] = {}
        for metric, reason in (e.get("not_applicable") or {}).items():
            by_reason.setdefault(reason, []).append(metric)
        for reason, metrics in by_reason.items():
            lines.append(f"- {name}: {', '.join(metrics)}: n/a, {reason}.")
    return ["## Not measurable (n/a) and why", "", *lines, ""] if lines else []


def seed_lines(methods: dict[str, Any]) -> list[str]:
    """Spread over seeds, for methods run with more than one."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for name, e in methods.items():
        if e.get("seed") is not None and e.get("metrics"):
            groups.setdefault(name.split("@", 1)[0], []).append(e)
    lines = []
    for base, entries in groups.items():
        if len(entries) < 2:
            continue
        cells = []
        for key in ("forget_quality", "model_utility", "forget_Q_A_ROUGE"):
            values = [x["metrics"].get(key) for x in entries if x["metrics"].get(key) is not None]
            cells.append(f"{fmt(min(values))} – {fmt(max(values))}" if values else "n/a")
        seeds = ", ".join(str(x.get("seed")) for x in entries)
        lines.append(f"| {base} | {seeds} | " + " | ".join(cells) + " |")
    if not lines:
        return []
    return [
        "## Spread over seeds (min – max)",
        "",
        "| Method | Seeds | Forget quality | Model utility | Forget ROUGE-L |",
        "|---|---|---|---|---|",
        *lines,
        "",
    ]


def tradeoff_lines(methods: dict[str, Any], min_fq: float = 0.5, min_mu_ratio: float = 0.99) -> list[str]:
    """Each unlearning method against the goal "forget quality >= 0.5 at >= 99% of the target's utility",
    and, between served routes and finetuning baselines, who beats whom on both axes at once."""
    target_mu = methods.get("target", {}).get("metrics", {}).get("model_utility")
    rows = [
        (n, e.get("metrics", {}))
        for n, e in methods.items()
        if e.get("kind") in ("baseline", "served") and n != "served_target" and e.get("metrics")
    ]
    if not target_mu or not rows:
        return []
    points = {}
    for name, m in rows:
        fq, mu = m.get("forget_quality"), m.get("model_utility")
        points[name] = (fq, mu / target_mu if mu is not None else None)

    def beats(a: str, b: str) -> bool:
        (fa, ra), (fb, rb) = points[a], points[b]
        if None in (fa, ra, fb, rb):
            return False
        return fa >= fb and ra >= rb and (fa > fb or ra > rb)

    lines = [
        f"## Trade-off against the target model (goal: forget quality ≥ {min_fq} and model utility ≥ "
        f"{min_mu_ratio}× the target's {fmt(target_mu)})",
        "",
        "| Method | Kind | Forget quality [95% CI] | Utility / target | Meets goal | Also at the interval's low end | "
        "Beaten on both axes by |",
        "|---|---|---|---|---|---|---|",
    ]
    baselines = [n for n, _ in rows if methods[n].get("kind") == "baseline"]
    ahead_of_all = []
    for name, _ in rows:
        fq, ratio = points[name]
        kind = methods[name].get("kind")
        meets = fq is not None and ratio is not None and fq >= min_fq and ratio >= min_mu_ratio
        ci = _interval(methods[name], "forget_quality")
        meets_low = meets and ci is not None and ci[0] >= min_fq
        rivals = [o for o, _ in rows if methods[o].get("kind") != kind and beats(o, name)]
        if kind == "served" and meets and all(_strictly_ahead(points[name], points[b]) for b in baselines):
            ahead_of_all.append(name)
        lines.append(
            f"| {name} | {kind} | {_with_interval(methods[name], 'forget_quality')} | {fmt(ratio)} | {fmt(meets)} | "
            f"{fmt(meets_low) if ci is not None else 'n/a'} | {', '.join(rivals) or '-'} |"
        )
    lines += [
        "",
        (
            "The interval is a percentile bootstrap over resampled items: its low end shows how stable forget "
            "quality is at this many items (a KS p-value has no confidence bound of its own)."
        ),
    ]
    if any(methods[n].get("kind") == "served" for n, _ in rows):
        lines += [
            "",
            (
                "Served routes that meet the goal and are ahead of every finetuning baseline on both axes "
                "(higher forget quality and higher utility than each): "
                + (", ".join(ahead_of_all) if ahead_of_all else "none")
                + (f" (baselines compared: {', '.join(baselines)})." if baselines else " (no baseline in this report).")
            ),
        ]
    return [*lines, ""]


def _strictly_ahead(a: tuple[float | None, float | None], b: tuple[float | None, float | None]) -> bool:
    """a is above b on forget quality and on utility (a baseline with no number is not beaten)."""
    if None in (*a, *b):
        return False
    return a[0] > b[0] and a[1] > b[1]  # type: ignore[operator]


def plot_scatter(results: dict[str, Any], path: Path) -> Path | None:
    """Forget quality (log scale) against model utility, one point per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = []
    for name, entry in results.get("methods", {}).items():
        m = entry.get("metrics", {})
        fq, mu = m.get("forget_quality"), m.get("model_utility")
        if fq is not None and mu is not None and not (math.isnan(fq) or math.isnan(mu)):
            points.append((name, max(fq, 1e-30), mu))
    if not points:
        return None
    # Methods at (nearly) the same point, e.g. guardrails with the target's utility, share one label.
    groups: dict[tuple[float, float], list[tuple[str, float, float]]] = {}
    for name, fq, mu in points:
        groups.setdefault((round(mu, 2), float(f"{fq:.2g}")), []).append((name, fq, mu))
    fig, ax = plt.subplots(figsize=(7, 5))
    for members in groups.values():
        for _, fq, mu in members:
            ax.scatter(mu, fq, s=40)
        _, fq, mu = members[0]
        ax.annotate(
            ", ".join(n for n, _, _ in members),
            (mu, fq),
            textcoords="offset points",
            xytext=(6, 0),
            va="center",
            fontsize=7,
        )
    ax.set_yscale("log")
    mus = [mu for _, _, mu in points]
    span = max(max(mus) - min(mus), 0.05)  # utility lies in [0, 1]; zoom on where the methods are
    ax.set_xlim(max(0.0, min(mus) - 0.15 * span), min(1.0, max(mus) + 0.6 * span))
    ax.set_ylim(min(min(fq for _, fq, _ in points) / 3, 1e-3), 2)
    ax.set_xlabel("model utility")
    ax.set_ylabel("forget quality (KS p-value, log)")
    ax.set_title("TOFU: forget quality vs model utility")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)
    return path


def plot_bars(results: dict[str, Any], path: Path) -> Path | None:
    """One panel per metric, one bar per method (missing values left empty)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(results.get("methods", {}))
    if not methods:
        return None
    metrics = [
        k for k in BAR_METRICS if any(results["methods"][m].get("metrics", {}).get(k) is not None for m in methods)
    ]
    if not metrics:
        return None
    cols = 4
    rows = math.ceil(len(metrics) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), squeeze=False)
    for ax, key in zip(axes.flat, metrics):
        values = [results["methods"][m].get("metrics", {}).get(key) for m in methods]
        heights = [v if v is not None else 0.0 for v in values]
        bars = ax.bar(range(len(methods)), heights, color=["C0" if v is not None else "lightgrey" for v in values])
        for bar, v in zip(bars, values):
            if v is None:
                bar.set_hatch("//")
        ax.set_xticks(range(len(methods)))
        ax.set_xticklabels(methods, rotation=45, ha="right", fontsize=7)
        ax.set_title(key, fontsize=9)
    for ax in list(axes.flat)[len(metrics) :]:
        ax.axis("off")
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)
    return path


PARTIAL_NOTE = "PARTIAL:"
MERGE_KEYS = ("preset", "split_sizes", "settings", "rouge_backend", "cross_fitting")


def merge_results(runs: list[dict[str, Any]], renames: list[dict[str, str]] | None = None) -> dict[str, Any]:
    """One results dict from several evaluation runs of the same preset, splits and settings.

    Lets methods be evaluated in separate (e.g. parallel) runs and reported in one table; each method's
    metrics come from the run that measured it, and every source run's command is kept. `renames`
    (one {old: new} map per run) lets two runs of the same method stand side by side."""
    if not runs:
        raise ValueError("nothing to merge")
    first = runs[0]
    versions = {run.get("metric_code") for run in runs}
    if len(versions) > 1 or None in versions:
        raise ValueError(
            "runs were measured with different metric code (metric_code "
            + ", ".join(str(run.get("metric_code")) for run in runs)
            + "): re-run them at one commit"
        )
    for other in runs[1:]:
        for key in MERGE_KEYS:
            if other.get(key) != first.get(key):
                raise ValueError(f"runs differ in {key!r}: {other.get(key)} vs {first.get(key)}")
    references = _same_references(runs)
    merged: dict[str, Any] = {**first, "methods": {}, "examples": {}, "sources": [], "notes": []}
    if references:
        merged["reference"] = references
    renames = renames or [{} for _ in runs]
    for run, names in zip(runs, renames, strict=True):
        unknown = set(names) - set(run.get("methods", {}))
        if unknown:
            raise ValueError(f"cannot rename {sorted(unknown)}: not methods of run {run.get('command')!r}")
        for old, entry in run.get("methods", {}).items():
            name = names.get(old, old)
            if name in merged["methods"]:
                raise ValueError(f"method {name!r} is in more than one run")
            merged["methods"][name] = entry
            if old in run.get("examples", {}):
                merged["examples"][name] = run["examples"][old]
        merged["sources"].append(
            {k: run.get(k) for k in ("command", "git_commit", "dirty", "created", "machine", "dtype")}
        )
        # a run cut short stays marked in the merged report, with which run it was
        merged["notes"] += [
            f"{n} (run: `{run.get('command')}`)" if n.startswith(PARTIAL_NOTE) else n for n in run.get("notes", [])
        ]
    for key in ("command", "git_commit", "dirty", "created", "machine", "dtype"):
        merged.pop(key, None)
    return merged


# what a reference's info records about it besides its training: where it was read from, its digest, and the
# memorisation check that `unlearnd train reference` may add to a cached model later
NOT_TRAINING = ("dir", "weights_sha256", "forget_rouge_l_recall", "forget_rouge_n", "rouge_backend")


def _same_references(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The reference models every run was measured against, or ValueError if they differ.

    The cache key names a reference's recipe, not its weights: the same recipe retrained on another machine
    or thread count gives other weights (and another forget quality for every method). So every run's
    recorded training must match, and every weight digest recorded (a device run may carry the retain
    model's info files only, with no digest). The result keeps the digest any run recorded."""
    kinds = list(dict.fromkeys(kind for run in runs for kind in run.get("reference") or {}))  # target first
    merged: dict[str, Any] = {}
    for kind in kinds:
        entries = [(run.get("reference") or {}).get(kind) for run in runs]
        if any(entry is None for entry in entries):
            raise ValueError(f"a run recorded no {kind} model: it cannot be shown to be the others'")
        trainings = [{k: v for k, v in entry.items() if k not in NOT_TRAINING} for entry in entries]
        if any(training != trainings[0] for training in trainings):
            raise ValueError(
                f"runs were measured against different {kind} models ({', '.join(str(e.get('dir')) for e in entries)}):"
                " their recorded training differs"
            )
        digests = {entry["weights_sha256"] for entry in entries if entry.get("weights_sha256")}
        if len(digests) > 1:
            raise ValueError(f"runs were measured against different {kind} weights: {sorted(digests)}")
        merged[kind] = {**entries[0], "weights_sha256": next(iter(digests), None)}
    return merged


class ReportFiles(BaseModel):
    """What a report wrote: its data, its markdown and the figures the markdown shows."""

    data: Path
    markdown: Path
    figures: list[Path] = Field(default_factory=list)


def save_figure(fig: Any, path: str | Path, dpi: int = 110) -> Path:
    """A matplotlib figure as a PNG, written atomically like every other report file."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return write_bytes_atomic(path, buffer.getvalue())


def write_report_files(
    base: str | Path, payload: dict[str, Any], markdown_text: str, figures: Sequence[Path] = ()
) -> ReportFiles:
    """The one writer of every report: `<base>.json` then `<base>.md` (its figures linked at the end), each
    written atomically, so a reader never sees half a report and the markdown never runs ahead of its data."""
    base = Path(base)
    base.parent.mkdir(parents=True, exist_ok=True)
    data = write_json_atomic(base.with_name(base.name + ".json"), payload)
    if figures:
        markdown_text += "\n" + "\n".join(f"![{p.stem}]({p.name})" for p in figures) + "\n"
    md = write_text_atomic(base.with_name(base.name + ".md"), markdown_text)
    return ReportFiles(data=data, markdown=md, figures=list(figures))


def write_records(base: str | Path, records: Sequence[dict[str, Any]]) -> Path:
    """A report's per-item records as `<base>.items.jsonl.gz` (one JSON object per line, no timestamp in the
    gzip header): committed with the report, so every number in it can be recomputed."""
    base = Path(base)
    lines = "".join(json.dumps(r, sort_keys=True, default=str) + "\n" for r in records).encode("utf-8")
    return write_bytes_atomic(base.with_name(base.name + ".items.jsonl.gz"), gzip.compress(lines, mtime=0))


def read_records(path: str | Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in gzip.decompress(Path(path).read_bytes()).decode("utf-8").splitlines()]


def figure_or_none(plot: Any, results: dict[str, Any], path: Path) -> Path | None:
    """A figure that cannot be drawn costs the report its picture, never its data."""
    try:
        return plot(results, path)
    except Exception:
        log.warning("could not draw %s", path.name, exc_info=True)
        return None


def write_report(
    results: dict[str, Any], out_dir: str | Path, name: str, stamp: dict[str, Any], notes: list[str] | None = None
) -> dict[str, Path]:
    """Write `<name>.json`, `<name>.md`, `<name>_scatter.png`, `<name>_bars.png` under `out_dir`, with
    the run's `stamp` (`run_stamp`, taken when the run started)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = {**results, **stamp, "notes": [*results.get("notes", []), *(notes or [])]}
    scatter = figure_or_none(plot_scatter, results, out / f"{name}_scatter.png")
    bars = figure_or_none(plot_bars, results, out / f"{name}_bars.png")
    plots = [p for p in (scatter, bars) if p is not None]
    files = write_report_files(out / name, results, markdown(results), plots)
    return {"json": files.data, "markdown": files.markdown, **{p.stem.rsplit("_", 1)[-1]: p for p in plots}}
