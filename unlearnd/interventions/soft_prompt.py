"""SPUL (Bhaila et al. 2024, "Soft Prompting for Unlearning in Large Language Models").

A flagged prompt gets n learned virtual-token embeddings prepended, trained offline with the LLM
frozen (`unlearnd.train.soft_prompt`). Like prompt tuning (Lester et al. 2021),
which SPUL builds on, the virtual tokens go at the very start of the sequence, before the BOS /
chat-template tokens, so they take positions 0..n-1 both in training and in vLLM's
prompt-embeddings path. The prompt itself is tokenised exactly as the pipeline would.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from pydantic import BaseModel, Field

from unlearnd.interventions.base import Intervention, PipelineContext, register_intervention
from unlearnd.detectors.base import RequestMatch
from unlearnd.registry import ForgetRequest
from unlearnd.request import GuardedRequest

WEIGHTS = "soft_prompt.safetensors"
CONFIG = "soft_prompt.json"
TENSOR_NAME = "soft_prompt"


class SoftPromptConfig(BaseModel):
    """soft_prompt.json: shape, placement and how it was trained."""

    n_tokens: int = Field(ge=1)
    hidden_size: int = Field(ge=1)
    position: str = "start"
    model: str = ""
    training: dict = Field(default_factory=dict)
    evaluation: dict = Field(default_factory=dict)


def save_soft_prompt(artifact_dir: Path, prompt: torch.Tensor, config: SoftPromptConfig) -> None:
    """Write weights then config, each via tmp + rename (the config appears last, so a present
    config means complete weights)."""
    from safetensors.torch import save_file

    artifact_dir = Path(artifact_dir)
    artifact_dir.mkdir(parents=True, exist_ok=True)
    tmp = artifact_dir / (WEIGHTS + ".tmp")
    save_file({TENSOR_NAME: prompt.detach().to(torch.float32).contiguous().cpu()}, str(tmp))
    tmp.replace(artifact_dir / WEIGHTS)
    tmp = artifact_dir / (CONFIG + ".tmp")
    tmp.write_text(json.dumps(config.model_dump(mode="json"), indent=1))
    tmp.replace(artifact_dir / CONFIG)


def load_soft_prompt(artifact_dir: Path) -> tuple[torch.Tensor, SoftPromptConfig]:
    from safetensors.torch import load_file

    artifact_dir = Path(artifact_dir)
    config = SoftPromptConfig.model_validate_json((artifact_dir / CONFIG).read_text())
    prompt = load_file(str(artifact_dir / WEIGHTS))[TENSOR_NAME]
    if tuple(prompt.shape) != (config.n_tokens, config.hidden_size):
        raise ValueError(f"soft prompt shape {tuple(prompt.shape)} does not match its config "
                         f"({config.n_tokens}, {config.hidden_size})")
    return prompt, config


def with_soft_prompt(prompt: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
    """[n, H] virtual tokens + [T, H] prompt embeddings -> [n + T, H] in the prompt's dtype."""
    if prompt.shape[-1] != embeds.shape[-1]:
        raise ValueError(f"soft prompt hidden size {prompt.shape[-1]} != model hidden size {embeds.shape[-1]}")
    return torch.cat([prompt.to(embeds.dtype), embeds], dim=0)


@register_intervention
class SoftPrompt(Intervention):
    route = "soft_prompt"

    def __init__(self) -> None:
        super().__init__()
        self.prompts: dict[str, torch.Tensor] = {}

    def load(self, request: ForgetRequest, artifact_dir: Path) -> None:
        self.prompts[request.id], _ = load_soft_prompt(artifact_dir)
        super().load(request, artifact_dir)

    def unload(self, request_id: str) -> None:
        self.prompts.pop(request_id, None)
        super().unload(request_id)

    def apply(self, request: GuardedRequest, match: RequestMatch, ctx: PipelineContext) -> None:
        text = ctx.render(request)
        ids = ctx.tokenizer.encode(text, add_special_tokens=request.messages is None)
        request.prompt_token_ids = list(ids)
        request.prompt_embeds = with_soft_prompt(self.prompts[match.request_id], ctx.embeddings.lookup(ids))
