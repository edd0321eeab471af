#!/usr/bin/env bash
# Correctness, then timings, on a machine with an NVIDIA GPU and no Rust toolchain. Expects the
# release binaries built here with `--features cuda` (see `scripts/build_gpu_bins.sh`) in
# `gpu-bin/`, and writes what it measures to $OUT (or ./gpu-out).
set -u
OUT="${OUT:-gpu-out}"
mkdir -p "$OUT"
# CUDA's NVRTC (and NCCL) come with the Python wheels or the toolkit; Burn loads them at run time.
libs=$(timeout 60 find / \( -name 'libnvrtc.so*' -o -name 'libnccl.so*' -o -name 'libcudart.so*' \) -not -path '/proc/*' 2>/dev/null | xargs -r -n1 dirname | sort -u | tr '\n' ':')
export LD_LIBRARY_PATH="${libs}${LD_LIBRARY_PATH:-}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"

echo "== golden comparisons on CUDA"
DEEPSEEK_TEST_CUDA=1 timeout 300 gpu-bin/golden --nocapture --test-threads 1 golden_cases_match_transformers_on_cuda 2>&1 | tee "$OUT/golden_cuda.txt" | grep -E "logits|test |result"

echo "== deepseek logits --device cuda"
for case in v3_yarn_qlora v3_no_qlora v5_style; do
  timeout 120 gpu-bin/deepseek logits --model "tests/golden/$case" --input "tests/golden/$case/reference.safetensors" \
    --output "$OUT/logits_$case.safetensors" --device cuda || echo "logits $case failed"
done

echo "== forward throughput"
for dev in cuda flex; do
  for shape in "8 128" "32 512"; do
    set -- $shape
    timeout 150 gpu-bin/forward --device "$dev" --preset small --batch "$1" --seq "$2" --runs 10 2>&1 | tee -a "$OUT/bench.txt" | grep -E "device|batch|tokens_per_s|median"
  done
done
