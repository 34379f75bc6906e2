"""O3 (Gao et al. 2024, "On Large Language Model Continual Unlearning"): one orthogonal LoRA per request.

Each forget request gets its own PEFT adapter (trained offline by
`unlearnd.train.lora`, orthogonal to every earlier request's adapter), served
through vLLM's multi-LoRA support only for prompts the detector flags. O3 scales the adapter by
the detector's soft weight; vLLM cannot scale an adapter per request, so training also writes
pre-scaled copies (same weights, edited `lora_alpha`) and the weight picks the nearest copy;
below `threshold` no adapter is used.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar

from pydantic import Field

from unlearnd.artifacts import ArtifactConfig
from unlearnd.detectors.base import RequestMatch
from unlearnd.engine.base import PEFT_TARGET_MODULES, LoRASpec
from unlearnd.interventions.base import Intervention, PipelineContext
from unlearnd.request import GuardedRequest
from unlearnd.spec import ForgetRequest


class LoRAArtifact(ArtifactConfig):
    """lora.json: which adapter folder serves which scale, and how they were trained."""

    file_name: ClassVar[str] = "lora.json"

    version: int = 1
    threshold: float = Field(0.5, ge=0.0, le=1.0)
    folders: dict[str, str] = Field(description="scale (as text, e.g. '1.0') -> folder inside the artifact dir")
    rank: int = 8
    lora_alpha: float = 16.0
    target_modules: list[str] = Field(default_factory=lambda: list(PEFT_TARGET_MODULES))
    prior_adapters: list[str] = Field(default_factory=list)
    training: dict = Field(default_factory=dict)
    evaluation: dict = Field(default_factory=dict)

    def choose(self, weight: float) -> float | None:
        """The scale served for a detector weight: None below the threshold, else the nearest
        pre-scaled copy (ties go to the stronger one)."""
        if weight < self.threshold:
            return None
        scales = sorted(float(s) for s in self.folders)
        return min(scales, key=lambda s: (abs(s - weight), -s))

    def folder(self, scale: float) -> str:
        return next(f for s, f in self.folders.items() if float(s) == scale)


def scale_folder_name(scale: float) -> str:
    return "lora" if scale == 1.0 else f"lora-s{scale:g}"


def adapter_name(request_id: str, version: int, scale: float) -> str:
    """Unique per adapter version and scale: vLLM caches adapters by name."""
    base = f"{request_id}-v{version}"
    return base if scale == 1.0 else f"{base}-s{scale:g}"


def check_adapter(folder: Path) -> dict:
    """Refuse adapters vLLM would have to wrap the embeddings / lm_head for (engine.base, #51122)."""
    config = json.loads((Path(folder) / "adapter_config.json").read_text())
    targets = config.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else list(targets)
    bad = [t for t in targets if t not in PEFT_TARGET_MODULES]
    if bad or config.get("modules_to_save"):
        raise ValueError(
            f"adapter {folder} targets {bad or config.get('modules_to_save')}; only {PEFT_TARGET_MODULES} are served"
        )
    return config


READS_HIDDEN = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")  # o_proj reads heads x head_dim


def check_adapter_weights(folder: Path, config: dict, hidden_size: int | None = None) -> None:
    """Refuse an adapter file vLLM would choke on (a broken adapter reaching the engine kills it for
    every request): the safetensors header must parse, every tensor must be a finite 2-D LoRA factor of
    the adapter's rank, and the factors that touch the residual stream must have the base model's width."""
    import torch
    from safetensors import safe_open

    path = Path(folder) / "adapter_model.safetensors"
    if not path.is_file():
        raise ValueError(f"adapter weights {path} are missing")
    rank = int(config.get("r") or 0)
    with safe_open(str(path), framework="pt") as weights:  # parses (and bounds-checks) the header
        keys = list(weights.keys())
        if not keys:
            raise ValueError(f"adapter weights {path} hold no tensors")
        for key in keys:
            tensor = weights.get_tensor(key)
            module = key.split(".lora_")[0].rsplit(".", 1)[-1]
            if tensor.ndim != 2 or not bool(torch.isfinite(tensor).all()):
                raise ValueError(f"adapter tensor {key} is not a finite matrix")
            if ".lora_A." in key:  # the modules that read the residual stream take the model's width
                ok = tensor.shape[0] == rank and (
                    hidden_size is None or module not in READS_HIDDEN or tensor.shape[1] == hidden_size
                )
            elif ".lora_B." in key:
                ok = tensor.shape[1] == rank and (
                    hidden_size is None or module not in ("o_proj", "down_proj") or tensor.shape[0] == hidden_size
                )
            else:
                ok = False
            if not ok:
                raise ValueError(
                    f"adapter tensor {key} has shape {tuple(tensor.shape)}: not a rank-{rank} LoRA factor of this model"
                )


class LoRA(Intervention):
    def __init__(self) -> None:
        super().__init__()
        self.artifacts: dict[str, tuple[Path, LoRAArtifact]] = {}

    def load(self, request: ForgetRequest, artifact_dir: Path) -> None:
        artifact = LoRAArtifact.read(artifact_dir)
        hidden = self.context.embeddings.hidden_size if self.context is not None else None
        for folder in artifact.folders.values():
            config = check_adapter(Path(artifact_dir) / folder)
            check_adapter_weights(Path(artifact_dir) / folder, config, hidden)
        self.artifacts[request.id] = (Path(artifact_dir).resolve(), artifact)
        super().load(request, artifact_dir)

    def unload(self, request_id: str) -> None:
        self.artifacts.pop(request_id, None)
        super().unload(request_id)

    def apply(self, request: GuardedRequest, match: RequestMatch, ctx: PipelineContext) -> None:
        artifact_dir, artifact = self.artifacts[match.request_id]
        scale = artifact.choose(match.weight)
        if scale is None:
            return  # too weak a match: served by the base model, as O3's soft weighting does at ~0
        request.lora = LoRASpec(
            name=adapter_name(match.request_id, artifact.version, scale),
            path=str(artifact_dir / artifact.folder(scale)),
        )
