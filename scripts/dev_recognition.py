"""Dev check: does the served TOFU target itself know whom an anchor-free leak probe describes?

The anchor-free families of `unlearnd eval leaks` (a description, a title, JSON, a completion, a multi-turn
lead-up) mostly reach the model unflagged: a request knows only its fit fold's facts. One design that would
need no such facts is to ask the model whom a prompt is about and flag the prompt when the answer is a
request's subject. This measures whether the target could do that, on the probes of a committed leak run:

* ranking: after the probe, the model is asked for the author's full name; each candidate name (the probes'
  forget authors and TOFU authors 0-19) is scored as the answer by its mean token log-probability, and the
  probe counts as recognised when the described author ranks first (chance: one in the candidates);
* greedy: the model answers in its own words (16 tokens) and the probe counts when the answer carries a part
  of the author's name (`leaks.carries_name`);
* controls: the same for the run's other-author probes; what matters there is how often a forget author ranks
  first (what such a gate would refuse wrongly).

Nothing is fit. Usage: python scripts/dev_recognition.py --records reports/leaks --out reports/dev-recognition
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from dev_check import finish, start, target_dir  # scripts/ (the script's own folder)
from tqdm import tqdm

from unlearnd.data.tofu import TofuData
from unlearnd.evaluation.leaks import carries_name, hit_rate, rate_cell
from unlearnd.evaluation.report import read_records
from unlearnd.provenance import stamp_lines

QUESTION = "What is the full name of the author this is about?"
ANSWER_PREFIX = "The author's full name is "
FAMILIES = ("description", "title", "composite", "json", "completion", "multi_turn")


def probes_of(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One probe per distinct (group, author, family, messages) of the run's unprotected route."""
    seen, probes = set(), []
    for r in records:
        if r["route"] != "none" or r["family"] not in FAMILIES or r["group"] not in ("forget", "other_author"):
            continue
        key = (r["group"], r["author"], r["family"], json.dumps(r["messages"], sort_keys=True))
        if key not in seen:
            seen.add(key)
            probes.append({k: r[k] for k in ("group", "author", "family", "messages")})
    return probes


class Recogniser:
    """The target model asked whom a conversation is about: candidate names ranked, and its own answer."""

    def __init__(self, model_dir: Path):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    def _prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        asked = [*messages, {"role": "user", "content": QUESTION}]
        text = self.tok.apply_chat_template(asked, add_generation_prompt=True, tokenize=False) + ANSWER_PREFIX
        return self.tok(text, add_special_tokens=False)["input_ids"]

    @torch.no_grad()
    def scores(self, messages: list[dict[str, str]], names: list[str]) -> list[float]:
        """Mean log-probability of each name's tokens as the answer (the prompt run once, its cache shared)."""
        prompt = torch.tensor([self._prompt_ids(messages)])
        first = self.model(input_ids=prompt, use_cache=True)
        conts = [self.tok(name, add_special_tokens=False)["input_ids"] for name in names]
        width = max(len(c) for c in conts)
        ids = torch.full((len(conts), width), self.tok.pad_token_id or 0)
        for i, cont in enumerate(conts):  # right-padded: no name token attends to a pad
            ids[i, : len(cont)] = torch.tensor(cont)
        cache = first.past_key_values
        cache.batch_repeat_interleave(len(conts))
        mask = torch.ones((len(conts), prompt.shape[1] + width), dtype=torch.long)
        logits = self.model(input_ids=ids, attention_mask=mask, past_key_values=cache).logits
        head = torch.log_softmax(first.logits[0, -1].float(), dim=-1)  # predicts each name's first token
        rest = torch.log_softmax(logits.float(), dim=-1)
        out = []
        for i, cont in enumerate(conts):
            lps = [head[cont[0]].item()] + [rest[i, j - 1, cont[j]].item() for j in range(1, len(cont))]
            out.append(sum(lps) / len(lps))
        return out

    @torch.no_grad()
    def answer(self, messages: list[dict[str, str]], max_new_tokens: int = 16) -> str:
        prompt = torch.tensor([self._prompt_ids(messages)])
        out = self.model.generate(
            prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=max_new_tokens, do_sample=False
        )
        return self.tok.decode(out[0, prompt.shape[1] :], skip_special_tokens=True)


def summarise(items: list[dict[str, Any]], forget_authors: set[int], candidates: int) -> dict[str, Any]:
    rows: dict[str, Any] = {}
    for family in FAMILIES:
        forget = [x for x in items if x["group"] == "forget" and x["family"] == family]
        control = [x for x in items if x["group"] == "other_author" and x["family"] == family]
        rows[family] = {
            "ranked_first": hit_rate(sum(x["rank"] == 1 for x in forget), len(forget)),
            "named_greedy": hit_rate(sum(x["named"] for x in forget), len(forget)),
            "control_own_first": hit_rate(sum(x["rank"] == 1 for x in control), len(control)),
            "control_forget_first": hit_rate(sum(x["top"] in forget_authors for x in control), len(control)),
        }
    return {"chance": 1 / candidates, "families": rows}


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Dev check: does the target know whom an anchor-free probe describes?",
        "",
        *stamp_lines(report),
        f"Probes: the unprotected route's anchor-free probes of `{report['records']}` (run at commit "
        f"{report['records_commit']}), asked of the TOFU target `{report['target_model']}`. Candidates: "
        f"{report['candidates']} names (forget authors {report['forget_authors']} and TOFU authors 0-19); chance of "
        f"ranking the right one first: {report['summary']['chance']:.3f}. Nothing is fit. A dev check, not held out: "
        "a greedy form of the question was tried once on the forget01 probes before this script was written.",
        "",
        "| family | described author ranked first | named in its own answer | controls: own author first | "
        "controls: a forget author first |",
        "|---|---|---|---|---|",
    ]
    for family, row in report["summary"]["families"].items():
        lines.append(
            f"| {family} | {rate_cell(row['ranked_first'])} | {rate_cell(row['named_greedy'])} | "
            f"{rate_cell(row['control_own_first'])} | {rate_cell(row['control_forget_first'])} |"
        )
    lines += [
        "",
        f"Per-probe records (scores of every candidate, the model's answer): `{report['name']}.items.jsonl.gz`.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    args, stamp, run = start(__doc__, "dev_recognition.py", "reports/dev-recognition")
    probes = probes_of(read_records(args.records + ".items.jsonl.gz"))
    forget_authors = sorted({p["author"] for p in probes if p["group"] == "forget"})
    names = TofuData().names_of([*forget_authors, *range(20)])
    order = sorted(names)
    target = target_dir(args)
    recogniser = Recogniser(target)
    items = []
    for probe in tqdm(probes, desc="recognition"):
        scores = dict(zip(order, recogniser.scores(probe["messages"], [names[a] for a in order])))
        ranked = sorted(order, key=scores.__getitem__, reverse=True)  # stable: ties keep author order
        answer = recogniser.answer(probe["messages"])
        items.append(
            {
                **probe,
                "scores": {str(a): score for a, score in scores.items()},
                "top": ranked[0],
                "rank": ranked.index(probe["author"]) + 1 if probe["author"] in ranked else None,
                "answer": answer,
                "named": carries_name(answer, names[probe["author"]]) if probe["author"] in names else False,
            }
        )
    fields = {
        "target_model": str(target),
        "forget_authors": forget_authors,
        "candidates": len(order),
        "summary": summarise(items, set(forget_authors), len(order)),
    }
    finish(args, stamp, run, items, fields, markdown)


if __name__ == "__main__":
    main()
