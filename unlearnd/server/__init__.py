"""HTTP entrypoints (OpenAI API, admin API), the guardrail pipeline and the forget-request registry."""
