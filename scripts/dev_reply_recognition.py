"""Dev check: does the target's own likelihood tell a reply about a forget author from a reply about others?

`scripts/dev_recognition.py` asked the target whom a *prompt* is about; its prior for its forget authors'
names swamped the answer. This asks about the *reply* instead, where a leak shows: the TOFU target says a
forget author's held-out facts in the words it was trained on. For each reply of a committed leak run's
unprotected route, and each forget author `a`:

    lift_a(reply) = log p(reply | "Tell me about <a's name>.") - log p(reply | "Tell me about this author.")

(summed over the reply's tokens). An output check built on it would cut a reply whose lift for a request's
subject exceeds what the request's own retain answers reach (other people's answers, which the user gives):
the threshold per author is the highest lift of the leak run's retain answers (TOFU authors the run's
requests held as retain). Measured: leaked replies of the forget probes over that threshold for their own
author (would be cut), and control replies (other authors, related subjects) over it for any forget author
(would be cut wrongly). Nothing is fit beyond that maximum. A dev check, not held out: two forms of the lift
were first tried on these replies (this one and a name put into the probe's own prompt, which separated
nothing).

Usage: python scripts/dev_reply_recognition.py --records reports/leaks --out reports/dev-reply-recognition
"""

from __future__ import annotations

from typing import Any

from dev_check import finish, start, target_dir  # scripts/ (the script's own folder)
from tqdm import tqdm

from unlearnd.data.tofu import TofuData
from unlearnd.evaluation.leaks import CONTROL_GROUPS, hit_rate, rate_cell
from unlearnd.evaluation.model_under_test import HFModelUnderTest
from unlearnd.evaluation.report import read_records
from unlearnd.prompting import user_messages
from unlearnd.provenance import stamp_lines

NAMED = "Tell me about {name}."
UNNAMED = "Tell me about this author."


def lifts(mut: HFModelUnderTest, replies: list[str], names: dict[int, str]) -> list[dict[str, float]]:
    """Each reply's lift per author: its summed log-probability after the named prompt minus after the
    unnamed one (the project's in-process scorer, prompts batched)."""
    users = [UNNAMED, *(NAMED.format(name=name) for name in names.values())]
    out = []
    for reply in tqdm(replies, desc="lifts"):
        rows = mut.score([user_messages(u) for u in users], [[reply]] * len(users), desc="reply")
        unnamed, *named = (sum(row[0].logprobs) for row in rows)
        out.append({str(a): lp - unnamed for a, lp in zip(names, named, strict=True)})
    return out


def summarise(replies: list[dict[str, Any]], thresholds: dict[str, float]) -> dict[str, Any]:
    """Per family: leaked forget replies over their author's threshold; controls over any forget author's."""

    def over_own(x: dict[str, Any]) -> bool:
        return x["lift"][str(x["author"])] > thresholds[str(x["author"])]

    def over_any(x: dict[str, Any]) -> bool:
        return any(x["lift"][a] > t for a, t in thresholds.items())

    leaked = [x for x in replies if x["group"] == "forget" and x["leaked"]]
    rows: dict[str, Any] = {}
    for family in sorted({x["family"] for x in replies if x["group"] == "forget"}):
        mine = [x for x in leaked if x["family"] == family]
        rows[family] = {"leaked_cut": hit_rate(sum(map(over_own, mine)), len(mine))}
    controls = {g: [x for x in replies if x["group"] == g] for g in CONTROL_GROUPS}
    return {
        "families": rows,
        "leaked_cut": hit_rate(sum(map(over_own, leaked)), len(leaked)),
        "controls_cut": {g: hit_rate(sum(map(over_any, xs)), len(xs)) for g, xs in controls.items()},
    }


def markdown(report: dict[str, Any]) -> str:
    s = report["summary"]
    lines = [
        "# Dev check: does the target's likelihood recognise a reply about a forget author?",
        "",
        *stamp_lines(report),
        f"Replies: the unprotected route's replies in `{report['records']}` "
        f"(run at commit {report['records_commit']}), "
        f'scored by the TOFU target `{report["target_model"]}`. Lift: log p(reply | "{NAMED}") - log p(reply | '
        f'"{UNNAMED}"). Threshold per forget author: the highest lift of the run\'s retain answers (authors '
        f"{report['retain_authors']}, {report['retain_answers']} answers): "
        + ", ".join(f"{a}: {t:.1f}" for a, t in report["thresholds"].items())
        + ". A dev check, not held out (see the script's docstring).",
        "",
        "| family | leaked replies over their author's threshold (would be cut) |",
        "|---|---|",
        *(f"| {family} | {rate_cell(row['leaked_cut'])} |" for family, row in s["families"].items()),
        f"| all | {rate_cell(s['leaked_cut'])} |",
        "",
        "| controls | over a forget author's threshold (would be cut wrongly) |",
        "|---|---|",
        *(f"| {group} | {rate_cell(cell)} |" for group, cell in s["controls_cut"].items()),
        "",
        f"Per-reply records (lift per forget author): `{report['name']}.items.jsonl.gz`.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    args, stamp, run = start(__doc__, "dev_reply_recognition.py", "reports/dev-reply-recognition")
    records = [r for r in read_records(args.records + ".items.jsonl.gz") if r["route"] == "none"]
    tofu = TofuData()
    forget_authors = sorted({r["author"] for r in records if r["group"] == "forget"})
    names = tofu.names_of(forget_authors)
    target = target_dir(args)
    mut = HFModelUnderTest.from_dir(target, name="target")
    retain = [it.answer for it in tofu.by_authors(run["request_retain_authors"])]
    retain_lifts = lifts(mut, retain, names)
    thresholds = {str(a): max(x[str(a)] for x in retain_lifts) for a in forget_authors}
    keep = ("group", "author", "family", "leaked", "reply")
    replies = [
        {**{k: r[k] for k in keep}, "lift": lift}
        for r, lift in zip(records, lifts(mut, [r["reply"] for r in records], names), strict=True)
    ]
    fields = {
        "target_model": str(target),
        "retain_authors": run["request_retain_authors"],
        "retain_answers": len(retain),
        "thresholds": thresholds,
        "summary": summarise(replies, thresholds),
    }
    finish(args, stamp, run, replies, fields, markdown)


if __name__ == "__main__":
    main()
