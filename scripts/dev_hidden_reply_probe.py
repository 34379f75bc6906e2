"""Dev check: does a linear probe on the target's hidden states *while it replies* tell a leak?

`scripts/dev_hidden_probe.py` read the target's states on the prompt and generalised from the fit fold to
held-out facts only on its two dev authors. A reply that leaks says one of the forget author's facts; saying
it is where the model recalls the author, so this reads the states over the reply's own tokens, as an output
check would: the prompt as the served chat template renders it, the reply's tokens after it (no end of turn).

Fixed before any result was seen:

* features: the mean of the target's hidden states over the reply's tokens at the last or the middle layer,
  or the state at the reply's last token at the last layer (three forms);
* positives: the request's fit-fold pairs, question and answer with the author's name replaced by "this
  author" (a reply mostly says "this author" too);
* negatives: the request's retain authors' pairs made the same way, and TOFU's real-author and world-fact
  pairs (public data that no probe of a leak run asks);
* classifier and threshold as in `dev_hidden_probe.py`: standardised features, logistic regression (C = 1,
  balanced), threshold the highest out-of-fold score (5 folds, seed 0) of a negative;
* measured on the run's `refuse` route: the leaked replies that got through (served unflagged, leaked), cut
  if flagged; the replies to the controls that got through (other authors, related subjects) and the chance
  twins' replies (control authors, unprotected), cut wrongly if flagged.

The form is chosen on two dev runs by leaks cut minus controls cut, summed: forget01 fold 0
(`reports/leaks-fold0-rerun`) and forget10 (`reports/leaks-forget10`), both looked at by earlier designs; it
is then run once, unchanged, on forget05 (`reports/leaks-forget05`, authors 190-197), which no design of the
output-side probe saw.

Outcome: negative on the dev runs, so the held-out run was not made. Every form that cuts leaks cuts controls
too (forget10: the mean at the last layer cut 9 of 46 leaks that got through and 4 of 108 other-author, 11 of
54 related and 56 of 897 chance-twin replies); the rule picks the last token, which cuts 2 of 55 leaks.
Usage:
python scripts/dev_hidden_reply_probe.py --records reports/leaks-forget10 --split forget10 --out ...
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from dev_check import finish, start, target_dir  # scripts/ (the script's own folder)
from dev_hidden_probe import fit_material, hidden_states, score_forms

from unlearnd.data.tofu import TofuData
from unlearnd.domain import QAItem
from unlearnd.evaluation.leaks import hit_rate, rate_cell
from unlearnd.evaluation.model_under_test import HFModelUnderTest
from unlearnd.evaluation.report import read_records
from unlearnd.prompting import Message, chat_prompt_ids, user_messages
from unlearnd.provenance import stamp_lines

FORMS = ("reply_mean@last", "reply_mean@middle", "reply_end@last")
CONTROLS = ("other_author", "related", "chance")


def reply_features(mut: HFModelUnderTest, pairs: list[tuple[list[Message], str]]) -> dict[str, np.ndarray]:
    """Each (conversation, reply)'s hidden states over the reply's tokens, in every form of `FORMS`."""
    rows, reply_from = [], []
    for messages, reply in pairs:
        prompt = chat_prompt_ids(mut.tokenizer, messages)
        said = mut.tokenizer(reply, add_special_tokens=False)["input_ids"][:160] or [mut.pad_id]
        rows.append(prompt + said)
        reply_from.append(len(prompt))
    out: dict[str, list[np.ndarray]] = {f: [] for f in FORMS}
    for at, states, mask in hidden_states(mut, rows):
        in_reply = torch.zeros(mask.shape)
        for r in range(mask.shape[0]):
            in_reply[r, reply_from[at + r] : len(rows[at + r])] = 1
        weights = in_reply[..., None] / in_reply.sum(1)[:, None, None]
        out["reply_mean@last"].append((states[-1] * weights).sum(1).numpy())
        out["reply_mean@middle"].append((states[len(states) // 2] * weights).sum(1).numpy())
        out["reply_end@last"].append(states[-1][torch.arange(mask.shape[0]), mask.sum(1) - 1].numpy())
    return {f: np.concatenate(v) for f, v in out.items()}


def training_pairs(run: dict[str, Any], tofu: TofuData) -> tuple[list[tuple[list[Message], str]], list[int]]:
    """The request's fit fold (1) against its retain authors' pairs and TOFU's real authors and world facts (0),
    names replaced by "this author"."""
    fit, retain, anonymised = fit_material(run, tofu)

    def anonymous(items: list[QAItem]) -> list[tuple[list[Message], str]]:
        return [(user_messages(anonymised(it.question, it)), anonymised(it.answer, it)) for it in items]

    public = tofu.split("real_authors") + tofu.split("world_facts")
    positives = anonymous(fit)
    negatives = anonymous(retain) + anonymous(public)
    return positives + negatives, [1] * len(positives) + [0] * len(negatives)


def summarise(items: list[dict[str, Any]], form: str) -> dict[str, Any]:
    """Per family: leaked replies that got through, cut; per control group: replies cut wrongly."""
    leaked = [x for x in items if x["group"] == "forget" and x["leaked"]]
    families = {
        family: hit_rate(sum(x["cut"][form] for x in mine), len(mine))
        for family in sorted({x["family"] for x in leaked})
        for mine in [[x for x in leaked if x["family"] == family]]
    }
    controls = {g: [x for x in items if x["group"] == g] for g in CONTROLS}
    return {
        "leaks_cut": families,
        "all_leaks_cut": hit_rate(sum(x["cut"][form] for x in leaked), len(leaked)),
        "controls_cut": {g: hit_rate(sum(x["cut"][form] for x in xs), len(xs)) for g, xs in controls.items()},
    }


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Dev check: a linear probe on the target's hidden states over its reply",
        "",
        *stamp_lines(report),
        f"Replies: those of `{report['records']}` (run at commit {report['records_commit']}) that reached the "
        "user under `refuse` unflagged and uncut, and the chance twins' (unprotected); target "
        f"`{report['target_model']}`. Fit: {report['positives']} anonymised fit-fold pairs against "
        f"{report['negatives']} negatives (retain authors {report['retain_authors']}, real authors, world "
        "facts); seed 0. See the script's docstring for the procedure, fixed before any result was seen.",
        "",
    ]
    for form, s in report["summary"].items():
        lines += [
            f"## {form} (threshold {report['thresholds'][form]:.2f})",
            "",
            "| family | leaked replies that got through, cut |",
            "|---|---|",
            *(f"| {f} | {rate_cell(c)} |" for f, c in s["leaks_cut"].items()),
            f"| all | {rate_cell(s['all_leaks_cut'])} |",
            "",
            "| control | replies cut wrongly |",
            "|---|---|",
            *(f"| {g} | {rate_cell(c)} |" for g, c in s["controls_cut"].items()),
            "",
        ]
    lines.append(f"Per-reply records (score and cut per form): `{report['name']}.items.jsonl.gz`.")
    return "\n".join(lines) + "\n"


def main() -> None:
    args, stamp, run = start(__doc__, "dev_hidden_reply_probe.py", "reports/dev-hidden-reply-probe")
    tofu = TofuData(allow_hub=False)
    target = target_dir(args)
    mut = HFModelUnderTest.from_dir(target, name="target")
    pairs, labels = training_pairs(run, tofu)
    train = reply_features(mut, pairs)
    records = read_records(args.records + ".items.jsonl.gz")
    through = [r for r in records if r["route"] == "refuse" and r["served_route"] == "none" and r["group"] != "chance"]
    replies = through + [r for r in records if r["group"] == "chance"]
    measured = reply_features(mut, [(r["messages"], r["reply"]) for r in replies])
    keep = ("group", "family", "author", "leaked", "reply")
    items = [{k: r.get(k) for k in keep} for r in replies]
    thresholds = score_forms(items, train, labels, measured, "cut")
    fields = {
        "target_model": str(target),
        "retain_authors": run["request_retain_authors"],
        "positives": sum(labels),
        "negatives": len(labels) - sum(labels),
        "thresholds": thresholds,
        "summary": {form: summarise(items, form) for form in FORMS},
    }
    finish(args, stamp, run, items, fields, markdown)


if __name__ == "__main__":
    main()
