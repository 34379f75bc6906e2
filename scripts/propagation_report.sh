#!/usr/bin/env bash
# reports/propagation.{md,json,items.jsonl.gz}: `unlearnd bench propagation` (starts its own PostgreSQL,
# vLLM backend and two replicas). Usage: scripts/propagation_report.sh [extra options]
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
.venv/bin/unlearnd bench propagation "$@"
