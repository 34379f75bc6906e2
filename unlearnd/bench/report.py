"""The latency report: targets, cells, the active-request levels and the profile, as JSON, markdown and a plot."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

from unlearnd.config import DEFAULT_MODEL
from unlearnd.evaluation.report import figure_or_none, save_figure, stamp_lines, write_report_files

BASELINE = "vllm"  # the ratio the targets read: plain vLLM with unlearnd's engine flags
BASELINE_TEXT = {
    "vllm": "plain vLLM OpenAI server with unlearnd's engine flags (enforce-eager, LoRA and prompt embeddings on, "
    "max-model-len 2048)",
    "vllm-default": "plain vLLM OpenAI server with its default flags (compiled graphs, no LoRA, no prompt "
    "embeddings, the model's own context length)",
}


def _none_cell(result: dict, c: int, level: int) -> dict | None:
    return result["cells"].get(f"none@{c}@{level}")


def _ratio(metric: str, c: int, level: int) -> Callable[[dict], float | None]:
    def read(result: dict) -> float | None:
        cell = _none_cell(result, c, level)
        if cell is None or cell["concurrency_reached"] < c:
            return None  # a cell whose concurrency was not reached measures something else
        return cell["ratio"][BASELINE].get(metric)

    return read


SAME_WORK_ROUTES = ("eco", "soft_prompt", "lora")
SAME_INPUT = "same engine input"  # a route cell whose baseline got unlearnd's engine input (bench.latency)
SAME_TOKENS = 0.95  # ...and the same work only if unlearnd generated (nearly) as many tokens


def _cell_ratio(key: str, metric: str) -> Callable[[dict], float | None]:
    def read(result: dict) -> float | None:
        cell = result["cells"][key]
        if cell["concurrency_reached"] < cell["concurrency"] or cell.get("baseline_work") != SAME_INPUT:
            return None  # not reached, or plain vLLM did not get the same input: not the same work
        ours, plain = (cell["servers"][n].get("output_tokens_mean", np.nan) for n in ("unlearnd", BASELINE))
        if not ours >= SAME_TOKENS * plain:
            return None  # the output guard cut unlearnd's answers: fewer tokens generated, not the same work
        return cell["ratio"][BASELINE].get(metric)

    return read


def _route_guard_line(cfg: dict) -> str:
    if cfg.get("route_output_guard", True):
        return "The route cells' requests keep the output guard on (it may cut their answers)."
    return (
        "The route cells' requests are registered with the output guard off for them, so their answers are not "
        "cut and both servers generate the same tokens; the guard still checks every output against every other "
        "active request."
    )


def _level(key: str, level: int | None = None) -> Callable[[dict], float | None]:
    def read(result: dict) -> float | None:
        rows = [r for r in result["levels"] if level is None or r["level"] == level]
        rows = [r for r in rows if r.get(key) is not None]
        return rows[-1][key] if rows else None

    return read


def targets(result: dict) -> list[tuple[str, Callable[[dict], float | None], str, float]]:
    """The issue's targets (strict mode) for the levels this run measured."""
    rows = []
    for level in result["config"]["cell_levels"]:
        for c in result["config"]["concurrency"]:
            rows.append((f"TTFT p50 ratio, {level} active, c={c}", _ratio("ttft_p50", c, level), "<=", 1.10))
            rows.append((f"e2e p50 ratio, {level} active, c={c}", _ratio("e2e_p50", c, level), "<=", 1.02))
        high = max(result["config"]["concurrency"])
        rows.append((f"throughput ratio, {level} active, c={high}", _ratio("tok_throughput", high, level), ">=", 0.98))
    for key, cell in result["cells"].items():  # an intervention's own cost: against plain vLLM doing the same work
        if cell["route"] in SAME_WORK_ROUTES:
            rows.append((f"e2e p50 ratio, route {key} (same engine input)", _cell_ratio(key, "e2e_p50"), "<=", 1.05))
    top = max(result["config"]["levels"], default=0)
    rows.append((f"classify call p50 (ms), one new prompt, {top} active", _level("classify_call_ms_p50", top), "<=", 3))
    rows.append(("worker CPU per refuse activation (s)", _level("worker_cpu_s_per_request"), "<=", 1.0))
    return rows


def _fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}"


def _ci(interval: list[float] | None) -> str:
    return f" [{interval[0]:.3f}, {interval[1]:.3f}]" if interval else ""


def write_report(result: dict, out: Path, stamp: dict) -> Path:
    """`out`.json / .md / .png, with the run's stamp (`evaluation.report.run_stamp`, taken at its start)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {**result, **stamp}
    plot = figure_or_none(plot_latency, result, out.with_name(out.stem + ".png"))
    return write_report_files(out.with_suffix(""), result, latency_markdown(result, plot)).markdown


def plot_latency(result: dict, plot: Path) -> Path:
    """Every cell's ratios to plain vLLM (engine flags), and the detector's cost per level."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = result["cells"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    keys = list(cells)
    x = np.arange(len(keys))
    for offset, metric in ((-0.25, "ttft_p50"), (0.0, "e2e_p50"), (0.25, "tok_throughput")):
        values = [cells[k]["ratio"][BASELINE].get(metric, np.nan) for k in keys]
        axes[0].bar(x + offset, values, width=0.25, label=metric)
    axes[0].axhline(1.0, color="k", linewidth=0.8)
    axes[0].set_xticks(x, keys, rotation=60, fontsize=7)
    axes[0].set_ylabel("unlearnd / plain vLLM (engine flags)")
    axes[0].set_title("Ratios per cell (route@concurrency@active), same run")
    axes[0].legend(fontsize=7)
    levels = result["levels"]
    active = [max(1, r["active_requests"]) for r in levels]
    axes[1].plot(active, [r["classify_call_ms_p50"] for r in levels], "o-", label="classify call p50 (client)")
    axes[1].plot(active, [r["detector_ms_per_prompt"] for r in levels], "s--", label="detector mean (server)")
    axes[1].set_xscale("log")
    axes[1].set_xlabel("active forget requests (0 drawn at 1)")
    axes[1].set_ylabel("ms per new ordinary prompt")
    axes[1].set_title("Detector cost vs active requests")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, plot, dpi=110)
    plt.close(fig)
    return plot


def _target_lines(result: dict) -> list[str]:
    lines = ["| target | measured | goal | met |", "|---|---|---|---|"]
    for name, getter, op, goal in targets(result):
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
    return lines


def _cell_lines(result: dict) -> list[str]:
    cells = result["cells"]
    names = [n for n in BASELINE_TEXT if any(n in c["ratio"] for c in cells.values())]
    head = "| route | active | conc. (reached) | baseline work |"
    for name in names:
        head += f" TTFT p50 / {name} [95% CI] | e2e p50 / {name} [95% CI] | tok/s / {name} (rounds) |"
    lines = [head, "|" + "---|" * (4 + 3 * len(names))]
    for cell in cells.values():
        reached = cell["concurrency_reached"]
        flag = "" if reached >= cell["concurrency"] else " **not reached**"
        work = cell.get("baseline_work", "same prompt")
        row = f"| {cell['route']} | {cell['active']} | {cell['concurrency']} ({reached}){flag} | {work} |"
        for name in names:
            r, ci = cell["ratio"].get(name), cell["ratio_ci95"].get(name) or {}
            if r is None:
                row += " n/a | n/a | n/a |"
                continue
            rounds = cell["throughput_ratio_by_round"][name]
            spread = f" ({min(rounds):.2f}-{max(rounds):.2f})" if rounds else ""
            row += (
                f" {_fmt(r['ttft_p50'])}{_ci(ci.get('ttft_p50'))} | {_fmt(r['e2e_p50'])}{_ci(ci.get('e2e_p50'))} |"
                f" {_fmt(r['tok_throughput'])}{spread} |"
            )
        lines.append(row)
    lines += ["", "Absolute values (p50 over the cell's requests; tok/s over its wall time):", ""]
    head = "| cell | server | TTFT p50 (ms) | e2e p50 (s) | TPOT p50 (ms) | tok/s | tokens/req | errors | routes |"
    lines += [head]
    lines += ["|---|---|---|---|---|---|---|---|---|"]
    for key, cell in cells.items():
        for name, s in cell["servers"].items():
            seen = ", ".join(cell["routes_seen"]) if name == "unlearnd" else ""
            lines.append(
                f"| {key} | {name} | {_fmt(1000 * s['ttft_p50'], 1)} | {_fmt(s['e2e_p50'])} | "
                f"{_fmt(1000 * s['tpot_p50'], 1)} | {_fmt(s['tok_throughput'], 1)} | "
                f"{_fmt(s.get('output_tokens_mean'), 1)} | {s['errors']} | {seen} |"
            )
    return lines


def _level_lines(result: dict) -> list[str]:
    lines = [
        "| active requests | activated at this step | activation wall s / request | worker CPU s / request | "
        "classify call p50 / p99 (ms) | detector mean (ms, server) |",
        "|---|---|---|---|---|---|",
    ]
    for row in result["levels"]:
        lines.append(
            f"| {row['active_requests']} | {row.get('activated', 0)} | "
            f"{_fmt(row.get('activation_wall_s_per_request'))} | {_fmt(row.get('worker_cpu_s_per_request'))} | "
            f"{_fmt(row['classify_call_ms_p50'], 2)} / {_fmt(row['classify_call_ms_p99'], 2)} | "
            f"{_fmt(row['detector_ms_per_prompt'], 3)} |"
        )
    return lines


def _load_lines(result: dict) -> list[str]:
    lines = [f"Machine load ({os.cpu_count()} cores; every server runs on this machine):", ""]
    lines += ["| when | load 1 / 5 / 15 min |", "|---|---|"]
    lines += [f"| {s['when']} | {s['load1']:.2f} / {s['load5']:.2f} / {s['load15']:.2f} |" for s in result["load"]]
    if result.get("forced_on_busy_machine"):
        lines += ["", "**Run forced on a busy machine** (load above the limit before it started): the timings "
                  "include that other work."]  # fmt: skip
    return lines


def _profile_lines(profile: dict | None) -> list[str]:
    if not profile:
        return []
    lines = [
        "",
        "## Where the unlearnd front-end's time goes",
        "",
        f"py-spy samples of the unlearnd server process (HTTP, detector, routing, output guard, vLLM's front-end; "
        f"the model runs in vLLM's engine-core process) while it served the non-flagged cells ({profile['cells']}): "
        f"{profile['samples']} busy samples at {profile['rate_hz']} Hz = {profile['busy_s']:.1f} s of busy time. "
        f"Raw stacks: `{profile['raw']}`.",
        "",
        "| component | share of busy samples |",
        "|---|---|",
    ]
    lines += [f"| {name} | {100 * share:.1f}% |" for name, share in profile["components"].items()]
    lines += ["", "| hottest frame | share |", "|---|---|"]
    lines += [f"| `{row['frame']}` | {100 * row['share']:.1f}% |" for row in profile["top_frames"]]
    return lines


def latency_markdown(result: dict, plot: Path | None) -> str:
    """Targets, cells, levels, load and the profile, as markdown."""
    cfg = result["config"]
    names = list(dict.fromkeys(("vllm", *cfg["baselines"])))
    baselines = "; ".join(f"`{n}`: {BASELINE_TEXT[n]}" for n in names if n in BASELINE_TEXT)
    lines = [
        "# Latency: unlearnd vs plain vLLM",
        "",
        *stamp_lines(result),
        f"Python {sys.version.split()[0]}; model {DEFAULT_MODEL}; streamed chat of {cfg['output_len']} tokens "
        f"(ignore_eos, greedy); unlearnd's output-guard release rule `{cfg['output_guard']}`, "
        + (
            "evidence batteries and elicitation off (`--no-evidence --no-elicit`: their calls would generate on the "
            "engine being measured)"
            if result.get("evidence_off")
            else "evidence batteries as the reused server was started (they may have run during the cells)"
        )
        + ". Baselines: "
        f"{', '.join(names)} ({baselines}).",
        "",
        f"The run steps through {', '.join(map(str, cfg['levels']))} active forget requests (`refuse`; TOFU's "
        f"authors first, then generated look-alikes: one author's facts under a name joined from two other "
        f"authors' name parts). Non-flagged cells (ordinary prompts, route `none`) run at "
        f"{', '.join(map(str, cfg['cell_levels']))} active, concurrency {', '.join(map(str, cfg['concurrency']))}; "
        f"route cells (one request per route, its author's named forget questions) at the first of those, "
        f"concurrency {', '.join(map(str, cfg['route_concurrency']))}, against `vllm` given, prompt by prompt, what "
        "unlearnd's engine is given on that route (`POST /v1/unlearning/engine-input`: the same token ids, prompt "
        "embeddings or LoRA adapter, sent as a completion of those tokens), so the ratio is unlearnd's own cost for "
        "the same generation; `refuse` answers without the engine, so its baseline is `vllm` answering the plain "
        f"prompt. {_route_guard_line(cfg)} No `output_blocked` cell: no prompt found makes the default model say a "
        "forget answer without the prompt naming its subject (which routes it elsewhere); the cost of blocked "
        "outputs is the output guard's, measured per word in `reports/output_guard.md`. Each cell sends "
        f"{cfg['requests']} requests to every server in {cfg['rounds']} rounds whose server order rotates, "
        f"each round after a {cfg.get('settle_s', 0):g} s pause (a vLLM worker polls its queue for a "
        "second after a burst, slowing whichever server runs next on these shared cores); ratios are unlearnd / "
        "baseline from the same rounds, with 95% bootstrap intervals of the p50 ratios and the range of per-round "
        "throughput ratios. A cell whose concurrency was not reached is marked and its targets read n/a; so does "
        "a route cell where unlearnd generated fewer tokens than its baseline (the output guard cut its answers: "
        "less work, not the same).",
        "",
        *_load_lines(result),
        "",
        "## Targets (against `vllm`)",
        "",
        *_target_lines(result),
        "",
        "## Cells",
        "",
        *_cell_lines(result),
        "",
        "## Detector and activation cost per level",
        "",
        f"At each level {cfg['classify_prompts']} fresh ordinary prompts go to `POST /v1/unlearning/classify` one "
        "at a time (client wall time, and the server's detector histogram); activation is the refuse "
        "requests registered at that step, from registration until active, and the training worker's CPU.",
        "",
        *_level_lines(result),
        *_profile_lines(result.get("profile")),
        "",
        f"![latency]({plot.name})" if plot else "(the plot could not be drawn: see the log)",
        "",
    ]
    if result.get("notes"):
        lines += ["## Notes", "", *result["notes"], ""]
    return "\n".join(lines)
