"""One detector interface; implementations are registered by name (open-unlearning style).

A detector is *fitted* offline per forget request (writing files into the request's artifact
folder) and *loaded* at serve time; `detect` then scores a batch of prompts against all loaded
requests at once, so the cost stays flat as requests are added.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from unlearnd.domain import ForgetRequest


@dataclass
class RequestMatch:
    """One forget request a prompt matched."""

    request_id: str
    score: float
    weight: float = 1.0  # soft weight in [0, 1] for routes that can scale (O3 LoRA)
    spans: list[tuple[int, int]] = field(default_factory=list)  # character spans naming the target


@dataclass
class Detection:
    """The verdict for one prompt: `matches` holds only the requests it was flagged for."""

    score: float
    matches: list[RequestMatch] = field(default_factory=list)

    @property
    def flagged(self) -> bool:
        return bool(self.matches)


class Detector(abc.ABC):
    name: ClassVar[str]

    @abc.abstractmethod
    def fit(self, request: ForgetRequest, artifact_dir: Path) -> dict:
        """Offline: build this request's detector artifact in `artifact_dir`; return its metrics."""

    @abc.abstractmethod
    def load(self, request: ForgetRequest, artifact_dir: Path) -> None:
        """Serve time: start scoring prompts against this request."""

    @abc.abstractmethod
    def unload(self, request_id: str) -> None: ...

    @abc.abstractmethod
    def detect(self, texts: list[str]) -> list[Detection]:
        """Score each text against every loaded request."""

    @property
    @abc.abstractmethod
    def loaded_ids(self) -> set[str]: ...


ARTIFACT_SUBDIR = "classifier"


def artifact_path(artifact_dir: Path, name: str) -> Path:
    """Where detector `name` keeps its files inside a request's artifact folder."""
    return Path(artifact_dir) / ARTIFACT_SUBDIR / name


DETECTORS: dict[str, type[Detector]] = {}


def register_detector(cls: type[Detector]) -> type[Detector]:
    DETECTORS[cls.name] = cls
    return cls


def get_detector(name: str, **kwargs) -> Detector:
    try:
        return DETECTORS[name](**kwargs)
    except KeyError:
        raise ValueError(f"unknown detector {name!r}; known: {sorted(DETECTORS)}") from None
