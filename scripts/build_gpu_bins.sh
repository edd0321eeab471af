#!/usr/bin/env bash
# Builds stripped release binaries with the CUDA backend into gpu-bin/ for scripts/gpu_check.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/deepseek-burn/target}"
mkdir -p gpu-bin
msg() { cargo "$@" --message-format=json | grep -o '"executable":"[^"]*"' | cut -d'"' -f4 | grep -v '^$'; }
forward=$(msg bench -p deepseek-infer --features cuda --bench forward --no-run | tail -1)
golden=$(msg test --release -p deepseek-tests --features cuda --test golden --no-run | tail -1)
cargo build --release -p deepseek-infer --features cuda --bin deepseek
cp "$forward" gpu-bin/forward
cp "$golden" gpu-bin/golden
cp "$CARGO_TARGET_DIR/release/deepseek" gpu-bin/deepseek
strip gpu-bin/*
ls -la gpu-bin
