#!/usr/bin/env bash
# reports/dev-elicitation-<split>.{md,json,items.jsonl.gz}: scripts/dev_elicitation.py against a fresh server
# serving the TOFU target of $PRESET / $SPLIT (default mini / forget05: dev authors 190-199).
# Usage: scripts/dev_elicitation.sh [extra dev_elicitation.py options]   (PRESET=mini SPLIT=forget05 PORT=8012)
set -euo pipefail
cd "$(dirname "$0")/.."
PRESET=${PRESET:-mini}
SPLIT=${SPLIT:-forget05}
PORT=${PORT:-8012}
source scripts/target_server.sh
start_target_server --no-evidence --no-elicit
"$BIN/python" scripts/dev_elicitation.py --server-url "http://127.0.0.1:$PORT" --admin-key="$(cat "$DATA/admin_key")" \
  --preset "$PRESET" --split "$SPLIT" --out "reports/dev-elicitation-$SPLIT" "$@"
