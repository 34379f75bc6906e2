"""`unlearnd eval output-guard`: how often the output guard cuts answers it should not, and what it costs.

The guard is loaded with one request per TOFU forget author (their 20 QA pairs, named after them), as
`unlearnd eval detector` registers them, and then reads texts as if the model had generated them:

* should pass (false blocks): other TOFU authors' answers (retain90, the same biography templates about
  other people), real_authors and world_facts answers, and the default model's own answers to the
  ordinary chat prompts held out from fitting the detector;
* should block: the forget authors' answers as TOFU paraphrases them (the requests hold the originals),
  and the same paraphrases with every part of the author's name taken out ("the author"): what the
  guard does when the answer never names its subject.

Each text is streamed through the guard word by word, exactly as the server streams a generation, so
the cost per token is the guard's real cost. For the texts that should be blocked, what the stream had
already sent when the cut came is measured under the `strict` release rule (the default) and under the
`fixed` 96-character hold it replaced: characters, and whether they held an uncommon word of the
request (a name part or a rare word of a forget answer).
"""

from __future__ import annotations

import logging
import os
import re
import time
from typing import Any

import numpy as np
from pydantic import BaseModel

from unlearnd.data.tofu import TofuData
from unlearnd.detectors.encoder import EncoderConfig, get_encoder
from unlearnd.detectors.negatives import chat_prompts
from unlearnd.domain import QAExample
from unlearnd.engine.base import ChoiceDelta
from unlearnd.evaluation.detector import DetectorEvalOptions, build_probes, left_out_clause, setups, wilson
from unlearnd.evaluation.report import fmt, run_stamp, stamp_lines, write_records, write_report_files
from unlearnd.guardrail.output_guard import OutputGuard

log = logging.getLogger(__name__)

TARGET_FALSE_BLOCKS = 0.01


class OutputGuardEvalOptions(BaseModel):
    data: str
    split: str = "forget05"
    out: str = "reports/output_guard"
    chat_tokens: int = 64
    model: str | None = None  # the model whose ordinary answers are read (default: the embedded default)
    retain_authors: int = 10  # other authors registered as each request's retain set (not measured)
    meaning: bool = True  # the meaning check (sentence encoder), as the server runs it with the guard detector
    exclude_authors: list[int] = []  # forget authors left out entirely (those a design was looked at on)


def _stream(guard: OutputGuard, text: str) -> tuple[bool, int, float, str]:
    """(blocked, words, seconds in the guard, what was sent before a cut) for `text` streamed one word at
    a time."""
    import asyncio

    words = text.split(" ")
    blocked: list[Any] = []
    sent: list[str] = []

    async def deltas():
        for i, word in enumerate(words):
            last = i == len(words) - 1
            yield ChoiceDelta(
                index=0, text=(" " if i else "") + word, token_ids=[0], finish_reason="stop" if last else None
            )

    async def run() -> None:
        async for delta in guard.filter(deltas(), lambda t: [0], lambda b, i: blocked.append(b), n=1):
            if not blocked:
                sent.append(delta.text)

    start = time.perf_counter()
    asyncio.run(run())
    return bool(blocked), len(words), time.perf_counter() - start, "".join(sent) if blocked else ""


def without_name(text: str, names: list[str]) -> str:
    """`text` with every whole name and name part (of 3+ letters) replaced by "the author"."""
    parts = sorted({p for name in names for p in [name, *name.split()] if len(p) >= 3}, key=len, reverse=True)
    for part in parts:
        text = re.sub(rf"\b{re.escape(part)}(['’]s)?\b", "the author", text, flags=re.IGNORECASE)
    return text


def _protected_words(guard: OutputGuard) -> frozenset[str]:
    return frozenset().union(*(entry.protected for entry in guard.loaded.values()))


def sent_before_cut(guard: OutputGuard, outcomes: list[tuple[bool, int, float, str]]) -> dict[str, Any]:
    """Over the streams `guard` cut (`_stream` outcomes): the characters sent before the cut and the share
    whose sent part held an uncommon word of a request."""
    protected = _protected_words(guard)
    sent = [s for blocked, _, _, s in outcomes if blocked]
    with_word = [bool({re.sub(r"[^a-z0-9]", "", w.lower()) for w in s.split()} & protected) for s in sent]
    return {
        "blocked": len(sent),
        "mean_chars_sent": float(np.mean([len(s) for s in sent])) if sent else None,
        "with_uncommon_word": int(sum(with_word)),
        "with_uncommon_word_ci95": wilson(int(sum(with_word)), len(sent)),
    }


def leak_before_cut(guards: dict[str, OutputGuard], texts: list[str]) -> dict[str, dict[str, Any]]:
    """`sent_before_cut` per release rule, each guard streaming `texts` itself."""
    return {mode: sent_before_cut(guard, [_stream(guard, t) for t in texts]) for mode, guard in guards.items()}


def _ordinary_answers(model: str | None, prompts: list[str], tokens: int) -> list[str]:
    from unlearnd.evaluation.model_under_test import HFModelUnderTest
    from unlearnd.models import resolve_model
    from unlearnd.prompting import user_messages

    mut = HFModelUnderTest.from_dir(resolve_model(model), name="default")
    return mut.generate([user_messages(p) for p in prompts], tokens, desc="ordinary answers")


def run_output_guard_eval(opts: OutputGuardEvalOptions) -> dict[str, Any]:
    stamp = run_stamp()
    tofu = TofuData(opts.data, allow_hub=False)
    forget, _ = build_probes(
        tofu, opts.split, DetectorEvalOptions(data=opts.data, split=opts.split, exclude_authors=opts.exclude_authors)
    )
    forget_ids = {a.index for a in forget}
    # the retain set a user registers with each request (what must keep working): the first
    # `retain_authors` other authors; they calibrate the meaning check and are left out of what is measured
    others = sorted({i.author for i in tofu.split("retain90")} - forget_ids)
    calibration_ids = set(others[: opts.retain_authors])
    retain = [
        QAExample(question=i.question, answer=i.answer) for i in tofu.split("retain90") if i.author in calibration_ids
    ]
    encoder = get_encoder(EncoderConfig()) if opts.meaning else None
    guards = {
        mode: OutputGuard(encoder=(lambda: encoder) if encoder is not None else None, release=mode)
        for mode in ("strict", "fixed")
    }
    for request in setups(opts.split, forget)["one request per author"]:
        request.spec.retain = list(retain)
        for g in guards.values():
            g.load(request)
    guard = guards["strict"]
    names = {a.index: [a.name] for a in forget}
    paraphrased = [i for i in tofu.perturbed_for(opts.split) if i.paraphrased_answer and i.author in forget_ids]
    sets: dict[str, tuple[bool, list[str]]] = {
        "forget answers, paraphrased (TOFU)": (True, [i.paraphrased_answer for i in paraphrased]),
        "forget answers, paraphrased, name taken out": (
            True,
            [without_name(i.paraphrased_answer, names.get(i.author, [])) for i in paraphrased],
        ),
        "other authors' answers (retain90)": (
            False,
            [i.answer for i in tofu.split("retain90") if i.author not in forget_ids | calibration_ids],
        ),
        "real_authors answers": (False, [i.answer for i in tofu.split("real_authors")]),
        "world_facts answers": (False, [i.answer for i in tofu.split("world_facts")]),
        "default model's answers to ordinary chat": (
            False,
            _ordinary_answers(opts.model, list(chat_prompts("eval")), opts.chat_tokens),
        ),
    }
    all_names = [part for a in forget for part in a.name.split() if len(part) >= 3]
    load_before = os.getloadavg()[0]
    rows, examples, seconds, words, records = {}, {}, 0.0, 0, []
    for name, (should_block, texts) in sets.items():
        outcomes = [_stream(guard, t) for t in texts]
        blocked = [b for b, _, _, _ in outcomes]
        records += [
            {"set": name, "should_block": should_block, "text": t, "blocked": bool(b)}
            for t, b in zip(texts, blocked, strict=True)
        ]
        seconds += sum(s for _, _, s, _ in outcomes)
        words += sum(w for _, w, _, _ in outcomes)
        rows[name] = {
            "should_block": should_block,
            "n": len(texts),
            "blocked": int(sum(blocked)),
            "rate": float(np.mean(blocked)) if blocked else None,
            "ci95": wilson(int(sum(blocked)), len(texts)),
            "name_share": sum(any(n.lower() in t.lower() for n in all_names) for t in texts) / max(len(texts), 1),
        }
        if should_block:  # the strict guard's streams are `outcomes`: only the fixed one streams them again
            fixed = guards["fixed"]
            rows[name]["sent_before_cut"] = {
                "strict": sent_before_cut(guard, outcomes),
                "fixed": sent_before_cut(fixed, [_stream(fixed, t) for t in texts]),
            }
        examples[name] = [t for t, b in zip(texts, blocked, strict=True) if b != should_block][:20]
    negatives = [r for r in rows.values() if not r["should_block"]]
    false_blocks = sum(r["blocked"] for r in negatives) / max(sum(r["n"] for r in negatives), 1)
    report = {
        **stamp,
        "split": opts.split,
        "excluded_authors": opts.exclude_authors,
        "requests": len(guard.request_ids),
        "retain_authors": sorted(calibration_ids),
        "meaning_check": opts.meaning,
        "sets": rows,
        "false_block_rate": false_blocks,
        "us_per_word": 1e6 * seconds / max(words, 1),
        "load_average": [load_before, os.getloadavg()[0]],
        "errors": examples,
    }
    write_records(opts.out, records)
    write_report_files(opts.out, report, markdown(report))
    return report


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Output guard: false blocks and cost",
        "",
        *stamp_lines(report),
        f"The guard holds {report['requests']} requests, one per TOFU `{report['split']}` author"
        f"{left_out_clause(report)}, each registered with a retain set (the QA of TOFU authors "
        f"{report['retain_authors']}, which calibrates the meaning check and is left out of the texts below); "
        f"meaning check {'on' if report['meaning_check'] else 'off'}. "
        "Each text is streamed through the guard word by word as the server streams a generation.",
        "",
        "| texts | should be | n | blocked (95% CI) | share naming a forget author (any name part) |",
        "|---|---|---|---|---|",
    ]
    for name, row in report["sets"].items():
        ci = row["ci95"]
        span = f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""
        lines.append(
            f"| {name} | {'blocked' if row['should_block'] else 'passed'} | {row['n']} | {fmt(row['rate'])}{span} |"
            f" {fmt(row.get('name_share'))} |"
        )
    lines += ["", *sent_before_cut_lines(report)]
    met = report["false_block_rate"] <= TARGET_FALSE_BLOCKS
    lines += [
        "",
        f"False-block rate over every text that should pass: {fmt(report['false_block_rate'])} (goal <= "
        f"{TARGET_FALSE_BLOCKS}: {'met' if met else '**MISSED**'}). Guard cost: "
        f"{report['us_per_word']:.0f} µs per streamed word (one delta per word), in process.",
        "",
        "How far to trust these numbers: the retain90 answers are not fully independent of the guard's "
        "design. A first run with a plain rule (two shared distinctive 4-grams) blocked 6.2% of them, all on "
        "biography templates; the information rule (`guardrail/output_guard.py`) replaced it, with its constants "
        "set from word frequencies, not searched over on this set. The real_authors, world_facts and "
        "ordinary-chat sets played no part in it. TOFU gives several authors the same book titles and "
        "birth details; an answer about another author that names a forgotten author's title is blocked "
        "by design and counts as a false block here. The meaning check's constants (cosine floor 0.80, margin "
        "0.05 above the closest retain or ordinary text) were set before its first run here. The cost is the "
        "guard's own time per streamed word in this process (anchors, 4-grams, and the sentence encoder at "
        f"each sentence end; 1-minute load average {report['load_average'][0]:.1f} before and "
        f"{report['load_average'][1]:.1f} after the run, on {os.cpu_count()} cores); it adds to the engine's time "
        "per token.",
        "",
    ]
    for name, texts in report["errors"].items():
        if texts:
            lines += [f"Wrong calls on {name} (up to 20):", ""] + [f"- {t[:200]}" for t in texts] + [""]
    return "\n".join(lines).rstrip() + "\n"


def sent_before_cut_lines(report: dict[str, Any]) -> list[str]:
    """What a stream had sent when the cut came, per release rule, for the texts that should be blocked."""
    lines = [
        "## Sent before the cut (streams that were cut)",
        "",
        "| texts | release rule | cut | mean characters sent before the cut | sent part holds an uncommon "
        "word of the request (95% CI) |",
        "|---|---|---|---|---|",
    ]
    for name, row in report["sets"].items():
        for mode, leak in (row.get("sent_before_cut") or {}).items():
            ci = leak["with_uncommon_word_ci95"]
            share = leak["with_uncommon_word"] / leak["blocked"] if leak["blocked"] else None
            span = f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""
            lines.append(
                f"| {name} | {mode} | {leak['blocked']} | {fmt(leak['mean_chars_sent'], 1)} | {fmt(share)}{span} |"
            )
    return [
        *lines,
        "",
        "`strict` (the default) releases text once it cannot be part of a match under way; `fixed` is the "
        "96-character hold it replaced. A cut answer's later words never leave under either; what differs is "
        "how much of its beginning had left. An uncommon word that left is one the check had seen and not "
        "blocked on at that point (it blocked on the words after it).",
        "",
    ]
