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
    # tests write throwaway reports from whatever tree they run in (the clean-tree rule is tested on its own)
    os.environ.setdefault("UNLEARND_ALLOW_DIRTY", "1")


@pytest.fixture(scope="session")
def tokenizer(default_model_dir):
    """The default model's real tokenizer (SmolLM2)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(default_model_dir))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer) -> Path:
    """A tiny random-init Llama with the real tokenizer, saved as an HF model folder."""
    from tests.helpers import tiny_llama

    model = tiny_llama(  # large enough init that inputs visibly move the logits
        len(tokenizer),
        max_position_embeddings=2048,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        initializer_range=0.2,
    )
    folder = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
