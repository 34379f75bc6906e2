"""One interface for every intervention (refuse, system prompt, ECO, soft prompt, LoRA).

An intervention loads its per-request artifact at serve time and, for a flagged prompt, rewrites
the `GuardedCall`: its messages, its prompt embeddings, its LoRA, or a fixed response. Which
class serves which method is the method table's business (`unlearnd.methods`).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from pathlib import Path

from unlearnd.detectors.base import RequestMatch
from unlearnd.domain import ForgetRequest
from unlearnd.engine.base import EmbeddingTable
from unlearnd.guardrail.call import GuardedCall


@dataclass
class PipelineContext:
    """What interventions may use: the engine's tokenizer (prompts are rendered and tokenised with
    `unlearnd.prompting`), its embedding lookup and the model's config.json (what artifacts must fit)."""

    tokenizer: object
    embeddings: EmbeddingTable
    model_config: dict = field(default_factory=dict)


class Intervention(abc.ABC):
    def __init__(self) -> None:
        self.requests: dict[str, ForgetRequest] = {}
        self.context: PipelineContext | None = None  # set by the pipeline: what loads may check against

    def load(self, request: ForgetRequest, artifact_dir: Path) -> None:
        """Load this request's serve-time artifact (default: nothing beyond the record)."""
        self.requests[request.id] = request

    def unload(self, request_id: str) -> None:
        self.requests.pop(request_id, None)

    @abc.abstractmethod
    def apply(self, call: GuardedCall, match: RequestMatch, ctx: PipelineContext) -> None:
        """Rewrite `call` for the matched forget request (in place)."""
