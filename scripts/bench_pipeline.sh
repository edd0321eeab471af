#!/usr/bin/env bash
# Pipeline-parallel training step on the CPU: the `small` preset, 8 micro-batches of 8 x 128
# tokens per step, 4 steps, with one rank, DP=2 and pipeline layouts (stages as threads), one run
# each, back to back. Prints per layout the mean tokens/s of steps 2-4, the ratio to one rank,
# the peak RSS of the process and the loss at step 4 (every layout should end at one rank's).
# The figures in docs/pipeline.md come from this script.
#
#   scripts/bench_pipeline.sh [STEPS]
set -euo pipefail
cd "$(dirname "$0")/.."
steps="${1:-4}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/deepseek-burn/target}"
cargo build -q --release -p deepseek-train
bin="$CARGO_TARGET_DIR/release/deepseek-train"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
base=""
printf '%-32s %10s %8s %10s %12s\n' layout tokens/s ratio peak_GB loss
# ranks, stages, schedule, expert-parallel
for cfg in "1 1 - 1" "2 1 - 1" "2 2 1f1b 1" "2 2 dualpipe 1" "4 4 1f1b 1" "4 4 zb1p 1" \
  "4 4 dualpipe 1" "4 2 dualpipe 2"; do
  read -r ranks stages schedule ep <<<"$cfg"
  out="$work/r$ranks-p$stages-$schedule-ep$ep"
  extra=()
  if [ "$stages" -gt 1 ]; then extra=(--pipeline-parallel "$stages" --schedule "$schedule"); fi
  /usr/bin/time -f "%M" -o "$out.rss" "$bin" pretrain --preset small --steps "$steps" \
    --batch-size 8 --grad-accum 8 --seq-len 128 --eval-every 0 --out "$out" --ranks "$ranks" \
    --expert-parallel "$ep" "${extra[@]}" >/dev/null 2>&1
  read -r tps loss < <(python3 - "$out/metrics.jsonl" <<'PY'
import json, sys
steps = [json.loads(l) for l in open(sys.argv[1]) if '"loss"' in l]
later = steps[1:] or steps
print(round(sum(s["tokens_per_s"] for s in later) / len(later)), steps[-1]["loss"])
PY
)
  base="${base:-$tps}"
  name="ranks $ranks"
  if [ "$stages" -gt 1 ]; then name="$name, PP $stages $schedule"; fi
  if [ "$ep" -gt 1 ]; then name="$name, EP $ep"; fi
  printf '%-32s %10s %8s %10s %12s\n' "$name" "$tps" \
    "$(awk -v t="$tps" -v b="$base" 'BEGIN {printf "%.2fx", t / b}')" \
    "$(awk -v k="$(cat "$out.rss")" 'BEGIN {printf "%.2f", k / 1048576}')" "$loss"
done
