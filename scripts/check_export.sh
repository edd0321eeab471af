#!/usr/bin/env bash
# Checks a trained, exported model (`<run>/hf`) against Hugging Face transformers: random input
# ids, logits from `deepseek logits`, then transformers' logits on the same ids.
#   scripts/check_export.sh runs/quickstart/hf [PYTHON]
# Needs the Python env of tests/golden/requirements.txt.
set -euo pipefail
model="${1:?usage: scripts/check_export.sh MODEL_DIR [PYTHON]}"
python="${2:-python3}"
cd "$(dirname "$0")/.."
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$python" tests/golden/check_export.py --write-input "$tmp/ids.safetensors" --model "$model" --batch 2 --seq 64 --seed 0
cargo run -q -p deepseek-infer --bin deepseek -- logits --model "$model" --input "$tmp/ids.safetensors" --output "$tmp/logits.safetensors"
"$python" tests/golden/check_export.py --model "$model" --input "$tmp/ids.safetensors" --logits "$tmp/logits.safetensors"
