"""The HTTP server: app factory and routers (OpenAI API, unlearning endpoints, admin API), the guardrail
pipeline that every request flows through, and its settings and metrics."""
