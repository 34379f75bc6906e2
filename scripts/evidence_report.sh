#!/usr/bin/env bash
# reports/evidence.{md,json,items.jsonl.gz}: `unlearnd bench evidence` (starts its own server and worker).
# Usage: scripts/evidence_report.sh [extra options]
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}"
.venv/bin/unlearnd bench evidence "$@"
