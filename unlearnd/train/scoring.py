"""Shared pieces of the intervention jobs: model loading, prompt rendering, QA batches, the
answer-probability metric and a cheap fluency check.

The answer-probability metric (TOFU's "forget probability", P(a|q)^(1/|a|)) lives here privately
until the shared metrics module exists; it accepts any `embed_fn`, so ECO can score corrupted
prompt embeddings and SPUL prompts with virtual tokens through the same code.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from unlearnd.train import data
from unlearnd.registry import ForgetSpec, QAExample


log = logging.getLogger(__name__)

# Non-answers the forget set is relabelled to (TOFU's "I don't know" style targets).
REFUSALS = (
    "I'm not sure about that.",
    "I don't know the answer to that.",
    "I'm sorry, but I don't have information about that.",
    "I have no knowledge of that.",
    "That's not something I know about.",
    "I'm afraid I can't answer that; I don't know.",
    "I don't have any information on that topic.",
    "I'm not familiar with that.",
)

Heartbeat = Callable[[], None] | None


def pick_device(device: str | None) -> torch.device:
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_model(model_path: str | Path, device: torch.device, dtype: torch.dtype = torch.float32):
    """A frozen HF causal LM and its tokenizer (float32 on CPU: bf16 matmuls are slow there)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_path))
    model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=dtype).to(device)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, tokenizer


def render_question(tokenizer, question: str) -> str:
    """The prompt text the server renders for a one-turn chat with this question."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                             add_generation_prompt=True)
    return question + "\n"


def end_of_turn_ids(tokenizer) -> list[int]:
    return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []


@dataclass
class QAItem:
    """One tokenised example: the rendered prompt and the target continuation."""

    question: str
    prompt: str
    prompt_ids: list[int]
    target_ids: list[int]


def encode_qa(tokenizer, question: str, answer: str, max_len: int, end_of_turn: bool) -> QAItem:
    """Prompt ids (as the chat pipeline tokenises them) + answer ids; the prompt is truncated on
    the left if the pair is too long, keeping the question's end and the whole answer."""
    prompt = render_question(tokenizer, question)
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
    target_ids = tokenizer.encode(answer, add_special_tokens=False)
    if end_of_turn:
        target_ids = target_ids + end_of_turn_ids(tokenizer)
    target_ids = target_ids[: max(1, max_len // 2)]
    overflow = len(prompt_ids) + len(target_ids) - max_len
    if overflow > 0:
        prompt_ids = prompt_ids[overflow:]
    return QAItem(question, prompt, prompt_ids, target_ids)


def collate(items: list[QAItem], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input_ids / attention_mask / labels (-100 outside the targets)."""
    length = max(len(i.prompt_ids) + len(i.target_ids) for i in items)
    ids = torch.full((len(items), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(items), length), dtype=torch.long)
    labels = torch.full((len(items), length), -100, dtype=torch.long)
    for row, item in enumerate(items):
        seq = item.prompt_ids + item.target_ids
        ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
        labels[row, len(item.prompt_ids): len(seq)] = torch.tensor(item.target_ids)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


pad_id_of = data.pad_id_of  # one definition, shared with the baselines' data pipeline


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def target_logprobs(model, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor,
                    labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-target-token log-probs ([N]) and their row index ([N]).

    Runs the decoder body on the embeddings and the LM head only on positions that predict a
    target token: on a 49k vocabulary the head is a fifth of the compute otherwise spent."""
    hidden = model.get_decoder()(inputs_embeds=inputs_embeds, attention_mask=attention_mask).last_hidden_state
    shifted = labels[:, 1:]
    where = shifted != -100
    logits = model.get_output_embeddings()(hidden[:, :-1][where]).float()
    logp = torch.log_softmax(logits, dim=-1).gather(-1, shifted[where].unsqueeze(-1)).squeeze(-1)
    rows = torch.arange(labels.shape[0], device=labels.device).unsqueeze(1).expand_as(shifted)[where]
    return logp, rows


def target_logits(model, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor,
                  labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits ([N, V]) at the positions predicting target tokens, and those targets ([N])."""
    hidden = model.get_decoder()(inputs_embeds=inputs_embeds, attention_mask=attention_mask).last_hidden_state
    shifted = labels[:, 1:]
    where = shifted != -100
    return model.get_output_embeddings()(hidden[:, :-1][where]).float(), shifted[where]


def mean_per_row(values: torch.Tensor, rows: torch.Tensor, n_rows: int) -> torch.Tensor:
    sums = torch.zeros(n_rows, dtype=values.dtype, device=values.device).index_add_(0, rows, values)
    counts = torch.zeros(n_rows, dtype=values.dtype, device=values.device).index_add_(0, rows, torch.ones_like(values))
    return sums / counts.clamp_min(1)


EmbedFn = Callable[[dict[str, torch.Tensor], list[QAItem]], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def plain_embeds(model) -> EmbedFn:
    """The default `embed_fn`: the model's own embedding lookup of the batch ids."""
    def fn(batch: dict[str, torch.Tensor], items: list[QAItem]):
        return model.get_input_embeddings()(batch["input_ids"]), batch["attention_mask"], batch["labels"]
    return fn


@torch.no_grad()
def answer_probability(model, tokenizer, items: list[QAItem], batch_size: int = 8,
                       embed_fn: EmbedFn | None = None, progress: bool = False,
                       heartbeat: Heartbeat = None, desc: str = "P(a|q)") -> list[float]:
    """TOFU's length-normalised answer probability P(a|q)^(1/|a|), one value per item.

    `embed_fn(batch, items) -> (inputs_embeds, attention_mask, labels)` lets the caller change
    the prompt embeddings (corrupt them, prepend a soft prompt) before the forward pass."""
    device = next(model.parameters()).device
    embed_fn = embed_fn or plain_embeds(model)
    pad_id = pad_id_of(tokenizer)
    values: list[float] = []
    chunks = [items[i: i + batch_size] for i in range(0, len(items), batch_size)]
    for chunk in tqdm(chunks, desc=desc, disable=not progress, leave=False):
        batch = to_device(collate(chunk, pad_id), device)
        embeds, mask, labels = embed_fn(batch, chunk)
        logp, rows = target_logprobs(model, embeds, mask, labels)
        values += torch.exp(mean_per_row(logp, rows, len(chunk))).tolist()
        if heartbeat:
            heartbeat()
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
    grams = [tuple(token_ids[i: i + 3]) for i in range(max(len(token_ids) - 2, 0))]
    repetition = 1.0 - len(set(grams)) / len(grams) if grams else 0.0
    return {"non_ascii": non_ascii, "repetition": repetition}


@torch.no_grad()
def fluency_report(model, tokenizer, items: list[QAItem], embeds_of: Callable[[QAItem], torch.Tensor],
                   max_new_tokens: int, max_ppl: float, max_non_ascii: float, max_repetition: float,
                   progress: bool = False, heartbeat: Heartbeat = None) -> dict:
    """Generate greedily under the intervention and judge the text with the *clean* model: its
    perplexity given the clean prompt (gibberish scores very high), plus non-ASCII and
    repetition rates. The same is measured for the clean generations as a reference."""
    eos = list({i for i in [tokenizer.eos_token_id, *end_of_turn_ids(tokenizer)] if i is not None})
    samples, judged, clean_judged = [], [], []
    for item in tqdm(items, desc="fluency", disable=not progress, leave=False):
        ids = torch.tensor(item.prompt_ids, device=next(model.parameters()).device)
        clean_emb = model.get_input_embeddings()(ids)
        for kind, emb in (("intervened", embeds_of(item)), ("clean", clean_emb)):
            gen = greedy_generate(model, emb, max_new_tokens, eos)
            text = tokenizer.decode(gen, skip_special_tokens=True)
            stats = text_stats(text, gen)
            if gen:
                scored = QAItem(item.question, item.prompt, item.prompt_ids, gen)
                stats["ppl"] = 1.0 / answer_probability(model, tokenizer, [scored], batch_size=1)[0]
            else:
                stats["ppl"] = math.nan
            (judged if kind == "intervened" else clean_judged).append(stats)
            if kind == "intervened":
                samples.append({"question": item.question, "output": text, **stats})
        if heartbeat:
            heartbeat()

    def agg(rows: list[dict]) -> dict[str, float]:
        return {k: mean(r[k] for r in rows if not math.isnan(r[k])) for k in ("ppl", "non_ascii", "repetition")}

    intervened, clean = agg(judged), agg(clean_judged)
    fluent = (not math.isnan(intervened["ppl"]) and intervened["ppl"] <= max_ppl
              and intervened["non_ascii"] <= max_non_ascii and intervened["repetition"] <= max_repetition)
    return {"fluent": bool(fluent), "intervened": intervened, "clean": clean,
            "thresholds": {"max_ppl": max_ppl, "max_non_ascii": max_non_ascii, "max_repetition": max_repetition},
            "samples": samples}


# -- data -------------------------------------------------------------------------------------


def qa_pairs(items: list[QAExample | str]) -> list[QAExample]:
    return ForgetSpec.as_qa(items)


def subsample(items: list, n: int | None, seed: int) -> list:
    """A fixed random subset (all of them when n is None or larger than the list)."""
    if n is None or n >= len(items):
        return list(items)
    rng = random.Random(seed)
    return [items[i] for i in sorted(rng.sample(range(len(items)), n))]


def refusal_for(index: int) -> str:
    return REFUSALS[index % len(REFUSALS)]


class HeartbeatBatches:
    """Re-iterable batches for the shared Trainer that beat the worker's heartbeat once per step."""

    def __init__(self, batches: list[dict], heartbeat: Heartbeat):
        self.batches, self.heartbeat = batches, heartbeat

    def __iter__(self) -> Iterator[dict]:
        for batch in self.batches:
            if self.heartbeat:
                self.heartbeat()
            yield batch


def write_json_atomic(path: Path, payload: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    tmp.replace(path)
    return path


@dataclass
class JobStart:
    """What every intervention job starts from: its resolved preset, device, frozen model and clocks."""

    cfg: Any
    preset: str
    device: torch.device
    model: Any
    tokenizer: Any
    wall0: float = field(default_factory=time.perf_counter)
    cpu0: float = field(default_factory=time.process_time)

    def cost(self, **extra: Any) -> dict[str, Any]:
        """Wall and CPU seconds since the job started (model load included), plus `extra`."""
        return {"wall_seconds": time.perf_counter() - self.wall0, "cpu_seconds": time.process_time() - self.cpu0,
                **extra, "device": str(self.device), "preset": self.preset}


def start_job(presets: dict, preset: str, request: Any, model_path: str | Path, device: str | None,
              overrides: dict | None) -> JobStart:
    """Resolve the job's preset (request options and overrides on top), pick the device, load the model."""
    wall0, cpu0 = time.perf_counter(), time.process_time()
    cfg = resolve_preset(presets, preset, request.spec.options, overrides)
    dev = pick_device(device)
    model, tokenizer = load_model(model_path, dev, torch_dtype(cfg.dtype))
    return JobStart(cfg=cfg, preset=preset, device=dev, model=model, tokenizer=tokenizer, wall0=wall0, cpu0=cpu0)


def resolve_preset(presets: dict, name: str, options: dict | None = None, overrides: dict | None = None):
    """A named preset with the request's method options and explicit overrides applied on top
    (unknown keys are ignored: `spec.options` is shared by everything that reads a request)."""
    if name not in presets:
        raise ValueError(f"unknown preset {name!r}; known: {sorted(presets)}")
    base = presets[name]
    fields = type(base).model_fields
    updates = {k: v for k, v in {**(options or {}), **(overrides or {})}.items() if k in fields}
    return type(base).model_validate({**base.model_dump(), **updates})


def torch_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
