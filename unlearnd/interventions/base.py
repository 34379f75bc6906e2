"""One interface for every intervention (refuse, system prompt, ECO, soft prompt, LoRA).

An intervention loads its per-request artifact at serve time and, for a flagged prompt, rewrites
the `GuardedRequest`: its messages, its prompt embeddings, its LoRA, or a fixed response.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar

from unlearnd.detectors.base import RequestMatch
from unlearnd.engine.base import EmbeddingTable
from unlearnd.registry import ForgetRequest
from unlearnd.request import GuardedRequest


@dataclass
class PipelineContext:
    """What interventions may use: the tokenizer, the embedding lookup and the prompt renderer."""

    tokenizer: object
    embeddings: EmbeddingTable
    render: Callable[[GuardedRequest], str]  # messages/prompt -> the exact text the model sees


class Intervention(abc.ABC):
    route: ClassVar[str]

    def __init__(self) -> None:
        self.requests: dict[str, ForgetRequest] = {}

    def load(self, request: ForgetRequest, artifact_dir: Path) -> None:
        """Load this request's serve-time artifact (default: nothing beyond the record)."""
        self.requests[request.id] = request

    def unload(self, request_id: str) -> None:
        self.requests.pop(request_id, None)

    @abc.abstractmethod
    def apply(self, request: GuardedRequest, match: RequestMatch, ctx: PipelineContext) -> None:
        """Rewrite `request` for the matched forget request (in place)."""


INTERVENTIONS: dict[str, type[Intervention]] = {}


def register_intervention(cls: type[Intervention]) -> type[Intervention]:
    INTERVENTIONS[cls.route] = cls
    return cls
