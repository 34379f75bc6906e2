#!/usr/bin/env bash
# reports/<NAME>.{md,json,items.jsonl.gz}: `unlearnd eval continual` (forget requests registered one after
# another) against a fresh server that serves the TOFU target model of a reference preset (trained by
# `unlearnd train reference --preset mini` if missing).
# Usage: scripts/continual_report.sh METHOD NAME [extra `unlearnd eval continual` options]   (PRESET=mini PORT=8012)
set -euo pipefail
cd "$(dirname "$0")/.."
METHOD=$1
NAME=$2
shift 2
PRESET=${PRESET:-mini}
PORT=${PORT:-8012}
SPLIT=""
source scripts/target_server.sh
start_target_server
UNLEARND_ADMIN_KEY=$(cat "$DATA/admin_key") "$BIN/unlearnd" eval continual --server-url "http://127.0.0.1:$PORT" \
  --served-model tofu-target --preset "$PRESET" --method "$METHOD" --out reports --name "$NAME" "$@"
