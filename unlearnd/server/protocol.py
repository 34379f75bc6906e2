"""OpenAI-compatible request/response schemas (the subset unlearnd serves) and the admin schemas."""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from unlearnd.engine.base import SamplingSpec


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


class StreamOptions(BaseModel):
    include_usage: bool = False


class _SamplingFields(BaseModel):
    """Sampling fields shared by both completion endpoints; unknown OpenAI fields are accepted and ignored."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=16)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # vLLM extensions, accepted as vLLM's own server does (e.g. fixed-length benchmark outputs).
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> list[str]:
        if value is None:
            return []
        values = [value] if isinstance(value, str) else value
        if len(values) > 4:
            raise ValueError("at most 4 stop sequences are allowed")
        if any(not s for s in values):
            raise ValueError("stop sequences must not be empty")
        return values

    @model_validator(mode="after")
    def _n_needs_sampling(self):
        if self.n > 1 and self.temperature == 0:
            raise ValueError("n > 1 needs temperature > 0 (greedy decoding gives n identical choices)")
        return self

    def sampling(self, max_tokens: int, logprobs: int | None) -> SamplingSpec:
        return SamplingSpec(
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            n=self.n,
            stop=list(self.stop or []),
            seed=self.seed,
            logprobs=logprobs,
            min_tokens=self.min_tokens,
            ignore_eos=self.ignore_eos,
        )


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)

    @model_validator(mode="after")
    def _has_user_text(self):
        if not any(m.text().strip() for m in self.messages):
            raise ValueError("messages must contain some non-empty content")
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs: true")
        return self

    def plain_messages(self) -> list[dict[str, str]]:
        role = {"developer": "system"}
        return [{"role": role.get(m.role, m.role), "content": m.text()} for m in self.messages]

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def requested_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_SamplingFields):
    prompt: str | list[str]
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, value: str | list[str]) -> list[str]:
        values = [value] if isinstance(value, str) else value
        if not values:
            raise ValueError("prompt must not be empty")
        if len(values) > 64:
            raise ValueError("at most 64 prompts per request")
        if any(not p for p in values):
            raise ValueError("prompt must not be an empty string")
        return values

    @model_validator(mode="after")
    def _no_echo(self):
        if self.echo:
            raise ValueError("echo is not supported")
        return self


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ClassifyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input: list[str | list[ChatMessage]] = Field(min_length=1, max_length=256)


class ScoreRequest(BaseModel):
    """Score a continuation under the served pipeline (what the evaluation harness measures)."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    messages: list[ChatMessage] | None = None
    prompt: str | None = None
    continuation: str = Field(min_length=1)

    @model_validator(mode="after")
    def _one_prompt(self):
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("give exactly one of messages or prompt")
        if self.messages is not None and not self.messages:
            raise ValueError("messages must not be empty")
        return self


class ClassifyMatch(BaseModel):
    request_id: str
    name: str
    method: str
    score: float
    weight: float
    spans: list[tuple[int, int]]


class ClassifyResult(BaseModel):
    index: int
    flagged: bool
    score: float
    route: str
    matches: list[ClassifyMatch]


class ModelCard(BaseModel):
    id: str
    object: str = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "unlearnd"
    max_model_len: int | None = None


def openai_error(message: str, type_: str, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
