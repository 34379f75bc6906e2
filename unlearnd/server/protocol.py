"""Every schema the HTTP API speaks: OpenAI-compatible requests and responses (the subset unlearnd
serves), the unlearning endpoints' schemas and the error body. Routers build these models; they
never hand-build JSON."""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_serializer,
    model_validator,
)

from unlearnd.engine.base import SamplingSpec


def _no_surrogates(value: str) -> str:
    """JSON can carry an unpaired UTF-16 surrogate ("\\ud800"); no tokenizer can encode one."""
    if any("\ud800" <= c <= "\udfff" for c in value):
        raise ValueError("text contains an unpaired UTF-16 surrogate (invalid Unicode)")
    return value


Text = Annotated[str, AfterValidator(_no_surrogates)]
INT64 = 2**63 - 1
UNSUPPORTED = {  # OpenAI fields unlearnd does not implement, and the value a client may send that asks nothing
    "tools": (None, []),
    "functions": (None, []),
    "tool_choice": (None, "none", "auto"),
    "function_call": (None, "none"),
    "response_format": (None, {"type": "text"}),
    "best_of": (None, 1),
    "suffix": (None, ""),
    "logit_bias": (None, {}),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "echo": (None, False),
}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


class StreamOptions(BaseModel):
    include_usage: bool = False


class _SamplingFields(BaseModel):
    """Sampling fields shared by both completion endpoints; unknown OpenAI fields are accepted and ignored."""

    model_config = ConfigDict(extra="allow")

    model: Text = Field(min_length=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=16)
    stop: Text | list[Text] | None = None
    seed: int | None = Field(None, ge=-INT64 - 1, le=INT64)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: Text | None = None
    # vLLM extensions, accepted as vLLM's own server does (e.g. fixed-length benchmark outputs).
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False

    @model_validator(mode="after")
    def _unsupported(self):
        """A field unlearnd would silently ignore is a clear 400 instead (unless it asks for nothing)."""
        for name, value in (self.model_extra or {}).items():
            if name in UNSUPPORTED and value not in UNSUPPORTED[name]:
                raise ValueError(f"{name} is not supported by this server")
        return self

    def _check_min_tokens(self, max_tokens: int | None) -> None:
        if max_tokens is not None and self.min_tokens > max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({max_tokens})")

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

    def sampling(self, logprobs: int | None) -> SamplingSpec:
        """The engine's sampling settings (`max_tokens` is the pipeline's: it knows the prompt length)."""
        return SamplingSpec(
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
    text: Text


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: Text | list[TextPart] | None = None
    name: Text | None = None

    @model_validator(mode="after")
    def _extras_are_text(self):
        """`tool_calls` and other extras reach the chat template and the detector: valid Unicode only."""
        _check_strings(self.model_extra or {})
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


def _check_strings(value: Any) -> None:
    """Every string inside `value` (nested lists and dicts): free of unpaired surrogates."""
    if isinstance(value, str):
        _no_surrogates(value)
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_strings(key)
            _check_strings(item)
    elif isinstance(value, list):
        for item in value:
            _check_strings(item)


def plain_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """{role, content} dicts for the chat template (`developer` is sent as `system`), with the message's
    `name` and `tool_calls` when it has them: templates that render them show them to the model, and the
    detector reads them either way."""
    role = {"developer": "system"}
    out = []
    for m in messages:
        plain: dict[str, Any] = {"role": role.get(m.role, m.role), "content": m.text()}
        if m.name:
            plain["name"] = m.name
        tool_calls = (m.model_extra or {}).get("tool_calls")
        if tool_calls:
            plain["tool_calls"] = tool_calls
        out.append(plain)
    return out


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
        self._check_min_tokens(self.requested_max_tokens())
        return self

    def plain_messages(self) -> list[dict[str, str]]:
        return plain_messages(self.messages)

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def requested_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_SamplingFields):
    prompt: Text | list[Text] | list[int] | list[list[int]] = Field(
        description="A prompt, a list of prompts, or prompts as token ids (OpenAI's four forms)."
    )
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, value: str | list[str] | list[int] | list[list[int]]) -> list[str | list[int]]:
        """One list entry per prompt: text, or token ids."""
        if isinstance(value, str) or (value and isinstance(value[0], int)):
            value = [value]
        if not value:
            raise ValueError("prompt must not be empty")
        if len(value) > 64:
            raise ValueError("at most 64 prompts per request")
        if any(len(p) == 0 for p in value):
            raise ValueError("prompt must not be empty")
        if any(isinstance(t, int) and t < 0 for p in value if not isinstance(p, str) for t in p):
            raise ValueError("token ids must not be negative")
        return value

    @model_validator(mode="after")
    def _no_echo(self):
        if self.echo:
            raise ValueError("echo is not supported")
        self._check_min_tokens(self.max_tokens)
        return self


class ClassifyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input: list[Text | list[ChatMessage]] = Field(min_length=1, max_length=256)


class ScoreRequest(BaseModel):
    """Score a continuation under the served pipeline (what the evaluation harness measures)."""

    model_config = ConfigDict(extra="forbid")

    model: Text | None = None
    messages: list[ChatMessage] | None = None
    prompt: Text | None = Field(None, min_length=1)
    continuation: Text = Field(min_length=1)
    route_from: Literal["prompt+continuation", "prompt"] = Field(
        "prompt+continuation",
        description="what the detector reads to choose the route: prompt and continuation (the default: "
        "a continuation that names a forgotten subject is guarded too), or the prompt alone (admin only: "
        "the route a user's question gets, as an evaluation that scores gold answers must measure it)",
    )

    def plain_messages(self) -> list[dict[str, str]] | None:
        return plain_messages(self.messages) if self.messages is not None else None

    @model_validator(mode="after")
    def _one_prompt(self):
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("give exactly one of messages or prompt")
        if self.messages is not None and not self.messages:
            raise ValueError("messages must not be empty")
        return self


# -- responses ---------------------------------------------------------------------------------------


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0

    @classmethod
    def of(cls, prompt: int, completion: int) -> Usage:
        return cls(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)

    def __add__(self, other: Usage) -> Usage:
        return Usage.of(self.prompt_tokens + other.prompt_tokens, self.completion_tokens + other.completion_tokens)


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    """OpenAI's schema requires both lists (nullable): no token of ours is a refusal token."""

    content: list[ChatTokenLogprob]
    refusal: list[ChatTokenLogprob] | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class AssistantMessage(BaseModel):
    """OpenAI's schema requires `refusal` (nullable); plain vLLM sends null, and so do we."""

    role: Literal["assistant"] = "assistant"
    content: str
    # null on the refuse and output_blocked routes too: clients read `content` (which keeps the refusal
    # text), and one shape on every route, plain vLLM's, does not single out a forgotten topic's answers
    refusal: str | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str = "stop"  # a string, never null, in a whole (non-streamed) response


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class DeltaMessage(BaseModel):
    """What a stream chunk adds; fields not sent in this chunk are left out, as OpenAI does."""

    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer(mode="wrap")
    def _without_unset(self, handler: Any) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = "stop"  # null only in a stream's chunks before the choice ends, as OpenAI sends


class CompletionResponse(BaseModel):
    """Also each streamed chunk (`usage` only on the last when the client asks for it: OpenAI's schema has
    no null `usage` here, unlike a chat chunk's, so the other chunks leave it out)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "unlearnd"
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ClassifyMatch(BaseModel):
    request_id: str
    name: str
    method: str
    score: float
    weight: float
    spans: list[tuple[int, int]]


class ClassifyResult(BaseModel):
    """`matches` (who is being forgotten: names, ids, methods) only for the admin key."""

    index: int
    flagged: bool
    score: float
    route: str
    matches: list[ClassifyMatch] | None = None


class ClassifyResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[ClassifyResult]


class ScoreResponse(BaseModel):
    """`matched_request_ids` only for the admin key (with `--public-score`, others call it too)."""

    object: Literal["unlearning.score"] = "unlearning.score"
    route: str
    matched_request_ids: list[str] | None = None
    tokens: list[str]
    token_logprobs: list[float]


class EngineInputAdapter(BaseModel):
    name: str
    path: str


class EngineInputResponse(BaseModel):
    """What the engine is given for a chat request, nothing generated (admin): the route's own input."""

    object: Literal["unlearning.engine_input"] = "unlearning.engine_input"
    route: str
    request_id: str | None = Field(None, description="the forget request that decided the route")
    prompt_token_ids: list[int]
    prompt_embeds: str | None = Field(
        None, description="base64 `torch.save` tensor [tokens, hidden], as a remote vLLM receives it (eco, soft_prompt)"
    )
    lora: EngineInputAdapter | None = Field(None, description="the adapter the route generates with (lora)")
    fixed_response: str | None = Field(None, description="the answer of a route that does not call the engine")


# -- errors ------------------------------------------------------------------------------------------


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error body."""

    error: ErrorDetail


def openai_error(message: str, type_: str, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    return ErrorResponse(error=ErrorDetail(message=message, type=type_, param=param, code=code)).model_dump()


class APIError(Exception):
    """Raised by a router; the app turns it into `ErrorResponse` with `status`."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param
