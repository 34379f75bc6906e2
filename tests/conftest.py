"""Shared fixtures: the default model (provisioned once), TOFU data and a tiny engine."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from unlearnd.config import tofu_dir


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """The embedded default model converted to safetensors (once per cache dir)."""
    from unlearnd.models import pull_default

    return pull_default()


def _hub_tofu(folder: Path) -> str | None:
    """Export TOFU from the hub into `folder` in a child process (the suite itself runs offline);
    None when it worked, else why not."""
    code = "import sys; from unlearnd.data.tofu import export_hub_splits; export_hub_splits(sys.argv[1])"
    env = {**os.environ, "HF_HUB_OFFLINE": "0", "HF_DATASETS_OFFLINE": "0"}
    try:
        done = subprocess.run(
            [sys.executable, "-c", code, str(folder)], env=env, capture_output=True, text=True, timeout=600
        )
    except subprocess.TimeoutExpired:
        return "the hub did not answer within 10 minutes"
    if done.returncode == 0:
        return None
    return (done.stderr.strip().splitlines() or ["no output"])[-1]


@pytest.fixture(scope="session")
def tofu() -> Path:
    """The TOFU data folder: `UNLEARND_TOFU_DIR`, else `../shared/data/tofu` beside the checkout, else the
    hub dataset `locuslab/TOFU` exported once into the cache (`datasets` is in the test extra)."""
    from unlearnd.config import cache_dir
    from unlearnd.data.tofu import TOFU_HUB_ID, TOFU_SPLITS, has_tofu_split

    local = tofu_dir()
    if has_tofu_split("forget01", local):
        return local
    cached = cache_dir() / "tofu"
    if all(has_tofu_split(name, cached) for name in TOFU_SPLITS):
        return cached
    why = _hub_tofu(cached)
    if why is None:
        return cached
    pytest.fail(
        f"TOFU data not found: not at {local} (UNLEARND_TOFU_DIR, default ../shared/data/tofu beside the "
        f"checkout), not cached at {cached}, and the hub dataset {TOFU_HUB_ID} could not be fetched ({why})",
        pytrace=False,
    )


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
