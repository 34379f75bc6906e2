# Sourced by the report scripts: start a fresh `unlearnd serve` on the TOFU target model of $PRESET and
# forget split $SPLIT (empty: the preset's; trained by `unlearnd train reference` if missing, with the
# reference models named in $WHICH: default target only) on $PORT with a throwaway data dir ($DATA), stopped
# when the calling script exits. Extra arguments go to `unlearnd serve`.
start_target_server() {
  BIN=.venv/bin
  export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-2} HF_HUB_OFFLINE=1
  TARGET=$("$BIN/python" - "$PRESET" "${SPLIT:-}" "${WHICH:-target}" <<'PY'
import sys
from unlearnd.train.reference import ensure_reference_models, preset
which = tuple(sys.argv[3].split(","))
print(ensure_reference_models(preset(sys.argv[1], sys.argv[2] or None), which=which, progress=False).target_dir)
PY
)
  DATA=$(mktemp -d)
  "$BIN/unlearnd" serve --model "$TARGET" --served-model-name tofu-target --port "$PORT" --data-dir "$DATA" \
    --log-level warning "$@" > "$DATA/server.log" 2>&1 &
  SERVER=$!
  trap 'kill $SERVER 2>/dev/null; wait $SERVER 2>/dev/null || true' EXIT
  for _ in $(seq 300); do
    curl -sf "http://127.0.0.1:$PORT/health" > /dev/null && return 0
    kill -0 $SERVER 2>/dev/null || { cat "$DATA/server.log"; exit 1; }
    sleep 2
  done
  echo "the server did not answer /health in 600 s" >&2
  exit 1
}
