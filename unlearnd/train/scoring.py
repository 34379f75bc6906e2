"""How likely a model finds an answer, and whether its generations are fluent: the numbers the
intervention jobs tune toward and report.

The answer-probability metric (TOFU's "forget probability", P(a|q)^(1/|a|)) accepts any
`embed_fn`, so ECO can score corrupted prompt embeddings and SPUL prompts with virtual tokens
through the same code. The LM head runs only on positions that predict an answer token: on a 49k
vocabulary it is a fifth of a small model's compute otherwise spent on the prompt.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from tqdm.auto import tqdm

from unlearnd.prompting import stop_ids
from unlearnd.train.data import IGNORE_INDEX, EncodedQA, collate, pad_id_of


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def answer_logits(
    model: torch.nn.Module,
    labels: torch.Tensor,
    attention_mask: torch.Tensor,
    input_ids: torch.Tensor | None = None,
    inputs_embeds: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits ([N, V], float32) at the N positions that predict a labelled token, those tokens ([N])
    and their row in the batch ([N]). The decoder body runs on ids or embeddings; the LM head only
    on the N positions."""
    inputs = {"input_ids": input_ids} if inputs_embeds is None else {"inputs_embeds": inputs_embeds}
    shifted = labels[:, 1:]
    where = shifted != IGNORE_INDEX
    rows = torch.arange(labels.shape[0], device=labels.device).unsqueeze(1).expand_as(shifted)[where]
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if decoder is not None and head is not None and decoder is not model:
        hidden = decoder(**inputs, attention_mask=attention_mask).last_hidden_state
        return head(hidden[:, :-1][where]).float(), shifted[where], rows
    logits = model(**inputs, attention_mask=attention_mask).logits  # pragma: no cover - no separable head
    return logits[:, :-1][where].float(), shifted[where], rows


def target_logprobs(
    model, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-target-token log-probs ([N]) and their row index ([N])."""
    logits, targets, rows = answer_logits(model, labels, attention_mask, inputs_embeds=inputs_embeds)
    return torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1), rows


def target_logits(
    model, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits ([N, V]) at the positions predicting target tokens, and those targets ([N])."""
    logits, targets, _ = answer_logits(model, labels, attention_mask, inputs_embeds=inputs_embeds)
    return logits, targets


def mean_per_row(values: torch.Tensor, rows: torch.Tensor, n_rows: int) -> torch.Tensor:
    sums = torch.zeros(n_rows, dtype=values.dtype, device=values.device).index_add_(0, rows, values)
    counts = torch.zeros(n_rows, dtype=values.dtype, device=values.device).index_add_(0, rows, torch.ones_like(values))
    return sums / counts.clamp_min(1)


EmbedFn = Callable[[dict[str, torch.Tensor], list[EncodedQA]], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def plain_embeds(model) -> EmbedFn:
    """The default `embed_fn`: the model's own embedding lookup of the batch ids."""

    def fn(batch: dict[str, torch.Tensor], items: list[EncodedQA]):
        return model.get_input_embeddings()(batch["input_ids"]), batch["attention_mask"], batch["labels"]

    return fn


@torch.no_grad()
def answer_probability(
    model,
    tokenizer,
    items: list[EncodedQA],
    batch_size: int = 8,
    embed_fn: EmbedFn | None = None,
    progress: bool = False,
    desc: str = "P(a|q)",
) -> list[float]:
    """TOFU's length-normalised answer probability P(a|q)^(1/|a|), one value per item.

    `embed_fn(batch, items) -> (inputs_embeds, attention_mask, labels)` lets the caller change
    the prompt embeddings (corrupt them, prepend a soft prompt) before the forward pass."""
    device = next(model.parameters()).device
    embed_fn = embed_fn or plain_embeds(model)
    pad_id = pad_id_of(tokenizer)
    values: list[float] = []
    chunks = [items[i : i + batch_size] for i in range(0, len(items), batch_size)]
    for chunk in tqdm(chunks, desc=desc, disable=not progress, leave=False):
        batch = to_device(collate(chunk, pad_id), device)
        embeds, mask, labels = embed_fn(batch, chunk)
        logp, rows = target_logprobs(model, embeds, mask, labels)
        values += torch.exp(mean_per_row(logp, rows, len(chunk))).tolist()
    return values


def mean(values: Iterable[float]) -> float:
    values = list(values)
    return float(sum(values) / len(values)) if values else math.nan


# -- fluency ----------------------------------------------------------------------------------


@torch.no_grad()
def greedy_generate(model, embeds: torch.Tensor, max_new_tokens: int, eos_ids: list[int]) -> list[int]:
    """Greedy decoding from prompt embeddings ([T, H]) with a KV cache (one prompt at a time, so
    no padding is involved)."""
    out = model(inputs_embeds=embeds.unsqueeze(0), use_cache=True)
    past, generated = out.past_key_values, []
    next_id = int(out.logits[0, -1].argmax())
    for _ in range(max_new_tokens):
        if next_id in eos_ids:
            break
        generated.append(next_id)
        step = model.get_input_embeddings()(torch.tensor([[next_id]], device=embeds.device))
        out = model(inputs_embeds=step, past_key_values=past, use_cache=True)
        past = out.past_key_values
        next_id = int(out.logits[0, -1].argmax())
    return generated


def text_stats(text: str, token_ids: list[int]) -> dict[str, float]:
    """Cheap gibberish signals: share of non-ASCII characters and of repeated token 3-grams."""
    non_ascii = sum(1 for c in text if ord(c) > 127) / max(len(text), 1)
    grams = [tuple(token_ids[i : i + 3]) for i in range(max(len(token_ids) - 2, 0))]
    repetition = 1.0 - len(set(grams)) / len(grams) if grams else 0.0
    return {"non_ascii": non_ascii, "repetition": repetition}


@torch.no_grad()
def fluency_report(
    model,
    tokenizer,
    items: list[EncodedQA],
    embeds_of: Callable[[EncodedQA], torch.Tensor],
    max_new_tokens: int,
    max_ppl: float,
    max_non_ascii: float,
    max_repetition: float,
    progress: bool = False,
) -> dict:
    """Generate greedily under the intervention and judge the text with the *clean* model: its
    perplexity given the clean prompt (gibberish scores very high), plus non-ASCII and
    repetition rates. The same is measured for the clean generations as a reference."""
    eos = stop_ids(tokenizer)
    samples, judged, clean_judged = [], [], []
    for item in tqdm(items, desc="fluency", disable=not progress, leave=False):
        ids = torch.tensor(item.prompt_ids, device=next(model.parameters()).device)
        clean_emb = model.get_input_embeddings()(ids)
        for kind, emb in (("intervened", embeds_of(item)), ("clean", clean_emb)):
            gen = greedy_generate(model, emb, max_new_tokens, eos)
            text = tokenizer.decode(gen, skip_special_tokens=True)
            stats = text_stats(text, gen)
            if gen:
                scored = EncodedQA(item.question, item.prompt_ids, gen)
                stats["ppl"] = 1.0 / answer_probability(model, tokenizer, [scored], batch_size=1)[0]
            else:
                stats["ppl"] = math.nan
            (judged if kind == "intervened" else clean_judged).append(stats)
            if kind == "intervened":
                samples.append({"question": item.question, "output": text, **stats})

    def agg(rows: list[dict]) -> dict[str, float]:
        return {k: mean(r[k] for r in rows if not math.isnan(r[k])) for k in ("ppl", "non_ascii", "repetition")}

    intervened, clean = agg(judged), agg(clean_judged)
    fluent = (
        not math.isnan(intervened["ppl"])
        and intervened["ppl"] <= max_ppl
        and intervened["non_ascii"] <= max_non_ascii
        and intervened["repetition"] <= max_repetition
    )
    return {
        "fluent": bool(fluent),
        "intervened": intervened,
        "clean": clean,
        "thresholds": {"max_ppl": max_ppl, "max_non_ascii": max_non_ascii, "max_repetition": max_repetition},
        "samples": samples,
    }
