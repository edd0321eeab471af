#!/usr/bin/env bash
# Batch-1 decoding where memory bandwidth rules: examples/random_model's V3-shaped model (hidden
# 1024, 4 blocks, 32 experts top-4, vocab 32000; about 300 MB of weights read per token at f32),
# ours at f32, bf16 and f16 against transformers' generate at f32, interleaved, ROUNDS rounds.
# Each of our runs also measures the memory's read bandwidth right after decoding (`deepseek bench
# --bandwidth`: a 1 GiB sum on all threads), since on a shared machine it moves between runs; the
# table gives the medians of tokens/s, of the bytes read per second, and of the fraction of the
# measured bandwidth.
#
#   scripts/bench_bandwidth.sh [ROUNDS]     # default 3; MODEL=DIR reuses a model, VENV=DIR the env
set -euo pipefail
cd "$(dirname "$0")/.."
rounds="${1:-3}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/deepseek-burn/target}"
model="${MODEL:-$CARGO_TARGET_DIR/bench-models/v3-294m}"
. scripts/torch_venv.sh # sets py

echo "building (release)" >&2
cargo build -q --release -p deepseek-infer --bin deepseek
if [ ! -f "$model/config.json" ]; then
  echo "writing the V3-shaped model to $model (1.2 GB, once)" >&2
  cargo run -q --release -p deepseek-examples --example random_model -- --out "$model"
fi
bin="$CARGO_TARGET_DIR/release/deepseek"

field() { awk -v k="$1" -F': ' '$1 == k {split($2, a, " "); print a[1]}'; }
declare -A runs
add() { runs[$1]+="$2 "; }
for r in $(seq "$rounds"); do
  line="round $r:"
  for dtype in f32 bf16 f16; do
    out=$("$bin" bench --model "$model" --prompt-tokens 16 --new-tokens 32 --repeats 2 --dtype "$dtype" --bandwidth)
    add "tps_$dtype" "$(field decode_tokens_per_s <<<"$out")"
    add "gbs_$dtype" "$(field decode_read_gb_per_s <<<"$out")"
    add "peak_$dtype" "$(field memory_read_gb_per_s <<<"$out")"
    add "frac_$dtype" "$(field bandwidth_fraction <<<"$out")"
    add "bytes_$dtype" "$(field weight_bytes_per_token <<<"$out")"
    line+=" $dtype $(field decode_tokens_per_s <<<"$out") tokens/s ($(field bandwidth_fraction <<<"$out") of $(field memory_read_gb_per_s <<<"$out") GB/s) |"
  done
  hf=$("$py" tests/golden/bench_hf.py --model "$model" --generate 32 --seq 16 2>/dev/null | field hf_generate_tokens_per_s)
  add hf "$hf"
  echo "$line transformers f32 $hf tokens/s" >&2
done

median() { tr ' ' '\n' <<<"$1" | grep -v '^$' | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
hf=$(median "${runs[hf]}")
echo
echo "| weights | bytes read per token | ours tokens/s | read GB/s | measured bandwidth GB/s | fraction | transformers f32 tokens/s | ours / transformers |"
echo "|---|---|---|---|---|---|---|---|"
for dtype in f32 bf16 f16; do
  awk -v d="$dtype" -v b="$(median "${runs[bytes_$dtype]}")" -v t="$(median "${runs[tps_$dtype]}")" \
    -v g="$(median "${runs[gbs_$dtype]}")" -v p="$(median "${runs[peak_$dtype]}")" \
    -v f="$(median "${runs[frac_$dtype]}")" -v h="$hf" \
    'BEGIN {printf "| %s | %.0f MB | %.1f | %.1f | %.1f | %.2f | %.1f | %.2fx |\n", d, b / 1e6, t, g, p, f, h, t / h}'
done
echo
echo "medians of $rounds interleaved rounds; $(nproc) cores"
