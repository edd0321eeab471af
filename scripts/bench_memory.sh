#!/usr/bin/env bash
# Peak memory (max RSS, /usr/bin/time) of loading + decoding a 1.19 GB (f32) V3-shaped model with
# random weights at f32, bf16 and f16, and of its FP8 conversion held resident (E4M3 codes) or
# dequantized, and of training steps of the `small` preset (full in f32, bf16 and f16 mixed
# precision, and LoRA), each next to what `deepseek info --plan` predicts for it; then
# decode throughput per dtype. Prints a Markdown table. No downloads.
#
#   scripts/bench_memory.sh            # MODEL=DIR reuses a model written by examples/random_model
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/deepseek-burn/target}"
cargo build -q --release -p deepseek-infer --bin deepseek -p deepseek-examples --example random_model
train_step=$(cargo bench -q -p deepseek-train --bench train_step --no-run --message-format=json 2>/dev/null \
  | python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and "bench" in m["target"]["kind"] and m.get("executable"):
        print(m["executable"])')
bin="$CARGO_TARGET_DIR/release"
model="${MODEL:-$CARGO_TARGET_DIR/bench-models/v3-294m}"
if [ ! -f "$model/config.json" ]; then
  "$bin/examples/random_model" --out "$model" >/dev/null
fi

# Max RSS in bytes of a command (its output discarded).
peak() { /usr/bin/time -f '%M' "$@" 2>&1 >/dev/null | tail -1 | awk '{print $1 * 1024}'; }
plan() { "$bin/deepseek" info --plan "$@" | awk -F': ' '/^total_bytes/ {print $2}'; }
row() { # what, measured bytes, planned bytes
  awk -v w="$1" -v m="$2" -v p="$3" 'BEGIN { printf "| %s | %.0f MB | %.0f MB | %+.0f%% |\n", w, m/1e6, p/1e6, 100*(p-m)/m }'
}
baseline=$(peak "$bin/deepseek" info --preset small)
fp8="${model}-fp8"
if [ ! -f "$fp8/config.json" ]; then
  "$bin/deepseek" convert --model "$model" --out "$fp8" --dtype fp8 >/dev/null
fi

echo "process baseline (deepseek info): $((baseline / 1000000)) MB"
echo
echo "| run | peak RSS | planned | planner error |"
echo "|---|---|---|---|"
for dt in f32 bf16 f16; do
  m=$(peak "$bin/deepseek" bench --model "$model" --dtype "$dt" --prompt-tokens 64 --new-tokens 16 --repeats 1)
  p=$(plan --model "$model" --task infer --dtype "$dt" --batch 1 --seq 80)
  row "load + decode 80 tokens, 296M model, $dt" "$m" "$p"
done
for dt in f32 bf16 f16; do
  m=$(peak "$bin/deepseek" bench --model "$fp8" --dtype "$dt" --prompt-tokens 64 --new-tokens 16 --repeats 1)
  p=$(plan --model "$fp8" --task infer --fp8 --dtype "$dt" --batch 1 --seq 80)
  row "load + decode 80 tokens, 296M model in FP8, resident, $dt activations" "$m" "$p"
done
for dt in f32 bf16; do
  m=$(peak "$bin/deepseek" bench --model "$fp8" --dtype "$dt" --dequantize --prompt-tokens 64 --new-tokens 16 --repeats 1)
  p=$(plan --model "$fp8" --task infer --dtype "$dt" --batch 1 --seq 80)
  row "load + decode 80 tokens, 296M model in FP8, --dequantize, $dt" "$m" "$p"
done
for seq in 128 256 512; do
  m=$(peak "$train_step" --preset small --batch 8 --seq "$seq" --steps 2 --warmup 1)
  p=$(plan --preset small --task train --batch 8 --seq "$seq")
  row "train step, small, 8 x $seq, f32" "$m" "$p"
done
for dt in bf16 f16; do
  m=$(peak "$train_step" --preset small --batch 8 --seq 512 --steps 2 --warmup 1 --dtype "$dt")
  p=$(plan --preset small --task train --dtype "$dt" --batch 8 --seq 512)
  row "train step, small, 8 x 512, $dt mixed precision" "$m" "$p"
done
m=$(peak "$train_step" --preset small --batch 8 --seq 128 --steps 2 --warmup 1 --lora 16)
p=$(plan --preset small --task lora --lora-rank 16 --batch 8 --seq 128)
row "LoRA r16 step, small, 8 x 128, f32" "$m" "$p"

echo
echo "| dtype | prefill tokens/s | decode tokens/s (296M model, 64 + 64 tokens) |"
echo "|---|---|---|"
speed() { # label, bench arguments
  local label="$1"; shift
  out=$("$bin/deepseek" bench "$@" --prompt-tokens 64 --new-tokens 64 --repeats 3)
  pre=$(echo "$out" | awk -F': ' '/^prefill_tokens_per_s/ {print $2}')
  dec=$(echo "$out" | awk -F': ' '/^decode_tokens_per_s/ {print $2}')
  echo "| $label | $pre | $dec |"
}
for dt in f32 bf16 f16; do
  speed "$dt" --model "$model" --dtype "$dt"
done
speed "FP8-resident, f32 activations" --model "$fp8" --dtype f32
speed "FP8-resident, bf16 activations" --model "$fp8" --dtype bf16
speed "FP8 checkpoint, --dequantize (f32)" --model "$fp8" --dtype f32 --dequantize
