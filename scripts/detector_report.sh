#!/usr/bin/env bash
# reports/detector.{md,json,items.jsonl.gz}: `unlearnd eval detector` in process, and /v1/unlearning/classify
# timed over HTTP on a fresh server of the default model (throwaway data dir, stopped on exit).
# Usage: scripts/detector_report.sh [extra `unlearnd eval detector` options]   (PORT=8123)
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
PORT=${PORT:-8123}
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1} HF_HUB_OFFLINE=1
DATA=$(mktemp -d)
KEY=$("$BIN/python" -c "import secrets; print(secrets.token_hex(16))")
"$BIN/unlearnd" serve --port "$PORT" --data-dir "$DATA" --admin-key "$KEY" --log-level warning > "$DATA/server.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null; wait $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 300); do
  curl -sf "http://127.0.0.1:$PORT/health" > /dev/null && break
  kill -0 $SERVER 2>/dev/null || { cat "$DATA/server.log"; exit 1; }
  sleep 2
done
UNLEARND_ADMIN_KEY="$KEY" "$BIN/unlearnd" eval detector --out reports/detector --server-url "http://127.0.0.1:$PORT" "$@"
