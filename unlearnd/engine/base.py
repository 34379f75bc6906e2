"""The one engine interface every generation goes through.

vLLM bug #51122: with LoRA enabled on Llama-family models, vLLM wraps the input embedding layer
for LoRA, and a step that mixes embedding rows with token ids (an embedding prompt's prefill
beside any other request's decode tokens; decode tokens are always ids) indexes that wrapper's
LoRA mapping with the wrong length and kills the engine. Sending *every* prompt as embeddings
does not avoid it, since decode steps are token ids. We remove the cause instead: LoRA is
restricted to the linear projections (`LORA_TARGET_MODULES`, vLLM's `lora_target_modules`), so
the embedding layer is never wrapped. Our adapters never train embeddings, so nothing is lost;
PEFT adapters that do are refused at load. Plain prompts then go in as token ids, intervened
ones as prompt embeddings from our own lookup (`EmbeddingTable`), in any mix.
"""

from __future__ import annotations

import abc
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from pydantic import BaseModel, Field

LORA_TARGET_MODULES = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
PEFT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class EngineError(RuntimeError):
    """The engine failed to serve a request (not the user's fault: maps to HTTP 5xx)."""


class SamplingSpec(BaseModel):
    """Engine-agnostic sampling parameters (validated at the API edge)."""

    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=16)
    stop: list[str] = Field(default_factory=list)
    seed: int | None = None
    logprobs: int | None = Field(None, ge=0, le=20)
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False  # vLLM extension: fixed-length outputs for benchmarks


@dataclass(frozen=True)
class LoRASpec:
    """A PEFT adapter folder served for one request; `name` is unique per adapter version."""

    name: str
    path: str


def adapter_of(name: str, request_id: str) -> bool:
    """Whether adapter `name` is one of `request_id`'s (its id, or the id and a version/scale suffix)."""
    return name == request_id or name.startswith(f"{request_id}-")


@dataclass
class EngineInput:
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingSpec
    prompt_embeds: torch.Tensor | None = None  # [T, H]; None means "plain lookup of the ids"
    lora: LoRASpec | None = None


@dataclass
class TokenLogprob:
    token: str
    logprob: float
    top_logprobs: dict[str, float] = field(default_factory=dict)


@dataclass
class ChoiceDelta:
    """New output of one choice since the previous delta of that choice."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None


class EmbeddingTable:
    """The model's input embedding matrix, loaded once from its safetensors files."""

    def __init__(self, weight: torch.Tensor):
        self.weight = weight

    @classmethod
    def from_model_dir(cls, model_dir: str | Path, dtype: torch.dtype | None = None) -> EmbeddingTable:
        from safetensors import safe_open

        model_dir = Path(model_dir)
        index = model_dir / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            candidates = {k: model_dir / v for k, v in weight_map.items()}
        else:
            files = sorted(model_dir.glob("*.safetensors"))
            candidates = {}
            for file in files:
                with safe_open(str(file), "pt") as handle:
                    candidates.update({k: file for k in handle.keys()})
        names = [k for k in candidates if k.endswith("embed_tokens.weight") or k.endswith("wte.weight")]
        if not names:
            raise EngineError(f"no input embedding matrix found in {model_dir}")
        name = sorted(names, key=len)[0]
        with safe_open(str(candidates[name]), "pt") as handle:
            weight = handle.get_tensor(name)
        return cls(weight.to(dtype) if dtype is not None else weight)

    @property
    def hidden_size(self) -> int:
        return int(self.weight.shape[1])

    def lookup(self, token_ids: list[int]) -> torch.Tensor:
        return self.weight[torch.as_tensor(token_ids, dtype=torch.long)].clone()


def read_model_config(model_dir: str | Path) -> dict:
    """A model folder's config.json ({} where there is none)."""
    path = Path(model_dir) / "config.json"
    return json.loads(path.read_text()) if path.is_file() else {}


class Engine(abc.ABC):
    """Generates from an `EngineInput`; implementations: local vLLM, remote vLLM server."""

    model_name: str
    max_model_len: int
    tokenizer: object
    embeddings: EmbeddingTable
    model_config: dict = {}  # the served model's config.json (set by `start`): what an adapter must fit

    @abc.abstractmethod
    async def start(self) -> None: ...

    @abc.abstractmethod
    async def shutdown(self) -> None: ...

    @abc.abstractmethod
    def generate(self, request: EngineInput) -> AsyncIterator[ChoiceDelta]:
        """Stream deltas of all `n` choices, interleaved, each choice ending with a finish_reason."""

    @abc.abstractmethod
    async def prompt_logprobs(self, request: EngineInput) -> list[float | None]:
        """Log-probability of each prompt token given those before it (None for the first)."""

    async def abort(self, request_id: str) -> None:  # noqa: B027 - optional
        """Stop a request whose client went away."""

    async def load_adapter(self, lora: LoRASpec) -> None:  # noqa: B027 - optional
        """Load an adapter before any request uses it (raises if the engine cannot): a broken adapter is
        then found while its forget request can still be served refused, not by a user's request."""

    async def unload_adapters(self, request_id: str) -> None:  # noqa: B027 - optional
        """Drop a request's adapters (every version and scale) from the engine: a purged or replaced
        LoRA must not stay loaded."""

    async def delete_adapters(self, request_id: str) -> None:  # noqa: B027 - optional
        """The request left the registry: delete its adapters wherever other processes could load them
        from (a folder the servers resolve adapters from), after `unload_adapters`."""

    def dead_reason(self) -> str | None:
        """Why the engine can serve nothing any more (None while it can): `/health` then says 503 and
        the server exits non-zero, so a supervisor restarts it instead of every request failing."""
        return None

    def prompt_embeds_for(self, request: EngineInput) -> torch.Tensor:
        embeds = request.prompt_embeds
        if embeds is None:
            embeds = self.embeddings.lookup(request.prompt_token_ids)
        return embeds
