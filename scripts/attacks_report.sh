#!/usr/bin/env bash
# reports/attacks.{md,json}: `unlearnd eval attacks` against a fresh server that serves the TOFU target
# model of a reference preset (trained by `unlearnd train reference --preset mini` if missing), with
# /v1/unlearning/score opened to everyone (--public-score) so the log-prob probes meet the scanning path.
# Usage: scripts/attacks_report.sh [extra `unlearnd eval attacks` options]   (PRESET=mini SPLIT= PORT=8011)
set -euo pipefail
cd "$(dirname "$0")/.."
PRESET=${PRESET:-mini}
PORT=${PORT:-8011}
source scripts/target_server.sh
start_target_server --public-score
"$BIN/unlearnd" eval attacks --server-url "http://127.0.0.1:$PORT" --data-dir "$DATA" --served-model tofu-target \
  --preset "$PRESET" ${SPLIT:+--split "$SPLIT"} "$@"
