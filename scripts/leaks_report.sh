#!/usr/bin/env bash
# reports/leaks.{md,json,items.jsonl.gz}: `unlearnd eval leaks` against a fresh server that serves the TOFU
# target model of a reference preset (trained by `unlearnd train reference --preset mini` if missing).
# Usage: scripts/leaks_report.sh [extra `unlearnd eval leaks` options]   (PRESET=mini SPLIT= PORT=8012 SERVE_ARGS=)
# SERVE_ARGS go to `unlearnd serve` (e.g. --no-evidence with --evidence-timeout 0).
# SPLIT=forget05 serves and measures the target trained with forget05's authors (a target of its own).
set -euo pipefail
cd "$(dirname "$0")/.."
PRESET=${PRESET:-mini}
PORT=${PORT:-8012}
source scripts/target_server.sh
# shellcheck disable=SC2086  # SERVE_ARGS is a list of options
start_target_server ${SERVE_ARGS:-}
"$BIN/unlearnd" eval leaks --server-url "http://127.0.0.1:$PORT" --data-dir "$DATA" --served-model tofu-target \
  --preset "$PRESET" ${SPLIT:+--split "$SPLIT"} "$@"
