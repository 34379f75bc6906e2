"""Dev check: would the fact-pair rule, read over the prompt and the reply together, stop the anchor-free leaks?

The fact pairs (`unlearnd.detectors.facts`) flag a prompt holding two of a request's fact terms. An anchor-free
probe holds at most one (else the detector had flagged it), but the reply the model gives may add another: an
output check that cuts a reply when prompt + reply hold a pair would stop that leak. Tried on forget01 fold 0
(`reports/leaks-fold0-rerun`, its replies under refuse), with the shipped rule and the request's own fact terms
(`extract_anchors`, title words left out as the detector leaves them); a leak counts as stopped
where its unflagged probe's prompt + reply hold a pair, a control (its reply under refuse) as cut where they do.

Usage: python scripts/dev_reply_fact_pairs.py --records reports/leaks-fold0-rerun
"""

from __future__ import annotations

from typing import Any

from dev_check import finish, rebuilt_request, start  # scripts/ (the script's own folder)
from dev_described_person import judged, rule_tables, summarise

from unlearnd.detectors.anchors import extract_anchors
from unlearnd.detectors.facts import FactIndex
from unlearnd.evaluation.report import read_records
from unlearnd.provenance import stamp_lines


def markdown(report: dict[str, Any]) -> str:
    s = report["summary"]
    lines = [
        "# Dev check: fact pairs over the prompt and the reply (offline, on a committed leak run)",
        "",
        *stamp_lines(report),
        f"Records: the `refuse` route of `{report['records']}` (run at commit {report['records_commit']}); the "
        f"request rebuilt from the run (split `{report['split']}`); its fact terms: {', '.join(report['terms'])}. "
        "Unflagged 'with the rule': probes whose prompt + reply hold no pair (see the script's docstring).",
        "",
        *rule_tables(s, "untouched before", "newly cut by the rule"),
        "",
        f"Per-probe records (the pair in each): `{report['name']}.items.jsonl.gz`.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    args, stamp, run = start(__doc__, "dev_reply_fact_pairs.py", "reports/dev-reply-fact-pairs")
    terms = extract_anchors(rebuilt_request(run, args)).facts  # the detector's own fact terms
    pairs = FactIndex()
    pairs.add("r", terms)
    records = read_records(args.records + ".items.jsonl.gz")
    items = judged(records, lambda text: pairs.find(text).get("r", []), with_reply=True)
    finish(args, stamp, run, items, {"split": run["split"], "terms": terms, "summary": summarise(items)}, markdown)


if __name__ == "__main__":
    main()
