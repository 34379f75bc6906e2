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
SPLIT=""  # the preset's forget split, which `eval tofu` measures
WHICH=target,retain  # both reference models before the server starts (eval tofu needs the retain model)
source scripts/target_server.sh
start_target_server
UNLEARND_ADMIN_KEY=$(cat "$DATA/admin_key") "$BIN/unlearnd" eval tofu --preset "$PRESET" --methods "$METHODS" \
  --server-url "http://127.0.0.1:$PORT" --served-model tofu-target --train-missing --out reports --name "$NAME" "$@"
