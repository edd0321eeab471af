#!/usr/bin/env bash
# Speed against PyTorch on the CPU, interleaved in one run so both see the same machine: the
# `small` preset's forward pass (batch 8 x 128), training step (batch 8 x 128, MTP off on our
# side: transformers has no MTP training path) and batch-1 greedy decoding (16-token prompt, 64
# new tokens). ROUNDS rounds alternate ours and transformers 5.23 on torch 2.15 (eager, and the
# default sdpa + grouped_mm where it applies); the medians and our ratio per workload are printed
# as a Markdown table. Ratios from one run are the figure of merit: absolute times on a shared
# machine move between runs.
#
#   scripts/bench_vs_pytorch.sh [ROUNDS]        # default 3; VENV=DIR picks the Python env
#
# The pinned Python environment (tests/golden/requirements.txt: the registry's torch wheel is the
# CUDA build, about 5.6 GB) is created once under ~/.cache/deepseek-burn/venv-torch.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds="${1:-3}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/deepseek-burn/target}"
. scripts/torch_venv.sh # sets py

echo "building the benches (release)" >&2
cargo build -q --release -p deepseek-infer --bin deepseek
cargo bench -q -p deepseek-infer --bench forward --no-run 2>/dev/null
cargo bench -q -p deepseek-train --bench train_step --no-run 2>/dev/null

# Each prints one number: tokens per second.
field() { awk -v k="$1" -F': ' '$1 == k {print $2}'; }
ours_forward() { cargo bench -q -p deepseek-infer --bench forward -- --preset small --batch 8 --seq 128 2>/dev/null | field forward_tokens_per_s; }
hf_forward() { "$py" tests/golden/bench_hf.py --impl "$1" 2>/dev/null | field hf_forward_tokens_per_s; }
ours_train() { cargo bench -q -p deepseek-train --bench train_step -- --preset small --batch 8 --seq 128 --mtp-depth 0 --steps 10 2>/dev/null | field train_tokens_per_s; }
hf_train() { "$py" tests/golden/bench_train_hf.py --impl eager --steps 10 2>/dev/null | field train_tokens_per_s; }
ours_decode() { "$CARGO_TARGET_DIR/release/deepseek" bench --preset small --prompt-tokens 16 --new-tokens 64 --repeats 3 | field decode_tokens_per_s; }
hf_decode() { "$py" tests/golden/bench_hf.py --generate 64 --seq 16 2>/dev/null | field hf_generate_tokens_per_s; }

declare -A runs
add() { runs[$1]+="$2 "; }
for r in $(seq "$rounds"); do
  a=$(ours_forward); b=$(hf_forward eager); c=$(hf_forward default)
  add ours_forward "$a"; add hf_forward_eager "$b"; add hf_forward_default "$c"
  d=$(ours_train); e=$(hf_train)
  add ours_train "$d"; add hf_train "$e"
  f=$(ours_decode); g=$(hf_decode)
  add ours_decode "$f"; add hf_decode "$g"
  echo "round $r (tokens/s): forward ours $a, eager $b, sdpa $c | train ours $d, eager $e | decode ours $f, generate $g" >&2
done

median() { tr ' ' '\n' <<<"$1" | grep -v '^$' | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
row() { # workload, ours key, reference key, reference name
  local o h
  o=$(median "${runs[$2]}"); h=$(median "${runs[$3]}")
  awk -v w="$1" -v o="$o" -v h="$h" -v n="$4" \
    'BEGIN {printf "| %s | %.0f | %s: %.0f | %.2fx |\n", w, o, n, h, o / h}'
}
echo
echo "| workload (small, 2 threads per side) | ours tokens/s | PyTorch tokens/s | ratio |"
echo "|---|---|---|---|"
row "forward, 8 x 128" ours_forward hf_forward_eager "eager"
row "forward, 8 x 128" ours_forward hf_forward_default "sdpa + grouped_mm"
row "training step, 8 x 128" ours_train hf_train "eager"
row "batch-1 decode, 64 tokens after 16" ours_decode hf_decode "generate"
echo
echo "medians of $rounds interleaved rounds; $(nproc) cores"
