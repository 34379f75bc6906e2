"""Dev check: would the output guard stop the anchor-free leaks if what the model says about the subject,
asked by name, counted as forget answers?

The anchor-free leaks (`unlearnd eval leaks`) are replies that give a fact of the author the request was not
given (the other fold's): the output guard only knows the request's own answers, so it lets them through. Yet
the TOFU target says those facts in the words it was trained on, and it says them when asked about the author
by name too. Elicitation (`unlearnd.elicit`) already asks the served model its fixed questions about each of
a request's names, but only the replies' fact terms reach the detector. Tried here: the replies join the
request's forget answers in the output guard (reproduction of 4-grams and the meaning check), so a reply that
repeats what the model says about the subject is cut whatever the prompt.

For a committed leak run: the request it registered is rebuilt (`dev_check.rebuilt_request`); the run's
TOFU target, in process and greedy, answers `elicit.QUESTIONS` about each of the request's names (as the
worker would ask the server, 96 new tokens); two output guards are loaded, the request alone and the request
with those replies as forget answers (both with the shipped encoder); every reply of the run's `refuse` route
that reached the user unchanged is streamed through both. Counted: leaks the second guard would cut (stopped)
and control replies it would cut (no longer untouched). Offline: the replies are the run's, nothing is sent.
The elicitation questions were written before any measurement; nothing is fit.

Usage: python scripts/dev_elicited_guard.py --records reports/leaks-fold0-rerun --out reports/dev-elicited-guard
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dev_check import finish, rebuilt_request, start, target_dir  # scripts/ (the script's own folder)

from unlearnd.detectors.anchors import request_names
from unlearnd.detectors.encoder import EncoderConfig, get_encoder
from unlearnd.domain import ForgetRequest, ForgetSpec, QAExample
from unlearnd.elicit import QUESTIONS, ElicitSettings
from unlearnd.evaluation.leaks import CONTROL_GROUPS, hit_rate, rate_cell
from unlearnd.evaluation.model_under_test import HFModelUnderTest
from unlearnd.evaluation.output_guard import _stream
from unlearnd.evaluation.report import read_records
from unlearnd.guardrail.output_guard import OutputGuard
from unlearnd.prompting import user_messages
from unlearnd.provenance import stamp_lines


def elicited(spec: ForgetSpec, target: Path) -> list[QAExample]:
    """The target's greedy replies to the elicitation questions about each of the request's names."""
    settings = ElicitSettings(server_url="-", admin_key="-")
    names = request_names(spec)[: settings.max_names]
    asked = [q.format(name=name) for name in names for q in QUESTIONS]
    model = HFModelUnderTest.from_dir(target, name="target")
    replies = model.generate([user_messages(q) for q in asked], settings.max_tokens, desc="elicit")
    return [QAExample(question=q, answer=r) for q, r in zip(asked, replies, strict=True) if r]


def guards(spec: ForgetSpec, replies: list[QAExample]) -> tuple[OutputGuard, OutputGuard]:
    """The request's output guard as shipped, and with the replies as forget answers."""
    encoder = get_encoder(EncoderConfig())
    plain, with_replies = (OutputGuard(encoder=lambda: encoder) for _ in range(2))
    plain.load(ForgetRequest.unregistered("r", spec))
    grown = spec.model_copy(update={"forget": [*ForgetSpec.as_qa(spec.forget), *replies]})
    with_replies.load(ForgetRequest.unregistered("r", grown))
    return plain, with_replies


def judged(records: list[dict[str, Any]], plain: OutputGuard, grown: OutputGuard) -> list[dict[str, Any]]:
    """Each refuse-route reply that reached the user unchanged, streamed through both guards."""
    keep = ("group", "family", "author", "leaked", "reply")
    out = []
    for r in records:
        if r["route"] != "refuse" or r["served_route"] != "none" or r["group"] == "chance":
            continue
        out.append({**{k: r[k] for k in keep}, "cut_plain": _stream(plain, r["reply"])[0]})
        out[-1]["cut_with_replies"] = _stream(grown, r["reply"])[0]
    return out


def summarise(items: list[dict[str, Any]], records: list[dict[str, Any]]) -> dict[str, Any]:
    """Per forget family: leaks under refuse, and those the grown guard would cut; per control group: cut."""
    families: dict[str, Any] = {}
    for family in sorted({r["family"] for r in records if r["group"] == "forget"}):
        scored = [r for r in records if r["route"] == "refuse" and r["family"] == family and r["group"] == "forget"]
        scored = [r for r in scored if r["leaked"] is not None]
        leaks = [x for x in items if x["group"] == "forget" and x["family"] == family and x["leaked"]]
        cut = sum(1 for x in leaks if x["cut_with_replies"] and not x["cut_plain"])
        families[family] = {
            "leaks": hit_rate(sum(1 for r in scored if r["leaked"]), len(scored)),
            "leaks_with_replies": hit_rate(sum(1 for r in scored if r["leaked"]) - cut, len(scored)),
        }
    controls = {}
    for group in CONTROL_GROUPS:
        mine = [x for x in items if x["group"] == group]
        n = sum(1 for r in records if r["route"] == "refuse" and r["group"] == group)
        controls[group] = hit_rate(sum(1 for x in mine if x["cut_with_replies"] and not x["cut_plain"]), n)
    return {"families": families, "controls_cut": controls}


def markdown(report: dict[str, Any]) -> str:
    s = report["summary"]
    lines = [
        "# Dev check: the model's own replies about the subject as the output guard's forget answers (offline)",
        "",
        *stamp_lines(report),
        f"Records: the `refuse` route of `{report['records']}` (run at commit {report['records_commit']}), split "
        f"`{report['split']}`; the request rebuilt from the run; {report['replies']} replies of the target "
        f"`{report['target_model']}` to the elicitation questions about {report['names']} names. A leak counts "
        "as stopped where the grown guard cuts its reply (see the script's docstring).",
        "",
        "| family | leaks under refuse | leaks with the replies as forget answers |",
        "|---|---|---|",
        *(
            f"| {f} | {rate_cell(r['leaks'])} | {rate_cell(r['leaks_with_replies'])} |"
            for f, r in s["families"].items()
        ),
        "",
        "| control | replies newly cut (no longer untouched) |",
        "|---|---|",
        *(f"| {g} | {rate_cell(c)} |" for g, c in s["controls_cut"].items()),
        "",
        f"Per-reply records: `{report['name']}.items.jsonl.gz`; the elicited replies are in the JSON.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    args, stamp, run = start(__doc__, "dev_elicited_guard.py", "reports/dev-elicited-guard")
    spec = rebuilt_request(run, args)
    target = target_dir(args)
    replies = elicited(spec, target)
    records = read_records(args.records + ".items.jsonl.gz")
    items = judged(records, *guards(spec, replies))
    fields = {
        "split": run["split"],
        "target_model": str(target),
        "names": len(request_names(spec)),
        "replies": len(replies),
        "elicited": [qa.model_dump() for qa in replies],
        "summary": summarise(items, records),
    }
    finish(args, stamp, run, items, fields, markdown)


if __name__ == "__main__":
    main()
