#!/usr/bin/env bash
# Wall time of one GRPO step, ours (`deepseek-train grpo`, Flex on the CPU) against TRL 1.16's GRPOTrainer
# (transformers + PEFT, PyTorch eager), interleaved in one run so both see the same machine: the same model
# directory, 16 arithmetic prompts x 8 completions of at most 6 tokens, temperature 1, LoRA r16/α32 on the
# attention and MLP projections, lr 3e-4, β 0, one iteration, token-level loss. STEPS steps per round (the first
# unmeasured), ROUNDS rounds; medians and the ratio printed.
#
#   scripts/bench_grpo_vs_trl.sh MODEL_DIR [PYTHON] [ROUNDS] [STEPS]
#
# MODEL_DIR: an HF-layout model with tokenizer.json and a chat template (e.g. runs/grpo/base from
# `cargo run --release -p deepseek-examples --example grpo`). PYTHON: an interpreter with the pinned
# tests/golden/requirements.txt plus trl==1.16.0 (default: python3).
set -euo pipefail
cd "$(dirname "$0")/.."
model="$1"
py="${2:-python3}"
rounds="${3:-3}"
steps="${4:-6}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/deepseek-burn/target}"
cargo build -q --release -p deepseek-train
bin="$CARGO_TARGET_DIR/release/deepseek-train"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
ours() {
  rm -rf "$tmp/run"
  "$bin" grpo --model "$model" --out "$tmp/run" --steps "$steps" --group 8 --prompts-per-step 16 \
    --max-new-tokens 6 --temperature 1 --lr 3e-4 --lora-targets attn+mlp --eval-prompts 1 --eval-every 0 \
    --checkpoint-every 0 --micro-batch 128 --rollout-batch 128 >/dev/null 2>&1
  "$py" - "$tmp/run/metrics.jsonl" <<'PY'
import json, statistics, sys
steps = [json.loads(l) for l in open(sys.argv[1]) if '"reward"' in l][1:]
print(f"{statistics.median(s['rollout_s'] + s['train_s'] for s in steps):.4f} "
      f"{statistics.median(s['rollout_s'] for s in steps):.4f} {statistics.median(s['train_s'] for s in steps):.4f}")
PY
}
trl() { "$py" tests/golden/grpo/bench_grpo_trl.py --model "$model" --steps $((steps - 1)) 2>/dev/null | awk '/grpo_step_s/ {print $2}'; }
o_all=""; t_all=""
for r in $(seq "$rounds"); do
  read -r o orl otr < <(ours); t=$(trl)
  o_all+="$o "; t_all+="$t "
  echo "round $r (s/step): ours $o (rollout $orl, train $otr) | TRL $t"
done
median() { tr ' ' '\n' <<<"$1" | grep -v '^$' | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
o=$(median "$o_all"); t=$(median "$t_all")
echo "GRPO step: ours $o s, TRL $t s, TRL/ours $(awk -v o="$o" -v t="$t" 'BEGIN {printf "%.2f", t / o}')"
