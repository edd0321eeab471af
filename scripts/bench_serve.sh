#!/usr/bin/env bash
# Serving throughput of `deepseek serve` on the `small` preset (random weights, Flex on the CPU):
# aggregate decode tokens/s with p50/p99 time to first token and inter-token latency at 1, 4, 16
# and 64 concurrent streams, from the load generator (examples/loadgen.rs, a bounded number of
# streamed greedy requests per round), then the same requests through transformers' `generate`
# one at a time, for scale. One run, same machine.
#
#   scripts/bench_serve.sh [PYTHON] [MAX_TOKENS] [REQUESTS_PER_STREAM]
#
# PYTHON has tests/golden/requirements.txt installed (default: python3; "none" skips it).
set -euo pipefail
cd "$(dirname "$0")/.."
py="${1:-python3}"
max_tokens="${2:-128}"
per_stream="${3:-4}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/deepseek-burn/target}"
cargo build -q --release -p deepseek-infer --bin deepseek -p deepseek-examples --example loadgen
bin="$CARGO_TARGET_DIR/release"
work=$(mktemp -d)
trap 'kill "$server" 2>/dev/null || true; rm -rf "$work"' EXIT
"$bin/examples/loadgen" make-model --out "$work/model" --preset small
"$bin/deepseek" serve --model "$work/model" --port 0 --max-batch 64 --served-model-name bench 2>"$work/serve.log" &
server=$!
for _ in $(seq 100); do grep -q "listening on" "$work/serve.log" && break; sleep 0.1; done
url=$(grep -o 'http://[0-9.:]*' "$work/serve.log" | head -1)
echo "deepseek serve at $url (max batch 64), $max_tokens tokens per request, 32-token prompts"
"$bin/examples/loadgen" run --url "$url" --streams 1,4,16,64 --prompt-tokens 32 \
  --max-tokens "$max_tokens" --requests-per-stream "$per_stream" | grep '^streams'
kill -INT "$server"; wait "$server" || true
if [ "$py" != none ]; then
  "$py" tests/golden/serve/bench_serve_hf.py --model "$work/model" --requests 8 --prompt-tokens 32 \
    --max-tokens "$max_tokens" 2>/dev/null | head -1
fi
