"""Engine layer: one interface (`Engine`), a local in-process vLLM and a remote vLLM server."""

from unlearnd.engine.base import (
    ChoiceDelta,
    Engine,
    EngineError,
    EngineInput,
    LoRASpec,
    SamplingSpec,
    TokenLogprob,
)

__all__ = [
    "ChoiceDelta",
    "Engine",
    "EngineError",
    "EngineInput",
    "LoRASpec",
    "SamplingSpec",
    "TokenLogprob",
]
