#!/usr/bin/env bash
# The main job on the embedded default (SmolLM2-135M-Instruct), as `make demo` runs it:
# start the daemon with 2 worker ranks, stream a chat answer (gRPC CLI, then the openai SDK over
# the OpenAI-compatible HTTP API), run a 20-line batch with a progress bar, print the results,
# stop the daemon. Run from the repo root after `make install`.
#   BIN=.venv/bin  OUT=demo-out  scripts/demo.sh
set -euo pipefail
BIN=${BIN:-.venv/bin}
OUT=${OUT:-demo-out}
STATE="$OUT/state"
export HPCSERVE_STATE_DIR="$STATE"   # every client command below finds the daemon through it
mkdir -p "$OUT"
rm -f "$OUT/results.jsonl" "$OUT/errors.jsonl"

echo "== preparing the embedded model (the first run converts the GGUF once, ~40 s)"
"$BIN/hpcserve" models demo >/dev/null

echo "== starting the daemon: 2 worker ranks under mpiexec (log: $OUT/daemon.log)"
"$BIN/hpcserve" serve --model demo --ranks 2 --listen 127.0.0.1:0 --http 127.0.0.1:0 >"$OUT/daemon.log" 2>&1 &
daemon=$!
stop_daemon() {
  if kill -0 "$daemon" 2>/dev/null; then
    echo "== stopping the daemon (SIGTERM: graceful)"
    kill -TERM "$daemon"
    wait "$daemon" || true
  fi
}
trap stop_daemon EXIT
if ! "$BIN/hpcserve" status --wait-ready 300 >/dev/null; then
  tail -n 20 "$OUT/daemon.log" "$STATE/logs/workers.log" >&2 || true
  exit 1
fi
"$BIN/hpcserve" status | head -n 12

echo "== streaming a chat answer"
echo "user> What is the capital of France?"
printf "assistant> "
"$BIN/hpcserve" chat --prompt "What is the capital of France?" --max-tokens 64 --temperature 0

echo "== the same question through the OpenAI-compatible HTTP API (examples/openai_chat.py)"
"$BIN/python" examples/openai_chat.py "What is the capital of France?"

echo "== running a 20-line batch (OpenAI Batch JSONL; one line is bad on purpose)"
"$BIN/hpcserve" submit examples/demo_batch.jsonl --wait --progress -o "$OUT/results.jsonl" --errors "$OUT/errors.jsonl"

echo "== results"
"$BIN/python" examples/show_results.py "$OUT/results.jsonl" "$OUT/errors.jsonl"
