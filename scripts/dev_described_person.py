"""Dev check: would a "described person" rule in the fact-pair detector stop the anchor-free leaks?

The fact pairs (`unlearnd.detectors.facts`) flag a prompt holding two of a request's distinctive facts, one
rarer than Zipf 3.0. The description probes of `unlearnd eval leaks` mostly hold one such fact at most:
"In his French literature, this author often recalls his birthplace Kuwait ..." ("Kuwait" is Zipf 3.7,
"French" 5.1 and no fact term). The rule tried here, designed on forget01 fold 0's records
(`reports/leaks-fold0-rerun`, looked at before), adds to the shipped detector:

- keys: the request's fact terms that name where the subject is from (a capitalised run after "in" or
  "from", "in Astana, Kazakhstan") or a role ("as a florist"), rarer than Zipf `KEY_ZIPF`; identities that
  many people share ("LGBTQ+") are no keys: as a key it flagged an LGBTQ+ writer of the detector
  evaluation's negatives for another request;
- context: the subject's named things up to Zipf `CONTEXT_ZIPF` ("French", "African American"), retain
  subjects' too;
- a title's words stay fact terms (the detector leaves them out: "Kazakhstan" of "Kazakhstan Echoes");
- a prompt that asks about a person (`PERSON`) and holds a key and a second fact or context term (not the
  key's own word) is flagged.

For every probe of the run's `refuse` route, the request the run registered is rebuilt (same fold, retain
authors and names), the rule applied to the probe's user turns, and a leak whose probe it flags counts as
stopped (refuse answers a flagged prompt with its refusal); a control it flags is no longer untouched.
Offline: nothing is sent to a model. The design was fixed before it was applied to the held-out run.

Usage: python scripts/dev_described_person.py --records reports/leaks-forget10 --split forget10
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

from dev_check import finish, rebuilt_request, start  # scripts/ (the script's own folder)

from unlearnd.detectors.anchors import request_names
from unlearnd.detectors.facts import _KEEP, _ROLE, FactIndex, _role, fact_terms, fact_words, facts_in, without_names
from unlearnd.detectors.normalize import views
from unlearnd.detectors.spans import FUNCTION_WORDS, STOPWORDS, fold, fold_word, tokens, zipf
from unlearnd.domain import ForgetSpec, QAExample
from unlearnd.evaluation.leaks import CONTROL_GROUPS, hit_rate, rate_cell
from unlearnd.evaluation.report import read_records
from unlearnd.provenance import stamp_lines

KEY_ZIPF = 4.0
CONTEXT_ZIPF = 5.5
PERSON = re.compile(
    r"\b(?:author|writer|novelist|poet|playwright|person|someone|who|whose|he|she|him|his|her|man|woman)\b", re.I
)
_PLACE = re.compile(r"\b(?:in|from)\s+([A-Z][a-zA-Z]+(?:(?:[ -]|,\s*)[A-Z][a-zA-Z]+)*)")


class DescribedRule:
    """The rule for one request: its fact terms (title words kept), keys and context."""

    def __init__(self, spec: ForgetSpec, elicited: Sequence[QAExample] = ()) -> None:
        anchored = {fold_word(w) for text in request_names(spec) for w, _, _ in tokens(text)}
        answers = [x.answer for x in ForgetSpec.as_qa(spec.forget)] + [without_names(x.answer) for x in elicited]
        self.facts = fact_terms(spec, anchored, elicited)
        places = {fold(w) for a in answers for run in _PLACE.findall(a) for w in re.split(r"[ ,-]+", run)}
        roles = {w for a in answers for w in (_role(m) for m in _ROLE.finditer(a)) if w}
        self.keys = sorted(w for w in set(self.facts) & (places | roles) if not w.isdigit() and zipf(w) < KEY_ZIPF)
        named = set().union(*(facts_in(a, CONTEXT_ZIPF) for a in answers)) - anchored - STOPWORDS - FUNCTION_WORDS
        self.context = sorted(w for w in named if _KEEP.match(w))
        self.pairs = FactIndex()
        self.pairs.add("r", self.facts)

    def flags(self, text: str) -> list[str]:
        """The terms that flag `text`: the shipped pair rule on these facts, else a key and a partner."""
        text_views = views(text)
        pair = self.pairs.find(text, text_views).get("r")
        if pair:
            return pair
        if not any(PERSON.search(v) for v in text_views):
            return []
        present = set().union(*(fact_words(v) for v in text_views))
        partners = present & (set(self.facts) | set(self.context))
        for key in sorted(present & set(self.keys)):
            others = {w for w in partners if w[:6] != key[:6]}
            if others:
                return sorted({key, *others})
        return []


def judged(
    records: list[dict[str, Any]], flags: Callable[[str], list[str]], with_reply: bool = False
) -> list[dict[str, Any]]:
    """Each refuse-route probe with whether it reached the model, leaked, and what `flags` finds in its user
    turns (and its reply, `with_reply`)."""
    out = []
    for r in records:
        if r["route"] != "refuse":
            continue
        text = " ".join(m["content"] for m in r["messages"] if m["role"] == "user")
        if with_reply:
            text += "\n" + r["reply"]
        fields = {k: r[k] for k in ("group", "family", "author", "leaked", "served_route")}
        out.append({**fields, "text": text, "rule_flags": flags(text)})
    return out


def summarise(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Per forget family: unflagged and leaks before and with the rule; per control group: newly flagged."""
    rows: dict[str, Any] = {}
    for family in sorted({x["family"] for x in items if x["group"] == "forget"}):
        mine = [x for x in items if x["group"] == "forget" and x["family"] == family]
        unflagged = [x for x in mine if x["served_route"] == "none"]
        still = [x for x in unflagged if not x["rule_flags"]]
        scored = [x for x in mine if x["leaked"] is not None]  # the judge's n: replies it could score
        leaks = [x for x in scored if x["leaked"]]
        rows[family] = {
            "unflagged_before": hit_rate(len(unflagged), len(mine)),
            "unflagged_with_rule": hit_rate(len(still), len(mine)),
            "leaks_before": hit_rate(len(leaks), len(scored)),
            "leaks_with_rule": hit_rate(
                sum(1 for x in leaks if x in still or x["served_route"] != "none"), len(scored)
            ),
        }
    controls = {}
    for group in CONTROL_GROUPS:
        mine = [x for x in items if x["group"] == group]
        untouched = [x for x in mine if x["served_route"] == "none"]
        controls[group] = {
            "reached_before": hit_rate(len(untouched), len(mine)),
            "newly_flagged": hit_rate(sum(1 for x in untouched if x["rule_flags"]), len(mine)),
        }
    return {"families": rows, "controls": controls}


def rule_tables(summary: dict[str, Any], before: str, newly: str) -> list[str]:
    """`summarise`'s two tables: per forget family before and with the rule, per control group."""
    return [
        "| family | unflagged before | unflagged with the rule | leaks before | leaks with the rule |",
        "|---|---|---|---|---|",
        *(
            f"| {f} | {rate_cell(r['unflagged_before'])} | {rate_cell(r['unflagged_with_rule'])} | "
            f"{rate_cell(r['leaks_before'])} | {rate_cell(r['leaks_with_rule'])} |"
            for f, r in summary["families"].items()
        ),
        "",
        f"| control | {before} | {newly} |",
        "|---|---|---|",
        *(
            f"| {g} | {rate_cell(c['reached_before'])} | {rate_cell(c['newly_flagged'])} |"
            for g, c in summary["controls"].items()
        ),
    ]


def markdown(report: dict[str, Any]) -> str:
    s = report["summary"]
    lines = [
        "# Dev check: a described-person rule for the fact pairs (offline, on a committed leak run)",
        "",
        *stamp_lines(report),
        f"Records: the `refuse` route of `{report['records']}` (run at commit {report['records_commit']}); the "
        f"request rebuilt from the run (split `{report['split']}`, retain authors {report['retain_authors']}). "
        f"Keys: {', '.join(report['keys']) or 'none'}. A leak counts as stopped where the rule flags its probe "
        "(see the script's docstring).",
        "",
        *rule_tables(s, "reached the model untouched before", "newly flagged by the rule"),
        "",
        f"Per-probe records (what the rule flags in each): `{report['name']}.items.jsonl.gz`.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    args, stamp, run = start(__doc__, "dev_described_person.py", "reports/dev-described-person")
    rule = DescribedRule(rebuilt_request(run, args))
    items = judged(read_records(args.records + ".items.jsonl.gz"), rule.flags)
    fields = {
        "split": run["split"],
        "retain_authors": run["request_retain_authors"],
        "keys": rule.keys,
        "summary": summarise(items),
    }
    finish(args, stamp, run, items, fields, markdown)


if __name__ == "__main__":
    main()
