#!/usr/bin/env bash
# The output guard's release rules side by side against plain vLLM: streamed ordinary chat (route none)
# with 10 refuse requests active, c=1 and c=8, one `unlearnd bench serve` run per rule (each run
# rotates unlearnd and plain vLLM in rounds; ratios come from within one run).
set -euo pipefail
cd "$(dirname "$0")/.."
for rule in ${RULES:-strict fixed}; do
  .venv/bin/unlearnd bench serve --out "reports/latency-release-$rule" --routes "" --levels 10 --cell-levels 10 \
    --baselines vllm --concurrency 1,8 --requests 32 --rounds 4 --output-len 64 --no-profile --output-guard "$rule"
done
