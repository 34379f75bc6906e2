"""What every per-request training job shares: its preset (request options on top), device, frozen
base model and cost clock, and the one template the jobs follow (`RequestJob`: prepare -> score
before -> fit -> score after -> samples -> artifact -> report).

Method options read from `spec.options` (all optional): `preset` ("cpu" | "full"; default "full" when
a GPU is visible) and any field of the method's preset (e.g. `steps`, `n_tokens`, ECO's `kind`).
Unknown keys are ignored: `spec.options` is shared by everything that reads a request.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar

import torch
from pydantic import BaseModel

from unlearnd.domain import ForgetRequest, QAExample
from unlearnd.models import load_causal_lm, resolve_model
from unlearnd.prompting import stop_ids
from unlearnd.train.data import EncodedQA, encode_qa, refusal_for
from unlearnd.train.objectives import TrainingObjective
from unlearnd.train.scoring import greedy_generate
from unlearnd.train.trainer import TrainConfig, Trainer


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


# -- the per-request template ----------------------------------------------------------------------

PresetT = TypeVar("PresetT", bound=BaseModel)


class RequestJob(ABC, Generic[PresetT]):
    """The one template every per-request job (ECO, SPUL, O3) follows, so they differ only in their
    steps: start (preset, device, frozen model) -> prepare -> score before -> fit -> score after ->
    samples -> write the artifact (atomic) -> the report. `run()` is the only entry point."""

    presets: ClassVar[dict[str, BaseModel]]

    def __init__(
        self,
        request: ForgetRequest,
        artifact_dir: Path,
        model_path: str | Path,
        preset: str = "cpu",
        device: str | None = None,
        progress: bool = True,
        overrides: dict | None = None,
    ):
        self.request = request
        self.artifact_dir = Path(artifact_dir)
        self.model_path = model_path
        self.preset = preset
        self.device_name = device
        self.progress = progress
        self.overrides = overrides
        self.before: dict[str, Any] = {}
        self.after: dict[str, Any] = {}
        self.outputs: Any = None

    def run(self) -> dict[str, Any]:
        """The template: every step in order; returns the report (the job's summary)."""
        self.start()
        self.prepare()
        self.before = self.score(before=True)
        self.fit()
        self.after = self.score(before=False)
        self.outputs = self.samples()
        self.write_artifact()
        return self.report()

    def start(self) -> None:
        """Resolve the preset (request options and overrides on top), pick the device, load the model."""
        self.job = start_job(self.presets, self.preset, self.request, self.model_path, self.device_name, self.overrides)
        self.cfg: PresetT = self.job.cfg
        self.device, self.model, self.tokenizer = self.job.device, self.job.model, self.job.tokenizer

    @cached_property
    def cost(self) -> dict[str, Any]:
        """The job's cost record, frozen the first time it is read: the artifact and the report quote
        the same numbers, and each job reads it where its artifact is complete but for the record."""
        return self.job.cost(**self.cost_extra())

    def cost_extra(self) -> dict[str, Any]:
        """Method-specific entries of the cost record."""
        return {}

    @abstractmethod
    def prepare(self) -> None:
        """Encode the request's data and build what `fit` changes."""

    @abstractmethod
    def score(self, before: bool) -> dict[str, Any]:
        """The job's measurements before or after `fit`."""

    @abstractmethod
    def fit(self) -> None:
        """Train or tune the intervention."""

    @abstractmethod
    def samples(self) -> Any:
        """What the intervened model says, kept in the artifact for inspection."""

    @abstractmethod
    def write_artifact(self) -> None:
        """Write what the server loads into `artifact_dir` (atomically)."""

    @abstractmethod
    def report(self) -> dict[str, Any]:
        """The summary returned to the caller (CLI, worker), logged in one line."""


class TrainedRequestJob(RequestJob[PresetT]):
    """A request job whose `fit` is the shared `Trainer` on an objective (SPUL, O3). `prepare` sets
    `objective` and `trainable` (the module the objective trains); presets have the TrainConfig
    fields (steps, learning_rate, warmup_steps, seed) and n_samples / sample_tokens."""

    objective: TrainingObjective
    trainable: torch.nn.Module

    @abstractmethod
    def batches(self) -> list[dict]:
        """One epoch of training batches (the trainer cycles through them)."""

    def fit(self) -> None:
        cfg: Any = self.cfg
        train_cfg = TrainConfig(
            steps=cfg.steps,
            learning_rate=cfg.learning_rate,
            warmup_steps=cfg.warmup_steps,
            seed=cfg.seed,
            progress=self.progress,
        )
        self.result = Trainer(self.objective, train_cfg).fit(self.trainable, self.batches())

    def cost_extra(self) -> dict[str, Any]:
        return {"train_wall_seconds": self.result.wall_seconds, "train_cpu_seconds": self.result.cpu_seconds}


# -- what the trained jobs share -------------------------------------------------------------------


def answered(qas: list[QAExample]) -> list[QAExample]:
    return [qa for qa in qas if qa.answer]


def answer_items(tokenizer: Any, qas: list[QAExample], max_len: int, end_of_turn: bool = False) -> list[EncodedQA]:
    """Each QA with its true answer: scored (no end of turn) or trained on (retain)."""
    return [encode_qa(tokenizer, qa.question, qa.answer, max_len, end_of_turn=end_of_turn) for qa in qas]


def refusal_items(tokenizer: Any, qas: list[QAExample], max_len: int) -> list[EncodedQA]:
    """Each forget question relabelled to a non-answer, to train on."""
    return [encode_qa(tokenizer, qa.question, refusal_for(i), max_len, end_of_turn=True) for i, qa in enumerate(qas)]


def greedy_samples(
    model: Any, tokenizer: Any, items: list[EncodedQA], embeds_of: Callable[[EncodedQA], torch.Tensor], tokens: int
) -> list[dict[str, str]]:
    """Greedy answers of `model` to `items`, prompted with `embeds_of(item)` ([T, H])."""
    eos = stop_ids(tokenizer)
    samples = []
    with torch.no_grad():
        for item in items:
            gen = greedy_generate(model, embeds_of(item), tokens, eos)
            samples.append({"question": item.question, "output": tokenizer.decode(gen, skip_special_tokens=True)})
    return samples
