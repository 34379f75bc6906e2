"""Shared fixtures: the default model (provisioned once), TOFU data and a tiny engine."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from unlearnd.config import tofu_dir


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """The embedded default model converted to safetensors (once per cache dir)."""
    from unlearnd.models import pull_default

    return pull_default()


@pytest.fixture(scope="session")
def tofu() -> Path:
    path = tofu_dir()
    if not (path / "forget01.json").exists():
        pytest.fail(f"TOFU data not found at {path} (set UNLEARND_TOFU_DIR)")
    return path


@pytest.fixture(scope="session", autouse=True)
def _offline_env() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
