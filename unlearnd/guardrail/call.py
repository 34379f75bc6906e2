"""The one request object that flows entrypoint -> detector -> router -> intervention -> engine -> response."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal

import torch

from unlearnd.detectors.base import Detection, RequestMatch
from unlearnd.engine.base import LoRASpec, SamplingSpec

# "<request id>": serve this call as if that request did not exist (admin key only; the worker asks the
# model about a request's subject this way before fitting it, `unlearnd.elicit`)
ELICIT_HEADER = "x-unlearnd-elicit"


@dataclass
class GuardedCall:
    id: str
    kind: Literal["chat", "completion", "score"]
    sampling: SamplingSpec
    messages: list[dict] | None = None  # chat requests
    prompt: str | None = None  # completion requests
    max_tokens: int | None = None  # what the client asked for; None: the rest of the context (pipeline)
    continuation: str | None = None  # score requests: the text scored after the prompt (the detector sees it)
    # Filled in along the way (by the pipeline):
    query_text: str = ""  # what the detector scores (`prompting.detector_text`)
    detection: Detection | None = None
    route: str = "none"
    match: RequestMatch | None = None
    prompt_token_ids: list[int] = field(default_factory=list)
    prompt_embeds: torch.Tensor | None = None
    lora: LoRASpec | None = None
    fixed_response: str | None = None  # set by routes that answer without the engine
    output_blocked: dict[int, str] = field(default_factory=dict)  # choice -> request its output gave away
    withhold_alternatives: bool = False  # top_logprobs emptied (a flagged prompt, a caller without the admin key)
    splittable: bool = True  # a composite chat may be answered in parts (`guardrail.composite`); parts are not
    parts: list[GuardedCall] = field(default_factory=list)  # a split chat's sub-calls, answered in this order
    guard_ids: list[str] = field(default_factory=list)  # requests the output guard treats as the subject
    created: float = field(default_factory=time.time)
    background: bool = False  # gives way to users' generations (`guardrail.traffic`): evidence probes
    attempt: int = 0  # a background call's generations so far that gave way
    # the one request this call is served as if it did not exist (admin only: the worker eliciting what the
    # model says about that request's subject, `unlearnd.elicit`); every other request still applies
    exempt: str | None = None

    @property
    def engine_id(self) -> str:
        """The engine's request id: a background call started again is a new engine request."""
        return f"{self.id}-{self.attempt}" if self.attempt else self.id

    @property
    def matched_ids(self) -> list[str]:
        return [m.request_id for m in self.detection.matches] if self.detection else []

    @property
    def subject_ids(self) -> list[str]:
        """Whom the output guard treats as this call's subject: its own matches, and for a composite
        prompt's ordinary part those of the whole prompt."""
        return list(dict.fromkeys(self.matched_ids + self.guard_ids))

    @property
    def served_route(self) -> str:
        """The route, or `output_blocked` once the output guard cut a choice."""
        return "output_blocked" if self.output_blocked else self.route

    @property
    def prompt_length(self) -> int:
        """Positions the prompt takes in the engine (soft-prompt rows included)."""
        return int(self.prompt_embeds.shape[0]) if self.prompt_embeds is not None else len(self.prompt_token_ids)
