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
import re
from pathlib import Path
from typing import ClassVar

from pydantic import Field

from unlearnd.artifacts import ArtifactConfig
from unlearnd.detectors.base import RequestMatch
from unlearnd.domain import ForgetRequest
from unlearnd.engine.base import PEFT_TARGET_MODULES, LoRASpec
from unlearnd.guardrail.call import GuardedCall
from unlearnd.interventions.base import Intervention, PipelineContext


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


def module_shapes(model_config: dict) -> dict[str, tuple[int, int]]:
    """(in, out) features of each module an adapter may target, from a Llama-style config.json ({} when
    the config does not say): a LoRA factor of another width would fail inside the engine."""
    try:
        hidden = int(model_config["hidden_size"])
        heads = int(model_config["num_attention_heads"])
        kv_heads = int(model_config.get("num_key_value_heads") or heads)
        head_dim = int(model_config.get("head_dim") or hidden // heads)
        inner = int(model_config["intermediate_size"])
    except (KeyError, TypeError, ValueError):
        return {}
    return {
        "q_proj": (hidden, heads * head_dim),
        "k_proj": (hidden, kv_heads * head_dim),
        "v_proj": (hidden, kv_heads * head_dim),
        "o_proj": (heads * head_dim, hidden),
        "gate_proj": (hidden, inner),
        "up_proj": (hidden, inner),
        "down_proj": (inner, hidden),
    }


_LAYER = re.compile(r"\.layers\.(\d+)\.")


def check_adapter_weights(folder: Path, config: dict, model_config: dict | None = None) -> None:
    """Refuse an adapter file vLLM would choke on (a broken adapter reaching the engine kills it for
    every request): the safetensors header must parse, every tensor must be a finite LoRA factor of the
    adapter's rank, of a layer the model has, with the in / out width of the module it adapts."""
    import torch
    from safetensors import safe_open

    path = Path(folder) / "adapter_model.safetensors"
    if not path.is_file():
        raise ValueError(f"adapter weights {path} are missing")
    rank = int(config.get("r") or 0)
    shapes = module_shapes(model_config or {})
    layers = int((model_config or {}).get("num_hidden_layers") or 0)
    with safe_open(str(path), framework="pt") as weights:  # parses (and bounds-checks) the header
        keys = list(weights.keys())
        if not keys:
            raise ValueError(f"adapter weights {path} hold no tensors")
        for key in keys:
            tensor = weights.get_tensor(key)
            module = key.split(".lora_")[0].rsplit(".", 1)[-1]
            if tensor.ndim != 2 or not bool(torch.isfinite(tensor).all()):
                raise ValueError(f"adapter tensor {key} is not a finite matrix")
            layer = _LAYER.search(key)
            if layers and (layer is None or int(layer.group(1)) >= layers):
                raise ValueError(f"adapter tensor {key} names no layer of this {layers}-layer model")
            width_in, width_out = shapes.get(module, (None, None))
            if ".lora_A." in key:
                expected = (rank, width_in)
            elif ".lora_B." in key:
                expected = (width_out, rank)
            else:
                expected = None
            ok = expected is not None and all(
                want is None or have == want for have, want in zip(tensor.shape, expected, strict=True)
            )
            if not ok or (shapes and module not in shapes):
                raise ValueError(
                    f"adapter tensor {key} has shape {tuple(tensor.shape)}: not a rank-{rank} LoRA factor of this model"
                )


class LoRA(Intervention):
    def __init__(self) -> None:
        super().__init__()
        self.artifacts: dict[str, tuple[Path, LoRAArtifact]] = {}

    def load(self, request: ForgetRequest, artifact_dir: Path) -> None:
        artifact = LoRAArtifact.read(artifact_dir)
        model_config = self.context.model_config if self.context is not None else {}
        for folder in artifact.folders.values():
            config = check_adapter(Path(artifact_dir) / folder)
            check_adapter_weights(Path(artifact_dir) / folder, config, model_config)
        self.artifacts[request.id] = (Path(artifact_dir).resolve(), artifact)
        super().load(request, artifact_dir)

    def unload(self, request_id: str) -> None:
        self.artifacts.pop(request_id, None)
        super().unload(request_id)

    def adapters(self, request_id: str) -> list[LoRASpec]:
        """Every adapter (one per pre-scaled copy) a loaded request may be served with."""
        artifact_dir, artifact = self.artifacts[request_id]
        return [self._spec(request_id, artifact_dir, artifact, float(scale)) for scale in artifact.folders]

    @staticmethod
    def _spec(request_id: str, artifact_dir: Path, artifact: LoRAArtifact, scale: float) -> LoRASpec:
        return LoRASpec(
            name=adapter_name(request_id, artifact.version, scale), path=str(artifact_dir / artifact.folder(scale))
        )

    def apply(self, call: GuardedCall, match: RequestMatch, ctx: PipelineContext) -> None:
        artifact_dir, artifact = self.artifacts[match.request_id]
        scale = artifact.choose(match.weight)
        if scale is None:
            return  # too weak a match: served by the base model, as O3's soft weighting does at ~0
        call.lora = self._spec(match.request_id, artifact_dir, artifact, scale)
