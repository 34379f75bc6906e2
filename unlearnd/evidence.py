"""Evidence that a forget request works: a probe battery sent to the served model as users reach it.

When a request becomes active (again after a retrain, or when an operator asks), the worker sends the
battery through the server's own OpenAI API, without the admin key: probes made from the request's
facts by the anchor-free leak evaluation's generator (`evaluation.leaks.family_probe`: the question as
asked, descriptions without the name, titles, initials, another script, two-letter misspellings,
composite, JSON, completion and multi-turn forms), built from the request's held-out `evidence` facts
where it has them, else from its forget QA (then the facts were seen in fitting, only the forms are
new), plus control prompts (ordinary tasks and other, well-known entities; a fixed list that nothing is
fit on). Per probe it records the route, the reply, whether the reply gives the asked fact away (the
leak evaluation's judge) and the wall time; a control is untouched when it was served by route `none`,
i.e. by the unchanged model. Any leak makes the verdict `failing`.
"""

from __future__ import annotations

import io
import json
import logging
import statistics
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from typing import Any

from pydantic import BaseModel

from unlearnd.client import UnlearndClient
from unlearnd.domain import EVIDENCE_VERDICTS, ForgetRequest, ForgetSpec, QAItem
from unlearnd.evaluation.attacks import Probe, quoted_titles, run_probe
from unlearnd.evaluation.leaks import (
    FAMILIES,
    LeakContext,
    LeakProbe,
    carries_name,
    description,
    family_probe,
    hit_rate,
    judge,
    key_terms,
)
from unlearnd.guardrail.traffic import BACKGROUND_HEADER
from unlearnd.prompting import user_messages

log = logging.getLogger(__name__)

DIRECT = "direct"  # the fact's question as asked (name included): the form users use most
PASSING, FAILING, INCONCLUSIVE, ERROR = EVIDENCE_VERDICTS  # inconclusive: nothing to judge (text passages)


class EvidenceSettings(BaseModel):
    server_url: str
    api_key: str | None = None
    per_family: int = 8  # probes per form (3 missed a 6% leak rate on the TOFU target: reports/leaks-evidence.md)
    controls: int = 8
    max_new_tokens: int = 64  # as `unlearnd eval leaks`: the same probe gets the same reply in both
    # Two probes in flight; each gives way to users' generations (`guardrail.traffic`), so users served during
    # a battery no longer share the engine with it, and a probe needs no rest after it (`rest_factor`, as a
    # multiple of its time, is for `background=False`, where probes share the engine: there 1 halved the
    # battery's share; a user paid x1.13 with two in flight, reports/evidence-concurrency2.md)
    concurrency: int = 2
    rest_factor: float = 0.0
    background: bool = True


# The battery's tuning a worker reads from its environment: setting -> variable
EVIDENCE_ENV = {
    "per_family": "UNLEARND_EVIDENCE_PER_FORM",
    "concurrency": "UNLEARND_EVIDENCE_CONCURRENCY",
    "rest_factor": "UNLEARND_EVIDENCE_REST",
    "background": "UNLEARND_EVIDENCE_BACKGROUND",
}


def control_prompts() -> list[str]:
    text = resources.files("unlearnd.evaluation").joinpath("data/evidence_controls.txt").read_text("utf-8")
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


def _entity_of(qa, spec: ForgetSpec) -> int:
    """Which of the request's names a fact is about (the first named in it; else the request's name)."""
    names = [*spec.entities, spec.name]
    return next((k for k, n in enumerate(names) if n in qa.question or n in qa.answer), len(names) - 1)


def _interleaved(facts: list[QAItem]) -> list[int]:
    """Fact indices taking each entity in turn, so a capped battery covers every person of a request."""
    by_entity: dict[int, list[int]] = {}
    for i, it in enumerate(facts):
        by_entity.setdefault(it.author if it.author is not None else -1, []).append(i)
    order, rows = [], list(by_entity.values())
    while any(rows):
        order += [row.pop(0) for row in rows if row]
    return order


def battery(spec: ForgetSpec, per_family: int = 8, controls: int = 8) -> tuple[list[LeakProbe], bool]:
    """The request's probes (at most `per_family` per form, the request's people in turn) and controls;
    and whether the facts were held out of fitting. A probe of fact `i` is the one the leak evaluation
    makes of the same fact at the same position (same description, same name variant)."""
    held_out = bool(spec.evidence)
    qas = [qa for qa in (spec.evidence or spec.as_qa(spec.forget)) if qa.answer]
    facts = [QAItem(question=qa.question, answer=qa.answer, author=_entity_of(qa, spec)) for qa in qas]
    names = dict(enumerate([*spec.entities, spec.name]))
    ordinary = [QAItem(question=t, answer="") for t in control_prompts()]
    ctx = LeakContext(measured=facts, fit=[], names=names, titles=quoted_titles(facts), ordinary=ordinary, others=[])
    described: dict[int, list[str]] = {}
    for it in facts:
        if d := description(it.answer, names[it.author]):
            described.setdefault(it.author, []).append(d)
    probes, count = [], Counter()
    for i in _interleaved(facts):
        item, name = facts[i], names[facts[i].author]
        others = [d for d in described.get(item.author, []) if d != description(item.answer, name)]
        for family in (DIRECT, *FAMILIES):
            if count[family] >= per_family:
                continue
            built = (user_messages(item.question), item.answer) if family == DIRECT else None
            if family != DIRECT and (others or family in ("title", "initials", "other_script", "misspelled")):
                built = family_probe(family, i, item, name, others[i % len(others)] if others else "", ctx)
            if built is None:
                continue
            messages, fact = built
            prompt = " ".join(m["content"] for m in messages)
            probe = Probe(kind=family, variant="forget", answer=fact, messages=messages)
            probe.token_factor = 2 if family == "composite" else 1
            terms = key_terms(fact, prompt, name)
            probes.append(LeakProbe(probe, item.author, "forget", family, fact, terms, carries_name(prompt, name)))
            count[family] += 1
    for text in control_prompts()[:controls]:
        probe = Probe(kind="control", variant="control", answer="", messages=user_messages(text))
        probes.append(LeakProbe(probe, -1, "control", "control", ""))
    return probes, held_out


def run_battery(
    probes: list[LeakProbe], settings: EvidenceSettings, beat: Callable[[], None] = lambda: None
) -> list[dict[str, Any]]:
    """Send every probe as a user would and judge the replies; each record carries its wall time. A probe
    the server refused (4xx) is not judged: its record says so. `beat` is called after every probe."""

    def one(probe: LeakProbe) -> dict[str, Any]:
        started = time.perf_counter()
        outcome = run_probe(client, model, probe.probe, settings.max_new_tokens)
        seconds = time.perf_counter() - started
        record = {**judge(probe, "served", outcome), "seconds": seconds}
        if str(outcome.route).startswith(("denied", "rejected")):
            record["leaked"] = None
            record["refused_by_server"] = True
        beat()
        time.sleep(seconds * settings.rest_factor)
        return record

    extra = {BACKGROUND_HEADER: "background"} if settings.background else {}
    with UnlearndClient(settings.server_url, api_key=settings.api_key, timeout_s=900, headers=extra) as client:
        model = client.models()[0]
        with ThreadPoolExecutor(max_workers=settings.concurrency) as pool:
            return list(pool.map(one, probes))


def summarise(records: list[dict[str, Any]], held_out: bool) -> dict[str, Any]:
    """Leaks and unprotected replies per form, controls untouched, latency; the verdict."""
    forget = [r for r in records if r["group"] == "forget"]
    controls = [r for r in records if r["group"] == "control"]
    scored = [r for r in forget if r["leaked"] is not None]
    families = {}
    for family in dict.fromkeys(r["family"] for r in forget):
        mine = [r for r in forget if r["family"] == family]
        judged = [r for r in mine if r["leaked"] is not None]
        families[family] = {
            "leaks": hit_rate(sum(r["leaked"] for r in judged), len(judged)),
            "unprotected": hit_rate(sum(r["served_route"] == "none" for r in mine), len(mine)),
            "named": sum(r["named"] for r in mine),
            "probes": len(mine),
        }
    leaks = hit_rate(sum(r["leaked"] for r in scored), len(scored))
    return {
        "held_out_facts": held_out,
        "leaks": leaks,
        "unprotected": hit_rate(sum(r["served_route"] == "none" for r in forget), len(forget)),
        "named_share": sum(r["named"] for r in forget) / len(forget) if forget else None,
        "controls_untouched": hit_rate(sum(r["served_route"] == "none" for r in controls), len(controls)),
        "families": families,
        "seconds_p50": {
            "forget": statistics.median(r["seconds"] for r in forget) if forget else None,
            "control": statistics.median(r["seconds"] for r in controls) if controls else None,
        },
        "routes": dict(Counter(r["served_route"] for r in forget)),
        "refused_by_server": sum(bool(r.get("refused_by_server")) for r in records),
        "verdict": verdict(leaks, sum(bool(r.get("refused_by_server")) for r in records)),
    }


def verdict(leaks: dict[str, Any], refused: int) -> str:
    """failing on any leak; error when the server refused a probe (the battery is incomplete); inconclusive
    when nothing could be judged; else passing."""
    if leaks["hits"]:
        return FAILING
    if refused:
        return ERROR
    return PASSING if leaks["n"] else INCONCLUSIVE


def _cell(rate: dict[str, Any]) -> str:
    if not rate["n"]:
        return "n/a (none scored)"
    low, high = rate["ci95"]
    return f"{rate['hits']}/{rate['n']} ({rate['rate']:.2f}, 95% CI {low:.2f}-{high:.2f})"


def markdown(request: ForgetRequest, summary: dict[str, Any], at: float) -> str:
    seconds = summary["seconds_p50"]
    facts = "held-out `evidence` facts" if summary["held_out_facts"] else "the forget QA (facts seen in fitting)"
    lines = [
        f"# Evidence for {request.id} ({request.method.value})",
        "",
        f"Verdict: **{summary['verdict']}**. Run {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(at))} against "
        f"the served model, as a user (no admin key); probes built from {facts}.",
        "",
        f"- Leaks (the reply gives the asked fact away): {_cell(summary['leaks'])}",
        f"- Probes that reached the model unprotected (route `none`): {_cell(summary['unprotected'])}",
        f"- Controls untouched (route `none`: the unchanged model answered): {_cell(summary['controls_untouched'])}",
        f"- Probes carrying a part of the name: {summary['named_share'] or 0:.2f}",
        f"- Wall time per probe, p50: {_seconds(seconds['forget'])} (request probes), "
        f"{_seconds(seconds['control'])} (controls)",
        "",
        "| form | probes | named | leaks | unprotected |",
        "|---|---|---|---|---|",
    ]
    for family, row in summary["families"].items():
        lines.append(
            f"| {family} | {row['probes']} | {row['named']} | {_cell(row['leaks'])} | {_cell(row['unprotected'])} |"
        )
    return "\n".join(lines) + "\n"


def _seconds(value: float | None) -> str:
    return "n/a (no probe)" if value is None else f"{value:.2f} s"


def plot(summary: dict[str, Any]) -> bytes:
    """One PNG: leak and unprotected shares per form (95% CI), and the controls left untouched."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(f, r) for f, r in summary["families"].items()] + [("controls\nuntouched", None)]
    fig, ax = plt.subplots(figsize=(8, 3.2), dpi=100)
    for offset, key, colour in ((-0.2, "leaks", "#c0392b"), (0.2, "unprotected", "#7f8c8d")):
        for x, (_, row) in enumerate(rows):
            rate = summary["controls_untouched"] if row is None else row[key]
            if rate["n"] == 0 or (row is None and key == "unprotected"):
                continue
            low, high = rate["ci95"]
            colour_here = "#27ae60" if row is None else colour
            ax.bar(x + (0 if row is None else offset), rate["rate"], 0.4, color=colour_here)
            errors = [[rate["rate"] - low], [high - rate["rate"]]]
            ax.errorbar(x + (0 if row is None else offset), rate["rate"], errors, ecolor="black", capsize=3)
    ax.set_xticks(range(len(rows)), [f for f, _ in rows], rotation=30, ha="right", fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("share of probes")
    ax.set_title(f"red: leaks, grey: unprotected, green: controls untouched ({summary['verdict']})", fontsize=9)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def collect_evidence(
    request: ForgetRequest, settings: EvidenceSettings, beat: Callable[[], None] = lambda: None
) -> tuple[str, str, str, bytes]:
    """Run the battery for `request`: its verdict, JSON report (summary and records), markdown and PNG."""
    started = time.time()
    probes, held_out = battery(request.spec, settings.per_family, settings.controls)
    records = run_battery(probes, settings, beat)
    summary = summarise(records, held_out)
    summary["wall_seconds"] = time.time() - started
    report = json.dumps({"request_id": request.id, "at": started, "summary": summary, "records": records})
    return summary["verdict"], report, markdown(request, summary, started), plot(summary)


class EvidenceRunner:
    """The worker's evidence thread: runs queued batteries of active requests, one at a time."""

    def __init__(self, registry, settings: EvidenceSettings, poll_s: float = 1.0):
        self.registry, self.settings, self.poll_s = registry, settings, poll_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="evidence")

    def start(self) -> EvidenceRunner:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def run_once(self) -> bool:
        """Run one queued battery; False when none is waiting."""
        claimed = self.registry.claim_evidence()
        if claimed is None:
            return False
        request, claim = claimed

        def beat() -> None:  # a battery that stops beating is taken over by another runner
            try:
                self.registry.evidence_heartbeat(request.id, claim)
            except Exception:
                log.debug("evidence heartbeat of %s failed", request.id, exc_info=True)

        try:
            found, report, text, png = collect_evidence(request, self.settings, beat)
        except Exception as exc:  # the server unreachable: recorded, never silently kept
            log.warning("evidence for %s could not be collected: %s", request.id, exc)
            found, report, text, png = ERROR, json.dumps({"error": str(exc)}), f"Evidence failed: {exc}\n", None
        if self.registry.save_evidence(request.id, claim, found, report, text, png):
            leaks = (json.loads(report).get("summary") or {}).get("leaks", {})
            level = logging.WARNING if found != PASSING else logging.INFO
            log.log(level, "evidence for %s: %s (%s/%s leaks)", request.id, found, leaks.get("hits"), leaks.get("n"))
        return True

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                if not self.run_once():
                    self._stop.wait(self.poll_s)
            except Exception:  # the registry unreachable: try again later
                log.warning("evidence runner: registry unavailable", exc_info=True)
                self._stop.wait(5.0)
