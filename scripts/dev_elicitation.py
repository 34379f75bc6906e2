"""Dev check of elicitation (`unlearnd.elicit`) on dev authors: what the served target says about a request's
people, added to its anchors, against the anchor-free probes of the leak evaluation.

Builds what `unlearnd eval leaks` builds for one split (the request: fold 0 of every measured author, named
as users name them; the probes: the leak families made from fold 1, the other authors' and the related
subjects' controls), asks the served target the elicitation questions about every name of the request (no
request is registered: every reply is the raw target's), then fits the guard detector in process twice, on
the request alone and with what the target said, and counts per group and family the probes flagged for the
request. Nothing is generated for the probes themselves: this measures detection, not leaks. Dev only: run
it on authors a design may look at (forget05's 190-199 on forget05's target), never on held-out ones.
Usage: scripts/dev_elicitation.sh (serves the target, then runs this with --server-url and --admin-key).
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from collections import Counter
from pathlib import Path

from unlearnd.config import tofu_dir
from unlearnd.data.tofu import TofuData
from unlearnd.detectors import get_detector
from unlearnd.detectors.anchors import extract_anchors
from unlearnd.domain import ForgetRequest, ForgetSpec
from unlearnd.elicit import QUESTIONS, ElicitSettings, elicit, write_elicited
from unlearnd.evaluation.leaks import build_leak_probes, leak_context
from unlearnd.evaluation.report import run_stamp, stamp_lines, write_records, write_report_files
from unlearnd.evaluation.tofu import forget_request_spec
from unlearnd.prompting import detector_text
from unlearnd.provenance import command_line
from unlearnd.train.reference import ensure_reference_models, preset

log = logging.getLogger("dev_elicitation")


def fitted(spec: ForgetSpec, folder: Path):
    request = ForgetRequest.unregistered("r", spec)
    detector = get_detector("guard")
    metrics = detector.fit(request, folder)
    detector.load(request, folder)
    return detector, metrics


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--server-url", required=True)
    parser.add_argument("--admin-key", required=True, help="the server's (its data dir's admin_key file)")
    parser.add_argument("--split", default="forget05")
    parser.add_argument("--preset", default="mini")
    parser.add_argument("--exclude-authors", default="")
    parser.add_argument("--out", default="reports/dev-elicitation-forget05")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    stamp = run_stamp(command_line().replace("unlearnd", "python scripts/dev_elicitation.py", 1))
    tofu = TofuData(str(tofu_dir()), allow_hub=False)
    refs = ensure_reference_models(preset(args.preset, args.split), tofu=tofu, which=())
    retain_authors = list(refs.data.retain_authors)
    excluded = tuple(int(a) for a in args.exclude_authors.split(",") if a.strip())
    ctx = leak_context(tofu, refs.preset.forget_split, retain_authors[3:], 4, 0, excluded)
    retain = [it for it in refs.data.retain_items if it.author in retain_authors[:3]]
    spec = ForgetSpec(**forget_request_spec("refuse", refs, ctx.fit, retain, name="dev-elicitation", names=ctx.names))
    probes = build_leak_probes(ctx)
    work = Path(tempfile.mkdtemp(prefix="dev-elicitation-"))
    names = extract_anchors(spec).names
    replies = elicit(
        spec, names, ElicitSettings(server_url=args.server_url, admin_key=args.admin_key, max_names=len(names))
    )
    write_elicited(work / "with", replies)
    records = []
    for setup in ("without", "with"):
        detector, metrics = fitted(spec, work / setup)
        texts = [detector_text(p.probe.messages) for p in probes]
        flagged = [bool(d.matches) for d in detector.detect(texts)]
        records += [
            {
                "kind": "probe",
                "setup": setup,
                "group": p.group,
                "family": p.family,
                "author": p.author,
                "flagged": f,
                "text": t,
            }
            for p, f, t in zip(probes, flagged, texts, strict=True)
        ]
        log.info("%s: %s", setup, metrics["anchors"])
    report = {**stamp, "split": args.split, "names": names, "asked": len(names) * len(QUESTIONS)}
    report |= {"kept": len(replies), "table": table(records)}
    write_records(args.out, [{"kind": "reply", **r.model_dump()} for r in replies] + records)
    write_report_files(args.out, report, markdown(report))


def table(records: list[dict]) -> list[dict]:
    """Per group and family: probes, and those flagged without and with what the model said."""
    counts = Counter((r["group"], r["family"]) for r in records if r["setup"] == "without")
    hits = Counter((r["setup"], r["group"], r["family"]) for r in records if r["flagged"])
    return [
        {"group": g, "family": f, "n": n, "without": hits[("without", g, f)], "with": hits[("with", g, f)]}
        for (g, f), n in sorted(counts.items())
    ]


def markdown(report: dict) -> str:
    lines = [
        "# Dev check: elicitation on dev authors (detection only)",
        "",
        *stamp_lines(report),
        f"TOFU `{report['split']}` target; one `refuse` request for its authors (fold 0, as `unlearnd eval leaks`); "
        f"the target asked {report['asked']} questions about the request's names ({report['kept']} replies kept). "
        "Probes: the leak evaluation's families from fold 1 and its controls; flagged for the request by the guard "
        "detector fit without and with the replies. Dev authors: designs have been looked at on them; not held out.",
        "",
        "| group | family | probes | flagged without | flagged with |",
        "|---|---|---|---|---|",
        *(f"| {r['group']} | {r['family']} | {r['n']} | {r['without']} | {r['with']} |" for r in report["table"]),
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
