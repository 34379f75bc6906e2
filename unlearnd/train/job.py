"""What every per-request training job shares: its preset (request options on top), device, frozen
base model and cost clock.

Method options read from `spec.options` (all optional): `preset` ("cpu" | "full"; default "full" when
a GPU is visible) and any field of the method's preset (e.g. `steps`, `n_tokens`, ECO's `kind`).
Unknown keys are ignored: `spec.options` is shared by everything that reads a request.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from unlearnd.domain import ForgetRequest
from unlearnd.models import load_causal_lm, resolve_model


class JobContext:
    """What a job may need beyond its request: the base model, the registry (earlier adapters) and the
    serving engine's dtype (ECO tunes on what the server will send)."""

    def __init__(self, registry: Any, model: str, serve_dtype: str = "auto"):
        self.registry = registry
        self.model = model
        self.serve_dtype = serve_dtype

    def model_path(self) -> str:
        return resolve_model(self.model)


def default_preset(request: ForgetRequest) -> str:
    return str(request.spec.options.get("preset") or ("full" if torch.cuda.is_available() else "cpu"))


def pick_device(device: str | None) -> torch.device:
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def torch_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def resolve_preset(presets: dict, name: str, options: dict | None = None, overrides: dict | None = None):
    """A named preset with the request's method options and explicit overrides applied on top."""
    if name not in presets:
        raise ValueError(f"unknown preset {name!r}; known: {sorted(presets)}")
    base = presets[name]
    fields = type(base).model_fields
    updates = {k: v for k, v in {**(options or {}), **(overrides or {})}.items() if k in fields}
    return type(base).model_validate({**base.model_dump(), **updates})


@dataclass
class JobStart:
    """What every intervention job starts from: its resolved preset, device, frozen model and clocks."""

    cfg: Any
    preset: str
    device: torch.device
    model: Any
    tokenizer: Any
    wall0: float = field(default_factory=time.perf_counter)
    cpu0: float = field(default_factory=time.process_time)

    def cost(self, **extra: Any) -> dict[str, Any]:
        """Wall and CPU seconds since the job started (model load included), plus `extra`."""
        return {
            "wall_seconds": time.perf_counter() - self.wall0,
            "cpu_seconds": time.process_time() - self.cpu0,
            **extra,
            "device": str(self.device),
            "preset": self.preset,
        }


def start_job(
    presets: dict,
    preset: str,
    request: ForgetRequest,
    model_path: str | Path,
    device: str | None,
    overrides: dict | None,
) -> JobStart:
    """Resolve the job's preset, pick the device, load the frozen base model."""
    wall0, cpu0 = time.perf_counter(), time.process_time()
    cfg = resolve_preset(presets, preset, request.spec.options, overrides)
    dev = pick_device(device)
    model, tokenizer = load_causal_lm(model_path, torch_dtype(cfg.dtype), dev, frozen=True)
    return JobStart(cfg=cfg, preset=preset, device=dev, model=model, tokenizer=tokenizer, wall0=wall0, cpu0=cpu0)
