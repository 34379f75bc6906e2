#!/usr/bin/env bash
# reports/attacks.{md,json}: `unlearnd eval attacks` against a fresh server that serves the TOFU target
# model of a reference preset (trained by `unlearnd train reference --preset mini` if missing), with
# /v1/unlearning/score opened to everyone (--public-score) so the log-prob probes meet the scanning path.
# Usage: scripts/attacks_report.sh [extra `unlearnd eval attacks` options]   (PRESET=mini PORT=8011)
set -euo pipefail
cd "$(dirname "$0")/.."
PRESET=${PRESET:-mini}
PORT=${PORT:-8011}
BIN=.venv/bin
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-2} HF_HUB_OFFLINE=1
TARGET=$("$BIN/python" - "$PRESET" <<'PY'
import sys
from unlearnd.train.reference import ensure_reference_models, preset
print(ensure_reference_models(preset(sys.argv[1]), progress=False).target_dir)
PY
)
DATA=$(mktemp -d)
"$BIN/unlearnd" serve --model "$TARGET" --served-model-name tofu-target --port "$PORT" --data-dir "$DATA" \
  --public-score --log-level warning > "$DATA/server.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null; wait $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 300); do
  curl -sf "http://127.0.0.1:$PORT/health" > /dev/null && break
  kill -0 $SERVER 2>/dev/null || { cat "$DATA/server.log"; exit 1; }
  sleep 2
done
"$BIN/unlearnd" eval attacks --server-url "http://127.0.0.1:$PORT" --data-dir "$DATA" --served-model tofu-target \
  --preset "$PRESET" "$@"
