#!/usr/bin/env bash
# Fine-tuning step throughput on the `small` preset (batch 8 x 128, Flex on the CPU), ours against
# transformers + PEFT in PyTorch eager, interleaved in one run so both see the same machine:
# full fine-tuning and LoRA (rank 16 on the five MLA projections), ROUNDS rounds each, medians and
# our ratio printed. MTP off on our side (transformers has no MTP training path).
#
#   scripts/bench_sft_vs_peft.sh [PYTHON] [ROUNDS]
#
# PYTHON is an interpreter with the pinned tests/golden/requirements.txt plus peft==0.21.2
# (default: python3).
set -euo pipefail
cd "$(dirname "$0")/.."
py="${1:-python3}"
rounds="${2:-3}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/deepseek-burn/target}"
cargo bench -p deepseek-train --bench train_step --no-run 2>/dev/null
bench() { cargo bench -q -p deepseek-train --bench train_step -- --mtp-depth 0 --steps 10 "$@" 2>/dev/null | awk '/train_tokens_per_s/ {print $2}'; }
hf() { "$py" tests/golden/bench_train_hf.py --steps 10 "$@" 2>/dev/null | awk '/train_tokens_per_s/ {print $2}'; }
declare -A runs
for r in $(seq "$rounds"); do
  of=$(bench); hfull=$(hf); ol=$(bench --lora 16); hl=$(hf --lora 16)
  runs[ours_full]+="$of "; runs[hf_full]+="$hfull "; runs[ours_lora]+="$ol "; runs[hf_lora]+="$hl "
  echo "round $r (tokens/s): ours full $of | transformers full $hfull | ours LoRA $ol | transformers+PEFT LoRA $hl"
done
median() { tr ' ' '\n' <<<"$1" | grep -v '^$' | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
for mode in full lora; do
  o=$(median "${runs[ours_$mode]}"); h=$(median "${runs[hf_$mode]}")
  echo "$mode: ours $o tokens/s, transformers+PEFT $h tokens/s, ratio $(awk -v o="$o" -v h="$h" 'BEGIN {printf "%.2f", o / h}')"
done
