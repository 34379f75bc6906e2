"""SPUL (Bhaila et al. 2024, "Soft Prompting for Unlearning in Large Language Models").

A flagged prompt gets n learned virtual-token embeddings prepended, trained offline with the LLM
frozen (`unlearnd.train.soft_prompt`). Like prompt tuning (Lester et al. 2021),
which SPUL builds on, the virtual tokens go at the very start of the sequence, before the BOS /
chat-template tokens, so they take positions 0..n-1 both in training and in vLLM's
prompt-embeddings path. The prompt itself is tokenised exactly as the pipeline would.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import torch
from pydantic import Field

from unlearnd.artifacts import ArtifactConfig, write_bytes_atomic
from unlearnd.detectors.base import RequestMatch
from unlearnd.domain import ForgetRequest
from unlearnd.guardrail.call import GuardedCall
from unlearnd.interventions.base import Intervention, PipelineContext
from unlearnd.prompting import prompt_ids

WEIGHTS = "soft_prompt.safetensors"
TENSOR_NAME = "soft_prompt"


class SoftPromptConfig(ArtifactConfig):
    """soft_prompt.json: shape, placement and how it was trained (weights: soft_prompt.safetensors)."""

    file_name: ClassVar[str] = "soft_prompt.json"

    n_tokens: int = Field(ge=1)
    hidden_size: int = Field(ge=1)
    position: str = "start"
    model: str = ""
    training: dict = Field(default_factory=dict)
    evaluation: dict = Field(default_factory=dict)


def save_soft_prompt(artifact_dir: Path, prompt: torch.Tensor, config: SoftPromptConfig) -> None:
    """Write weights then config, each atomically (the config appears last, so a present config means
    complete weights)."""
    from safetensors.torch import save

    weights = save({TENSOR_NAME: prompt.detach().to(torch.float32).contiguous().cpu()})
    write_bytes_atomic(Path(artifact_dir) / WEIGHTS, weights)
    config.write(artifact_dir)


def load_soft_prompt(artifact_dir: Path) -> tuple[torch.Tensor, SoftPromptConfig]:
    from safetensors.torch import load_file

    config = SoftPromptConfig.read(artifact_dir)
    prompt = load_file(str(Path(artifact_dir) / WEIGHTS))[TENSOR_NAME]
    if tuple(prompt.shape) != (config.n_tokens, config.hidden_size):
        raise ValueError(
            f"soft prompt shape {tuple(prompt.shape)} does not match its config "
            f"({config.n_tokens}, {config.hidden_size})"
        )
    return prompt, config


def with_soft_prompt(prompt: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
    """[n, H] virtual tokens + [T, H] prompt embeddings -> [n + T, H] in the prompt's dtype."""
    if prompt.shape[-1] != embeds.shape[-1]:
        raise ValueError(f"soft prompt hidden size {prompt.shape[-1]} != model hidden size {embeds.shape[-1]}")
    return torch.cat([prompt.to(embeds.dtype), embeds], dim=0)


class SoftPrompt(Intervention):
    def __init__(self) -> None:
        super().__init__()
        self.prompts: dict[str, torch.Tensor] = {}

    def load(self, request: ForgetRequest, artifact_dir: Path) -> None:
        self.prompts[request.id], _ = load_soft_prompt(artifact_dir)
        super().load(request, artifact_dir)

    def unload(self, request_id: str) -> None:
        self.prompts.pop(request_id, None)
        super().unload(request_id)

    def apply(self, call: GuardedCall, match: RequestMatch, ctx: PipelineContext) -> None:
        ids = prompt_ids(ctx.tokenizer, call.messages, call.prompt)
        call.prompt_token_ids = ids
        call.prompt_embeds = with_soft_prompt(self.prompts[match.request_id], ctx.embeddings.lookup(ids))
