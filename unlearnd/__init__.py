"""unlearnd: inference-time guardrail unlearning server on vLLM."""

__version__ = "0.1.0"
