"""Benchmarks: unlearnd against plain vLLM on the same model, with the servers it starts and a profiler."""
