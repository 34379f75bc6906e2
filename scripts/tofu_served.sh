#!/usr/bin/env bash
# Served rows of the TOFU evaluation: a fresh server on the TOFU target model of a reference preset
# (trained by `unlearnd train reference --preset mini` if missing), then `unlearnd eval tofu` for the
# served methods given (each cross-fitted: registered with one fold's QA, measured on the other's).
# Usage: scripts/tofu_served.sh METHODS NAME [extra `unlearnd eval tofu` options]   (PRESET=mini PORT=8012)
set -euo pipefail
cd "$(dirname "$0")/.."
METHODS=$1
NAME=$2
shift 2
PRESET=${PRESET:-mini}
PORT=${PORT:-8012}
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
  --log-level warning > "$DATA/server.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null; wait $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 300); do
  curl -sf "http://127.0.0.1:$PORT/health" > /dev/null && break
  kill -0 $SERVER 2>/dev/null || { cat "$DATA/server.log"; exit 1; }
  sleep 2
done
UNLEARND_ADMIN_KEY=$(cat "$DATA/admin_key") "$BIN/unlearnd" eval tofu --preset "$PRESET" --methods "$METHODS" \
  --server-url "http://127.0.0.1:$PORT" --served-model tofu-target --train-missing --out reports --name "$NAME" "$@"
