"""Dev check: is it the target that makes model-side recognition fail? The same TOFU mini target trained
longer, asked by name.

Every design that tried to link a description of a forget author to the request through the model
(elicitation, elicited guard answers, hidden-state probes, reply likelihood) failed on the mini target
because it mixes its authors up: asked about one by name it gives another's titles and prizes
(`reports/dev-elicitation-forget05.md`). Measured here, before any such design is tried on a stronger target:
whether a target that has memorised its authors better says the right author's facts when asked by name.

Procedure (fixed before the first run): the `mini` preset on `--split` (forget01: 2 forget and 6 retain
authors, 8 in all), trained with each of `--epochs` and nothing else changed (the shipped preset has 4). Per
target, greedy, in process:
- asked verbatim: each trained author's TOFU questions; recalled when at least half of the answer's key terms
  (`evaluation.leaks.key_terms`, the leak judge's) are in the reply;
- asked by name: `elicit.QUESTIONS` (written before any measurement) about each trained author's name, the
  replies joined; an author's *own* terms are the key terms of their answers no other trained author's answers
  hold; counted are the own terms the replies say (recall) and other authors' own terms they say (confusion);
  precision = own / (own + others');
- for the forget authors: the fold-1 answers (what the leak probes ask; the request sees fold 0) whose key
  terms the elicited replies say at least half of: what asking the model could add to a request.
Nothing is fit on these numbers; they only say whether a stronger target is worth a held-out leak run.

Usage: python scripts/dev_target_knowledge.py --split forget01 --epochs 4,16 --out reports/dev-target-knowledge
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import torch

from unlearnd.data.tofu import TofuData, author_names
from unlearnd.domain import QAItem
from unlearnd.elicit import QUESTIONS
from unlearnd.evaluation.folds import position_in_author
from unlearnd.evaluation.leaks import gives, key_terms, said_words
from unlearnd.evaluation.model_under_test import HFModelUnderTest
from unlearnd.evaluation.report import fmt, write_records, write_report_files
from unlearnd.prompting import user_messages
from unlearnd.provenance import command_line, run_stamp, stamp_lines
from unlearnd.train.reference import ensure_reference_models, forget_rouge, preset

log = logging.getLogger("dev_target_knowledge")
MAX_TOKENS = 96  # as the elicitation worker (`ElicitSettings.max_tokens`) and the reference ROUGE check


def own_terms(terms_of: dict[tuple[int, str], list[str]]) -> dict[int, set[str]]:
    """Each author's key terms (`terms_of`: per author and question) that no other trained author's answers hold."""
    terms: dict[int, set[str]] = {}
    for (author, _), found in terms_of.items():
        terms.setdefault(author, set()).update(found)
    return {a: t - set().union(*(o for b, o in terms.items() if b != a)) for a, t in terms.items()}


def measure(
    target: Path, items: list[QAItem], names: dict[int, str], forget: list[int], epochs: float
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Verbatim recall, elicited recall / confusion and fold-1 coverage of one target."""
    model = HFModelUnderTest.from_dir(target, name=f"target-{epochs:g}ep")
    authors = sorted(names)
    verbatim = model.generate([user_messages(it.question) for it in items], MAX_TOKENS, desc="verbatim")
    asked = [(a, q.format(name=names[a])) for a in authors for q in QUESTIONS]
    elicited = model.generate([user_messages(q) for _, q in asked], MAX_TOKENS, desc="elicit")
    terms_of = {(it.author, it.question): key_terms(it.answer, it.question, names[it.author]) for it in items}
    records: list[dict[str, Any]] = []
    for it, reply in zip(items, verbatim, strict=True):
        records.append(
            {
                "epochs": epochs,
                "kind": "verbatim",
                "author": it.author,
                "question": it.question,
                "answer": it.answer,
                "reply": reply,
                "key_terms": terms_of[it.author, it.question],
                "recalled": gives(terms_of[it.author, it.question], reply),
            }
        )
    for (a, q), reply in zip(asked, elicited, strict=True):
        records.append({"epochs": epochs, "kind": "elicited", "author": a, "question": q, "reply": reply})
    own = own_terms(terms_of)
    position = position_in_author(items)
    rows = {}
    for a in authors:
        heard = " ".join(r["reply"] for r in records if r["kind"] == "elicited" and r["author"] == a)
        heard_words = said_words(heard)
        mine = len(own[a] & heard_words)
        others = sum(len(own[b] & heard_words) for b in authors if b != a)
        fold1 = [it for it in items if it.author == a and position[it.question] % 2 == 1]
        covered = [it for it in fold1 if gives(terms_of[a, it.question], heard)]
        scored = [r for r in records if r["kind"] == "verbatim" and r["author"] == a and r["recalled"] is not None]
        rows[a] = {
            "name": names[a],
            "forget": a in forget,
            "verbatim_recalled": sum(r["recalled"] for r in scored),
            "verbatim_scored": len(scored),
            "own_terms": len(own[a]),
            "own_said": mine,
            "others_said": others,
            "precision": mine / (mine + others) if mine + others else None,
            "fold1_covered": len(covered) if a in forget else None,
            "fold1": len(fold1) if a in forget else None,
        }
    rouge = forget_rouge(target, [it for it in items if it.author in forget], MAX_TOKENS)["forget_rouge_l_recall"]
    return {"epochs": epochs, "target": target.name, "forget_rouge_l_recall": rouge, "authors": rows}, records


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Dev check: the mini target trained longer, asked by name",
        "",
        *stamp_lines(report),
        "",
        f"TOFU `{report['split']}` mini target, trained with {report['epochs']} epochs (shipped: 4), everything else "
        "as the preset. Verbatim: the author's TOFU questions, recalled when half the answer's key terms are in the "
        "reply. Elicited: `elicit.QUESTIONS` about the author's name; own terms are key terms of the author's "
        "answers that no other trained author's answers hold; precision = own said / (own + others' said). "
        "Fold 1 covered (forget authors): fold-1 answers whose key terms the elicited replies say at least half of. "
        "Dev authors; nothing is fit on these numbers.",
        "",
        "| epochs | author | forget | verbatim recalled | own terms | own said | others' said | precision "
        "| fold 1 covered |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for run in report["targets"]:
        for a, row in run["authors"].items():
            fold1 = f"{row['fold1_covered']}/{row['fold1']}" if row["forget"] else "n/a (not a forget author)"
            precision = fmt(row["precision"]) if row["precision"] is not None else "n/a (none said)"
            lines.append(
                f"| {run['epochs']:g} | {a} {row['name']} | {'yes' if row['forget'] else 'no'} "
                f"| {row['verbatim_recalled']}/{row['verbatim_scored']} | {row['own_terms']} | {row['own_said']} "
                f"| {row['others_said']} | {precision} "
                f"| {fold1} |"
            )
    lines += [
        "",
        "| epochs | forget ROUGE-L recall | own said | others' said | precision | fold 1 covered |",
        "|---|---|---|---|---|---|",
    ]
    for run in report["targets"]:
        t = run["totals"]
        lines.append(
            f"| {run['epochs']:g} | {fmt(run['forget_rouge_l_recall'])} | {t['own_said']}/{t['own_terms']} "
            f"| {t['others_said']} | {fmt(t['precision'])} | {t['fold1_covered']}/{t['fold1']} |"
        )
    return "\n".join(lines) + "\n"


def totals(rows: dict[int, dict[str, Any]]) -> dict[str, Any]:
    own = sum(r["own_said"] for r in rows.values())
    others = sum(r["others_said"] for r in rows.values())
    return {
        "own_terms": sum(r["own_terms"] for r in rows.values()),
        "own_said": own,
        "others_said": others,
        "precision": own / (own + others) if own + others else None,
        "fold1_covered": sum(r["fold1_covered"] or 0 for r in rows.values()),
        "fold1": sum(r["fold1"] or 0 for r in rows.values()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split", default="forget01")
    parser.add_argument("--epochs", default="4,16", help="comma-separated; the shipped mini preset has 4")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="reports/dev-target-knowledge")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    stamp = run_stamp(command_line().replace("unlearnd", "python scripts/dev_target_knowledge.py", 1))
    torch.set_num_threads(args.threads)
    tofu = TofuData(allow_hub=False)
    targets, records = [], []
    for epochs in (float(e) for e in args.epochs.split(",")):
        refs = ensure_reference_models(preset("mini", args.split, epochs=epochs), tofu=tofu, which=("target",))
        items = refs.data.target_items
        names = author_names(items)
        summary, recs = measure(Path(refs.target_dir), items, names, refs.data.forget_authors, epochs)
        summary["totals"] = totals(summary["authors"])
        targets.append(summary)
        records += recs
        log.info("%g epochs: %s", epochs, summary["totals"])
    report = {**stamp, "name": Path(args.out).name, "split": args.split, "epochs": args.epochs, "targets": targets}
    write_records(args.out, records)
    write_report_files(args.out, report, markdown(report))
    log.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
