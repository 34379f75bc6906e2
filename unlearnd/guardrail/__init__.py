"""The guardrail: detector -> router -> intervention -> engine on one `GuardedCall`, and the output guard.

Independent of HTTP: the server's routers build a `GuardedCall` and hand it to the `GuardrailPipeline`;
the evaluation and benchmarks use the same pieces without a server.
"""
