"""The engine's compute dtype: what `--dtype auto` means on this machine."""

from __future__ import annotations

from pathlib import Path

import torch


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX); Linux /proc/cpuinfo flags."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(dtype: str = "auto") -> str:
    """The engine's compute dtype. `auto`: bfloat16 on a GPU or a CPU with native bf16, else float32.

    Why: on CPUs without bf16 hardware (AVX2 only) PyTorch emulates bf16 matmuls; on the 2-core dev
    machine plain vLLM's first token took 1925 ms in bf16 and 364 ms in float32 (reports/latency*.md).
    """
    if dtype != "auto":
        if dtype not in ("bfloat16", "float16", "float32"):
            raise ValueError(f"unknown dtype {dtype!r}: use auto, bfloat16, float16 or float32")
        return dtype
    return "bfloat16" if torch.cuda.is_available() or cpu_has_native_bf16() else "float32"
