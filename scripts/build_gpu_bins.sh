#!/usr/bin/env bash
# Builds release binaries with the CUDA backend for scripts/gpu_check.sh: stripped and
# xz-compressed into gpu-bin/ (a few MB each, to stay small when copied to the GPU machine).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/deepseek-burn/target}"
mkdir -p gpu-bin
# The executable of the one target of `kind` that a cargo JSON build log names.
exe() {
  python3 -c 'import json,sys
kind = sys.argv[1]
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and kind in m["target"]["kind"] and m.get("executable"):
        print(m["executable"])' "$1"
}
forward=$(cargo bench -p deepseek-infer --features cuda --bench forward --no-run --message-format=json | exe bench)
golden=$(cargo test --release -p deepseek-tests --features cuda --test golden --no-run --message-format=json | exe test)
half_precision=$(cargo test --release -p deepseek-tests --features cuda --test half_precision --no-run --message-format=json | exe test)
fp8_kernels=$(cargo test --release -p deepseek-tests --features cuda --test fp8_kernels --no-run --message-format=json | exe test)
fp8_bench=$(cargo bench -p deepseek-core --features cuda --bench fp8 --no-run --message-format=json | exe bench)
moe_kernels=$(cargo test --release -p deepseek-tests --features cuda --test moe_kernels --no-run --message-format=json | exe test)
moe_bench=$(cargo bench -p deepseek-core --features cuda --bench moe --no-run --message-format=json | exe bench)
cargo build --release -p deepseek-infer --features cuda --bin deepseek
for pair in "forward:$forward" "golden:$golden" "half_precision:$half_precision" "fp8_kernels:$fp8_kernels" "fp8_bench:$fp8_bench" "moe_kernels:$moe_kernels" "moe_bench:$moe_bench" "deepseek:$CARGO_TARGET_DIR/release/deepseek"; do
  name=${pair%%:*}; path=${pair#*:}
  strip -o "gpu-bin/$name" "$path"
  xz -T2 -6 -f "gpu-bin/$name"
done
ls -la gpu-bin
