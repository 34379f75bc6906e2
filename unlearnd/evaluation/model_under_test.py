"""The model under test: one interface, so every method is measured the same way.

Two kinds implement it:

* `HFModelUnderTest` - a model loaded in this process (target, retain, weight-changing baselines).
* `ServedModelUnderTest` - the served pipeline over HTTP (guardrail methods). Its numbers are what
  users get: generations come from `/v1/chat/completions` at temperature 0 and scores from
  `/v1/unlearning/score`, i.e. after the detector, router and intervention have acted on the prompt.

Both score a continuation's tokens given chat messages (the chat template with the generation
prompt, as the server renders it) and generate greedily. Only the in-process kind can report
teacher-forced argmax hits, so extraction strength is reported for it alone.
"""

from __future__ import annotations

import abc
import logging
import math
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import torch
from tqdm.auto import tqdm

from unlearnd.client import ServerError, UnlearndClient
from unlearnd.models import load_causal_lm
from unlearnd.prompting import Message, chat_prompt_ids, stop_ids
from unlearnd.train.data import pad_id_of

log = logging.getLogger(__name__)
NO_ROUTE = "n/a"  # a reply whose server sent no x-unlearnd-route (not unlearnd): kept so routes stay aligned


@dataclass
class Scored:
    """Log-probabilities of one continuation's tokens given a prompt."""

    logprobs: list[float]
    tokens: list[str] = field(default_factory=list)
    greedy_hits: list[bool] | None = None  # argmax == the token, teacher-forced (in-process only)
    route: str | None = None  # served only: which route of the pipeline handled the prompt
    matched_request_ids: list[str] = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.logprobs)

    @property
    def mean_logprob(self) -> float:
        """Length-normalised log-probability: log P(a|q)/|a| (nan when nothing was scored)."""
        finite = [lp for lp in self.logprobs if lp is not None]
        if not finite:
            return math.nan
        return sum(finite) / len(finite)


class ModelUnderTest(abc.ABC):
    """What a metric may ask of a model: score continuations and generate greedily."""

    name: str
    kind: str

    @abc.abstractmethod
    def score(
        self, prompts: Sequence[Sequence[Message]], continuations: Sequence[Sequence[str]], desc: str = "score"
    ) -> list[list[Scored]]:
        """For each prompt, score each of its continuations (TOFU scores up to 7 answers per question)."""

    @abc.abstractmethod
    def generate(
        self, prompts: Sequence[Sequence[Message]], max_new_tokens: int = 128, desc: str = "generate"
    ) -> list[str]:
        """Greedy completion of each prompt (the assistant's reply text, special tokens stripped)."""

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind}


# --------------------------------------------------------------------------- in-process


class HFModelUnderTest(ModelUnderTest):
    """A causal LM in this process. Shared-prefix scoring: the prompt runs once, its KV cache is
    repeated for all continuations of that prompt (TOFU's 7 answers per question cost ~half)."""

    kind = "hf"

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        name: str = "model",
        batch_size: int = 16,
        gen_batch_size: int = 16,
        max_length: int = 512,
    ):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.batch_size = batch_size
        self.gen_batch_size = gen_batch_size
        self.max_length = max_length
        self.pad_id = pad_id_of(tokenizer)
        self.stop_ids = stop_ids(tokenizer)

    @classmethod
    def from_dir(
        cls, path: str | Path, name: str | None = None, dtype: torch.dtype = torch.float32, **kwargs: Any
    ) -> HFModelUnderTest:
        model, tokenizer = load_causal_lm(path, dtype)
        return cls(model, tokenizer, name=name or Path(path).name, **kwargs)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "parameters": sum(p.numel() for p in self.model.parameters())}

    # -- scoring

    def _continuation_ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _scored(self, ids: list[int], logits: torch.Tensor) -> Scored:
        """`logits[i]` predicts `ids[i]`."""
        logp = torch.log_softmax(logits.float(), dim=-1)
        target = torch.tensor(ids, dtype=torch.long)
        token_lp = logp.gather(1, target[:, None]).squeeze(1)
        hits = (logits.argmax(-1) == target).tolist()
        return Scored(logprobs=token_lp.tolist(), tokens=self.tokenizer.convert_ids_to_tokens(ids), greedy_hits=hits)

    def _decoder_and_head(self) -> tuple[torch.nn.Module | None, torch.nn.Module | None]:
        decoder = getattr(self.model, getattr(self.model, "base_model_prefix", "model"), None)
        head = self.model.get_output_embeddings()
        return decoder, head

    @torch.no_grad()
    def _score_shared_prefix(self, prompt: list[int], conts: list[list[int]]) -> list[Scored]:
        from transformers import DynamicCache

        prefix = torch.tensor([prompt])
        out = self.model(input_ids=prefix, use_cache=True, past_key_values=DynamicCache(), logits_to_keep=1)
        first_logits = out.logits[0, -1]
        results: list[Scored | None] = [None] * len(conts)
        nonempty = [i for i, c in enumerate(conts) if c]
        for i, c in enumerate(conts):
            if not c:
                results[i] = Scored(logprobs=[], tokens=[], greedy_hits=[])
        for start in range(0, len(nonempty), self.batch_size):
            rows = nonempty[start : start + self.batch_size]
            width = max(len(conts[i]) for i in rows)
            ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(rows), len(prompt) + width), dtype=torch.long)
            mask[:, : len(prompt)] = 1
            for r, i in enumerate(rows):
                ids[r, : len(conts[i])] = torch.tensor(conts[i])
                mask[r, len(prompt) : len(prompt) + len(conts[i])] = 1
            cache = _repeat_cache(out.past_key_values, len(rows))
            logits = self.model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True).logits
            for r, i in enumerate(rows):
                n = len(conts[i])
                # position 0 of the continuation is predicted by the prompt's last logits
                step_logits = torch.cat([first_logits[None], logits[r, : n - 1]], dim=0)
                results[i] = self._scored(conts[i], step_logits)
        return [r for r in results if r is not None]

    @torch.no_grad()
    def _score_flat(self, pairs: list[tuple[list[int], list[int]]]) -> list[Scored]:
        """Many single-continuation prompts in right-padded batches; the LM head runs on answer positions only."""
        decoder, head = self._decoder_and_head()
        results: list[Scored] = []
        for start in range(0, len(pairs), self.batch_size):
            chunk = pairs[start : start + self.batch_size]
            width = max(len(p) + len(c) for p, c in chunk)
            ids = torch.full((len(chunk), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for r, (p, c) in enumerate(chunk):
                ids[r, : len(p) + len(c)] = torch.tensor(p + c)
                mask[r, : len(p) + len(c)] = 1
            if decoder is not None and head is not None:
                hidden = decoder(input_ids=ids, attention_mask=mask).last_hidden_state
                for r, (p, c) in enumerate(chunk):
                    if not c:
                        results.append(Scored(logprobs=[], tokens=[], greedy_hits=[]))
                        continue
                    positions = slice(len(p) - 1, len(p) + len(c) - 1)
                    results.append(self._scored(c, head(hidden[r, positions])))
            else:  # pragma: no cover - models without a separable head
                logits = self.model(input_ids=ids, attention_mask=mask).logits
                for r, (p, c) in enumerate(chunk):
                    results.append(self._scored(c, logits[r, len(p) - 1 : len(p) + len(c) - 1]))
        return results

    def score(
        self, prompts: Sequence[Sequence[Message]], continuations: Sequence[Sequence[str]], desc: str = "score"
    ) -> list[list[Scored]]:
        if len(prompts) != len(continuations):
            raise ValueError("one list of continuations per prompt")
        prompt_ids = [chat_prompt_ids(self.tokenizer, p) for p in prompts]
        cont_ids = [[self._continuation_ids(c)[: self.max_length] for c in conts] for conts in continuations]
        out: list[list[Scored] | None] = [None] * len(prompts)
        singles = [i for i, c in enumerate(cont_ids) if len(c) == 1]
        groups = [i for i, c in enumerate(cont_ids) if len(c) != 1]
        bar = tqdm(total=len(prompts), desc=f"{self.name}: {desc}", leave=False)
        singles.sort(key=lambda i: len(prompt_ids[i]) + len(cont_ids[i][0]))
        for start in range(0, len(singles), self.batch_size):
            chunk = singles[start : start + self.batch_size]
            scored = self._score_flat([(prompt_ids[i], cont_ids[i][0]) for i in chunk])
            for i, s in zip(chunk, scored):
                out[i] = [s]
            bar.update(len(chunk))
        for i in groups:
            out[i] = self._score_shared_prefix(prompt_ids[i], cont_ids[i]) if cont_ids[i] else []
            bar.update(1)
        bar.close()
        return [o if o is not None else [] for o in out]

    # -- generation

    @torch.no_grad()
    def generate(
        self, prompts: Sequence[Sequence[Message]], max_new_tokens: int = 128, desc: str = "generate"
    ) -> list[str]:
        encoded = [chat_prompt_ids(self.tokenizer, p) for p in prompts]
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
        texts: list[str] = [""] * len(encoded)
        for start in tqdm(range(0, len(order), self.gen_batch_size), desc=f"{self.name}: {desc}", leave=False):
            rows = order[start : start + self.gen_batch_size]
            width = max(len(encoded[i]) for i in rows)
            ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for r, i in enumerate(rows):  # left padding: every row's last prompt token is aligned
                ids[r, width - len(encoded[i]) :] = torch.tensor(encoded[i])
                mask[r, width - len(encoded[i]) :] = 1
            generated = self.model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=self.stop_ids,
                pad_token_id=self.pad_id,
                temperature=None,
                top_p=None,
                top_k=None,
            )
            for r, i in enumerate(rows):
                new = generated[r, width:].tolist()
                for stop in self.stop_ids:
                    if stop in new:
                        new = new[: new.index(stop)]
                texts[i] = self.tokenizer.decode(new, skip_special_tokens=True).strip()
        return texts


def _repeat_cache(cache: Any, n: int) -> Any:
    """A copy of a one-row KV cache repeated to `n` rows (the prompt's cache is reused per chunk)."""
    import copy

    repeated = copy.deepcopy(cache)
    repeated.batch_repeat_interleave(n)
    return repeated


# --------------------------------------------------------------------------- served over HTTP


class ServedModelUnderTest(ModelUnderTest):
    """The served pipeline over its OpenAI-compatible API plus the unlearning scoring endpoint."""

    kind = "served"

    def __init__(
        self,
        base_url: str,
        name: str = "served",
        api_key: str | None = None,
        admin_key: str | None = None,
        model: str | None = None,
        concurrency: int = 4,
        timeout_s: float = 120.0,
        retries: int = 2,
        transport: httpx.BaseTransport | None = None,
        route_from: str = "prompt",
    ):
        """`route_from`: what the server's detector reads to route a scored item: "prompt" (the question
        alone, as a user sends it; the default) or "prompt+continuation" (the gold answer too)."""
        self.name = name
        self.model = model
        self.route_from = route_from
        self.concurrency = max(1, concurrency)
        self.client = UnlearndClient(
            base_url, api_key=api_key, admin_key=admin_key, timeout_s=timeout_s, retries=retries, transport=transport
        )
        self.base_url = self.client.base_url
        self.routes: list[str] = []  # route of each scored prompt
        self.generation_routes: list[str] = []  # x-unlearnd-route of each chat completion, in prompt order

    def close(self) -> None:
        self.client.close()

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "base_url": self.base_url,
            "model": self.model,
            "score_route_from": self.route_from,
        }

    def served_model_name(self) -> str:
        """The `model` the chat API wants: given, else the first of GET /v1/models."""
        if not self.model:
            models = self.client.models()
            if not models:
                raise ServerError("GET /v1/models listed no model")
            self.model = models[0]
        return self.model

    def _map(self, fn: Any, items: list[Any], desc: str) -> list[Any]:
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return list(tqdm(pool.map(fn, items), total=len(items), desc=f"{self.name}: {desc}", leave=False))

    def score_one(self, messages: Sequence[Message], continuation: str) -> Scored:
        data = self.client.score(continuation, messages=messages, model=self.model, route_from=self.route_from)
        logprobs = [(-math.inf if lp is None else float(lp)) for lp in data.get("token_logprobs", [])]
        return Scored(
            logprobs=logprobs,
            tokens=list(data.get("tokens", [])),
            greedy_hits=None,
            route=data.get("route"),
            matched_request_ids=list(data.get("matched_request_ids", [])),
        )

    def score(
        self, prompts: Sequence[Sequence[Message]], continuations: Sequence[Sequence[str]], desc: str = "score"
    ) -> list[list[Scored]]:
        if len(prompts) != len(continuations):
            raise ValueError("one list of continuations per prompt")
        flat = [(i, p, c) for i, (p, conts) in enumerate(zip(prompts, continuations)) for c in conts]
        scored = self._map(lambda t: self.score_one(t[1], t[2]), flat, desc)
        out: list[list[Scored]] = [[] for _ in prompts]
        for (i, _, _), s in zip(flat, scored):
            out[i].append(s)
            if s.route is not None:
                self.routes.append(s.route)
        return out

    def generate_one(self, messages: Sequence[Message], max_new_tokens: int) -> tuple[str, str]:
        """One chat completion at temperature 0: its text and its route (`x-unlearnd-route`)."""
        data, headers = self.client.chat(self.served_model_name(), messages, temperature=0, max_tokens=max_new_tokens)
        route = headers.get("x-unlearnd-route") or NO_ROUTE
        try:
            return str(data["choices"][0]["message"]["content"] or "").strip(), route
        except (KeyError, IndexError, TypeError) as exc:
            raise ServerError(f"unexpected chat completion payload: {str(data)[:300]}") from exc

    def generate(
        self, prompts: Sequence[Sequence[Message]], max_new_tokens: int = 128, desc: str = "generate"
    ) -> list[str]:
        """Replies in the order of `prompts`; their routes join `generation_routes` in the same order (the calls
        run concurrently and finish in any order: each route stays with its own prompt)."""
        done = self._map(lambda p: self.generate_one(p, max_new_tokens), list(prompts), desc)
        self.generation_routes.extend(route for _, route in done)
        return [text for text, _ in done]

    # -- forget requests (admin)

    def register(self, spec: dict[str, Any]) -> str:
        """POST a forget request; returns its id."""
        return str(self.client.add_request(spec)["id"])

    def wait_active(
        self, request_id: str, timeout_s: float = 1800.0, poll_s: float = 2.0, sleep: Any = time.sleep
    ) -> dict[str, Any]:
        return self.client.wait_active(request_id, timeout_s, poll_s, sleep)

    def deactivate(self, request_id: str) -> None:
        self.client.remove_request(request_id)
