#!/usr/bin/env bash
# reports/latency.md: unlearnd (strict output guard) against plain vLLM with unlearnd's engine flags and with
# vLLM's defaults, at 0 / 10 / 100 / 1000 active forget requests (TOFU authors, then look-alikes); the
# non-flagged cells at 10 and 1000, the route cells at 10. Refuses to start on a busy machine.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/unlearnd bench serve --out reports/latency --levels 0,10,100,1000 --cell-levels 10,1000 \
  --concurrency 1,8 --requests 32 --rounds 4 --output-len 64 --routes "${ROUTES:-refuse,prompt,eco,soft_prompt,lora}" \
  --route-concurrency 8 --baselines vllm,vllm-default --output-guard strict "$@"
