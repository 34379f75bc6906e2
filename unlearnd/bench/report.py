"""The latency report: targets, cells, the detector sweep and the profile, as JSON, markdown and a plot."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

from unlearnd.config import DEFAULT_MODEL
from unlearnd.evaluation.report import figure_or_none, save_figure, stamp_lines, write_report_files

TARGETS = [
    (
        "non-flagged e2e p50 ratio, c=1",
        lambda r: r["cells"].get("none@1", {}).get("ratio", {}).get("e2e_p50"),
        "<=",
        1.03,
    ),
    (
        "non-flagged e2e p50 ratio, c=16",
        lambda r: r["cells"].get("none@16", {}).get("ratio", {}).get("e2e_p50"),
        "<=",
        1.03,
    ),
    (
        "added TTFT p50 (ms), non-flagged c=1",
        lambda r: (
            1000 * (r["cells"]["none@1"]["unlearnd"]["ttft_p50"] - r["cells"]["none@1"]["vllm"]["ttft_p50"])
            if "none@1" in r["cells"]
            else None
        ),
        "<=",
        5.0,
    ),
    ("ECO route e2e p50 ratio, c=1", lambda r: r["cells"].get("eco@1", {}).get("ratio", {}).get("e2e_p50"), "<=", 1.10),
    (
        "throughput ratio, non-flagged c=16",
        lambda r: r["cells"].get("none@16", {}).get("ratio", {}).get("tok_throughput"),
        ">=",
        0.95,
    ),
    (
        "classifier cost 100 vs 1 requests",
        lambda r: (
            (r["sweep"][-1]["classifier_ms_per_prompt"] / r["sweep"][0]["classifier_ms_per_prompt"])
            if len(r["sweep"]) > 1 and r["sweep"][0]["classifier_ms_per_prompt"]
            else None
        ),
        "<=",
        1.2,
    ),
]


def _fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}"


def write_report(result: dict, out: Path, stamp: dict) -> Path:
    """`out`.json / .md / .png, with the run's stamp (`evaluation.report.run_stamp`, taken at its start)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {**result, **stamp}
    plot = figure_or_none(plot_latency, result, out.with_name(out.stem + ".png"))
    return write_report_files(out.with_suffix(""), result, latency_markdown(result, plot)).markdown


def plot_latency(result: dict, plot: Path) -> Path:
    """Latency CDFs per route at the lowest concurrency, and every cell's ratios."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = result["cells"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for cell in cells.values():
        if cell["concurrency"] != min(c["concurrency"] for c in cells.values()):
            continue
        for name, style in (("e2e_unlearnd", "-"), ("e2e_vllm", "--")):
            values = np.sort(cell[name])
            if len(values):
                axes[0].plot(
                    values,
                    np.arange(1, len(values) + 1) / len(values),
                    style,
                    label=f"{cell['route']} ({'unlearnd' if name == 'e2e_unlearnd' else 'vLLM'})",
                )
    axes[0].set_xlabel("end-to-end latency (s)")
    axes[0].set_ylabel("fraction of requests")
    axes[0].set_title("Latency CDF per route, lowest concurrency")
    axes[0].legend(fontsize=7)
    keys = list(cells)
    x = np.arange(len(keys))
    for offset, metric in ((-0.2, "e2e_p50"), (0.0, "ttft_p50"), (0.2, "tok_throughput")):
        axes[1].bar(x + offset, [cells[k]["ratio"].get(metric, np.nan) for k in keys], width=0.2, label=metric)
    axes[1].axhline(1.0, color="k", linewidth=0.8)
    axes[1].set_xticks(x, keys, rotation=60, fontsize=7)
    axes[1].set_ylabel("unlearnd / plain vLLM")
    axes[1].set_title("Ratios (same run)")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, plot, dpi=110)
    plt.close(fig)
    return plot


def _ci(interval: list[float] | None) -> str:
    return f" [{interval[0]:.3f}, {interval[1]:.3f}]" if interval else ""


def _load_line(load: dict | None) -> str:
    if not load:
        return "Machine load: not recorded."
    before, after = load["before_cells"], load["after_cells"]
    return (
        f"Load average (1/5/15 min) before the cells {before[0]:.2f}/{before[1]:.2f}/{before[2]:.2f}, after "
        f"{after[0]:.2f}/{after[1]:.2f}/{after[2]:.2f}, on {os.cpu_count()} cores (both servers run here)."
    )


def latency_markdown(result: dict, plot: Path | None) -> str:
    """Targets, cells, the detector sweep and the profile, as markdown."""
    cells = result["cells"]
    cfg = result["config"]
    lines = [
        "# Latency: unlearnd vs plain vLLM",
        "",
        *stamp_lines(result),
        f"Python {sys.version.split()[0]}; model {DEFAULT_MODEL} (vLLM, enforce-eager) on both servers; output length "
        f"{result['config']['output_len']} tokens (ignore_eos), greedy.",
        "",
        "Each cell alternates the two servers in rounds; ratios are unlearnd / plain vLLM from the same run.",
        "",
        f"Forget requests active during the cells: {result.get('active_during_cells', 'n/a')}; unlearnd's "
        f"output-guard release rule: `{cfg.get('output_guard', 'fixed')}`; streamed requests of "
        f"{cfg.get('output_len')} tokens, concurrency {', '.join(map(str, cfg.get('concurrency', ())))}, "
        f"{cfg.get('requests')} requests per server per cell in {cfg.get('rounds')} rounds. "
        + _load_line(result.get("load_average")),
        "",
        "## Targets",
        "",
        "| target | measured | goal | met |",
        "|---|---|---|---|",
    ]
    for name, getter, op, goal in TARGETS:
        try:
            value = getter(result)
        except (KeyError, IndexError, ZeroDivisionError):
            value = None
        met = (
            "n/a"
            if value is None or np.isnan(value)
            else ("yes" if (value <= goal if op == "<=" else value >= goal) else "**no**")
        )
        lines.append(f"| {name} | {_fmt(value)} | {op} {goal} | {met} |")
    lines += [
        "",
        "## Cells",
        "",
        "| route | conc. (reached) | e2e p50 (s) ours / vLLM | ratio [95% CI] | e2e p99 ratio | TTFT p50 (ms) ours / "
        "vLLM | TTFT ratio [95% CI] | TPOT p50 ratio | tok/s ours / vLLM | errors |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for cell in cells.values():
        o, v, r = cell["unlearnd"], cell["vllm"], cell["ratio"]
        ci = cell.get("ratio_ci95") or {}
        lines.append(
            f"| {cell['route']} | {cell['concurrency']} ({cell.get('concurrency_reached', 'n/a')}) | "
            f"{_fmt(o['e2e_p50'])} / {_fmt(v['e2e_p50'])} | {_fmt(r['e2e_p50'])}{_ci(ci.get('e2e_p50'))} | "
            f"{_fmt(r['e2e_p99'])} | {_fmt(1000 * o['ttft_p50'], 1)} / {_fmt(1000 * v['ttft_p50'], 1)} | "
            f"{_fmt(r['ttft_p50'])}{_ci(ci.get('ttft_p50'))} | {_fmt(r['tpot_p50'])} | "
            f"{_fmt(o['tok_throughput'], 1)} / {_fmt(v['tok_throughput'], 1)} | {o['errors']}/{v['errors']} |"
        )
    lines += [
        "",
        "## Detector cost vs active forget requests",
        "",
        "| active requests | detector ms / prompt | non-flagged e2e p50 (s) |",
        "|---|---|---|",
    ]
    for row in result["sweep"]:
        lines.append(f"| {row['active_requests']} | {_fmt(row['classifier_ms_per_prompt'])} | {_fmt(row['e2e_p50'])} |")
    profile = result.get("profile")
    if profile:
        lines += [
            "",
            "## Where the unlearnd front-end's time goes",
            "",
            f"py-spy samples of the unlearnd server process (HTTP, detector, routing, vLLM's front-end; "
            f"the model runs in vLLM's engine-core process) while it served the non-flagged cells "
            f"({profile['cells']}): {profile['samples']} busy samples"
            + (
                f" at {profile['rate_hz']} Hz = {profile['busy_s']:.1f} s of busy time in the process"
                if "busy_s" in profile
                else ""
            )
            + f". Raw stacks: `{profile['raw']}`.",
            "",
            "| component | share of busy samples |",
            "|---|---|",
        ]
        lines += [f"| {name} | {100 * share:.1f}% |" for name, share in profile["components"].items()]
        lines += ["", "| hottest frame | share |", "|---|---|"]
        lines += [f"| `{row['frame']}` | {100 * row['share']:.1f}% |" for row in profile["top_frames"]]
    lines += ["", f"![latency]({plot.name})" if plot else "(the plot could not be drawn: see the log)", ""]
    if result.get("notes"):
        lines += ["## Notes", "", *result["notes"], ""]
    return "\n".join(lines)
