"""Dev check: does a linear probe on the TOFU target's hidden states tell a prompt about a forget author?

The anchor-free families of `unlearnd eval leaks` reach the model unflagged because a request knows only
its fit fold's facts. `scripts/dev_recognition.py` asked the target whom a prompt describes and its prior
for the forget authors' names swamped the answer. This asks the target's *representation* instead, with
that prior calibrated away by negatives: a logistic regression per request, fit only on what a request
holds and on public negatives, then applied to the probes of a committed leak run.

Fixed before any result was seen:

* features: the target's hidden state at the prompt's last position (where the reply starts), or the mean
  over the prompt's positions, at the middle or the last layer (four forms; the chat template as served, so
  a mean also carries the prompt's length: the template's fixed system turn weighs more in a short prompt);
* positives: the request's fit-fold questions and answers, each with the author's name replaced by "this
  author" (what `replace_name` does for the probes), each as one user message;
* negatives: the request's retain authors' questions and answers made the same way, and the built-in
  ordinary chat prompts of the detector's fit part;
* classifier: standardised features, logistic regression (C = 1, balanced classes); the threshold is the
  highest out-of-fold score (5 folds, seed 0) of a negative, applied to the probe refit on all of them;
* measured on the run's `refuse` route: the share of forget probes flagged per family, the leaks that
  reached the user unflagged and would now be flagged, and the controls (other authors, related subjects,
  the chance twins about control authors) that would be flagged wrongly.

A dev check: the form is chosen on forget01 fold 0 (`reports/leaks-fold0-rerun`, authors 198 and 199) by
leaks stopped minus other-author and related controls flagged: `mean@last` (3 of 9 leaks, no control; the
last token at the last layer stopped 2 and flagged 4 other-author probes). It is then run once, unchanged, on
the held-out forget10 run (authors 180-189, which no design of this check saw). Usage:
python scripts/dev_hidden_probe.py --records reports/leaks-fold0-rerun --out reports/dev-hidden-probe-fold0
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from dev_check import finish, run_context, start, target_dir  # scripts/ (the script's own folder)
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from tqdm import tqdm

from unlearnd.data.tofu import TofuData
from unlearnd.detectors.negatives import chat_prompts
from unlearnd.domain import QAItem
from unlearnd.evaluation.attacks import replace_name
from unlearnd.evaluation.leaks import hit_rate, rate_cell
from unlearnd.evaluation.model_under_test import HFModelUnderTest
from unlearnd.evaluation.report import read_records
from unlearnd.prompting import chat_prompt_ids, user_messages
from unlearnd.provenance import stamp_lines

FORMS = ("last_token@middle", "last_token@last", "mean@middle", "mean@last")
CHOSEN = "mean@last"  # on the dev run (see the docstring)
ANCHOR_FREE = ("description", "title", "composite", "json", "completion", "multi_turn")
CONTROLS = ("other_author", "related", "chance")


def hidden_states(
    mut: HFModelUnderTest, rows: list[list[int]], batch: int = 16
) -> Iterator[tuple[int, tuple[torch.Tensor, ...], torch.Tensor]]:
    """The model's hidden states (every layer) of `rows` of token ids, in right-padded batches: the first
    row's index, the states and the attention mask of each batch."""
    for at in tqdm(range(0, len(rows), batch), desc="hidden states"):
        chunk = rows[at : at + batch]
        ids = torch.full((len(chunk), max(map(len, chunk))), mut.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, row in enumerate(chunk):
            ids[r, : len(row)], mask[r, : len(row)] = torch.tensor(row), 1
        with torch.no_grad():
            states = mut.model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        yield at, states, mask


def features(mut: HFModelUnderTest, conversations: list[list[dict]]) -> dict[str, np.ndarray]:
    """Each conversation's hidden state in every form of `FORMS`."""
    encoded = [chat_prompt_ids(mut.tokenizer, c) for c in conversations]
    out: dict[str, list[np.ndarray]] = {f: [] for f in FORMS}
    for _, states, mask in hidden_states(mut, encoded):
        rows = mask.shape[0]
        last_at = mask.sum(1) - 1
        for layer_name, layer in (("middle", states[len(states) // 2]), ("last", states[-1])):
            out[f"last_token@{layer_name}"].append(layer[torch.arange(rows), last_at].numpy())
            pooled = (layer * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
            out[f"mean@{layer_name}"].append(pooled.numpy())
    return {f: np.concatenate(v) for f, v in out.items()}


def fit_material(run: dict[str, Any], tofu: TofuData) -> tuple[list[QAItem], list[QAItem], Callable[..., str]]:
    """What a request holds: its fit fold and its retain authors' QA, and how a text of either reads without
    its author's name ("this author"; a text of no known author stays as it is)."""
    ctx = run_context(tofu, run)
    names = {**ctx.names, **tofu.names_of(run["request_retain_authors"])}

    def anonymised(text: str, item: QAItem) -> str:
        return replace_name(text, names[item.author], "this author") if item.author in names else text

    return ctx.fit, tofu.by_authors(run["request_retain_authors"]), anonymised


def training_texts(run: dict[str, Any], tofu: TofuData) -> tuple[list[str], list[int]]:
    """What the probe is fit on: the request's fit fold (1) against its retain QA and chat prompts (0)."""
    fit, retain, anonymised = fit_material(run, tofu)

    def anonymous(items: list[QAItem]) -> list[str]:
        return [anonymised(t, it) for it in items for t in (it.question, it.answer)]

    positives, negatives = anonymous(fit), anonymous(retain) + list(chat_prompts("fit"))
    return positives + negatives, [1] * len(positives) + [0] * len(negatives)


def fitted(x: np.ndarray, y: list[int], seed: int) -> tuple[Any, float]:
    """The probe and its threshold: the highest out-of-fold score of a negative."""
    model = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, class_weight="balanced", max_iter=5000))
    folds = StratifiedKFold(5, shuffle=True, random_state=seed)
    oof = cross_val_predict(model, x, y, cv=folds, method="decision_function")
    threshold = float(max(s for s, label in zip(oof, y, strict=True) if label == 0))
    return model.fit(x, y), threshold


def score_forms(
    items: list[dict[str, Any]],
    train: dict[str, np.ndarray],
    labels: list[int],
    measured: dict[str, np.ndarray],
    key: str,
) -> dict[str, float]:
    """Fit the probe of every form, score the measured items (`item["score"][form]`, `item[key][form]`: over
    the threshold); returns each form's threshold."""
    thresholds = {}
    for form, x in train.items():
        model, thresholds[form] = fitted(x, labels, 0)
        for item, score in zip(items, model.decision_function(measured[form]), strict=True):
            item.setdefault("score", {})[form] = float(score)
            item.setdefault(key, {})[form] = bool(score > thresholds[form])
    return thresholds


def summarise(items: list[dict[str, Any]], form: str) -> dict[str, Any]:
    """Per family: forget probes flagged, unflagged refuse leaks now flagged; controls flagged."""
    forget = [x for x in items if x["group"] == "forget"]
    rows = {}
    for family in sorted({x["family"] for x in forget}):
        mine = [x for x in forget if x["family"] == family]
        through = [x for x in mine if x["leaked"] and x["served_route"] == "none"]
        rows[family] = {
            "flagged": hit_rate(sum(x["flagged"][form] for x in mine), len(mine)),
            "leaks_through_stopped": hit_rate(sum(x["flagged"][form] for x in through), len(through)),
        }
    controls = {g: [x for x in items if x["group"] == g] for g in CONTROLS}
    return {
        "families": rows,
        "controls_flagged": {g: hit_rate(sum(x["flagged"][form] for x in xs), len(xs)) for g, xs in controls.items()},
    }


def with_check(run: dict[str, Any], summary: dict[str, Any]) -> dict[str, Any]:
    """Per anchor-free family: refuse leaks as a share of the unprotected target's, as run and with the
    chosen form's flags added (the leaks that got through and would be flagged are taken off)."""
    out = {}
    for family in ANCHOR_FREE:
        cells = run["results"]["families"].get(family)
        if not cells or family not in summary["families"]:
            continue
        none, refuse = cells["none"]["leaks"]["hits"], cells["refuse"]["leaks"]["hits"]
        after = refuse - summary["families"][family]["leaks_through_stopped"]["hits"]
        out[family] = {"none": none, "refuse": refuse, "refuse_with_check": after}
    return out


def _share(part: int, whole: int) -> str:
    return f"{part / whole:.2f}" if whole else "n/a (no unprotected leak)"


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Dev check: a linear probe on the target's hidden states",
        "",
        *stamp_lines(report),
        f"Probes: the `refuse` route's records of `{report['records']}` (run at commit "
        f"{report['records_commit']}); target `{report['target_model']}`. Fit: {report['positives']} "
        f"anonymised fit-fold texts against {report['negatives']} negatives (retain authors "
        f"{report['retain_authors']} and chat prompts); seed {report['seed']}. "
        "See the script's docstring for the procedure, fixed before any result was seen.",
        "",
        f"## Refuse leaks with the chosen form ({CHOSEN}) added",
        "",
        "| family | none leaks | refuse leaks | share | with the check | share |",
        "|---|---|---|---|---|---|",
        *(
            f"| {f} | {r['none']} | {r['refuse']} | {_share(r['refuse'], r['none'])} | {r['refuse_with_check']} "
            f"| {_share(r['refuse_with_check'], r['none'])} |"
            for f, r in report["with_check"].items()
        ),
        "",
    ]
    for form, s in report["summary"].items():
        chosen = ", chosen on the dev run" if form == CHOSEN else ""
        lines += [
            f"## {form} (threshold {report['thresholds'][form]:.2f}{chosen})",
            "",
            "| family | forget probes flagged | refuse leaks that got through, now flagged |",
            "|---|---|---|",
            *(
                f"| {f} | {rate_cell(r['flagged'])} | {rate_cell(r['leaks_through_stopped'])} |"
                for f, r in s["families"].items()
            ),
            "",
            "| control | flagged (would be refused wrongly) |",
            "|---|---|",
            *(f"| {g} | {rate_cell(c)} |" for g, c in s["controls_flagged"].items()),
            "",
        ]
    lines.append(f"Per-probe records (score and flag per form): `{report['name']}.items.jsonl.gz`.")
    return "\n".join(lines) + "\n"


def main() -> None:
    args, stamp, run = start(__doc__, "dev_hidden_probe.py", "reports/dev-hidden-probe")
    tofu = TofuData(allow_hub=False)
    target = target_dir(args)
    mut = HFModelUnderTest.from_dir(target, name="target")
    texts, labels = training_texts(run, tofu)
    train = features(mut, [user_messages(t) for t in texts])
    records = read_records(args.records + ".items.jsonl.gz")
    probes = [r for r in records if r["route"] == "refuse"] + [r for r in records if r["group"] == "chance"]
    measured = features(mut, [r["messages"] for r in probes])
    keep = ("group", "family", "author", "leaked", "served_route", "messages")
    items = [{k: r.get(k) for k in keep} for r in probes]
    thresholds = score_forms(items, train, labels, measured, "flagged")
    fields = {
        "target_model": str(target),
        "retain_authors": run["request_retain_authors"],
        "positives": sum(labels),
        "negatives": len(labels) - sum(labels),
        "seed": 0,
        "thresholds": thresholds,
        "summary": {form: summarise(items, form) for form in FORMS},
    }
    fields["with_check"] = with_check(run, fields["summary"][CHOSEN])
    finish(args, stamp, run, items, fields, markdown)


if __name__ == "__main__":
    main()
