#!/usr/bin/env bash
# Correctness, then timings, on a machine with an NVIDIA GPU and no Rust toolchain. Expects the
# release binaries that scripts/build_gpu_bins.sh builds with `--features cuda`, xz-compressed in
# gpu-bin/, and writes what it measures to $OUT (or ./gpu-out). Every step has its own timeout.
set -u
OUT="${OUT:-gpu-out}"
mkdir -p "$OUT"
for name in forward golden half_precision deepseek fp8_kernels fp8_bench moe_kernels moe_bench; do
  if command -v xz >/dev/null; then xz -d -c "gpu-bin/$name.xz" > "gpu-bin/$name"
  else python3 -c 'import lzma,sys; sys.stdout.buffer.write(lzma.open(sys.argv[1]).read())' "gpu-bin/$name.xz" > "gpu-bin/$name"; fi
  chmod +x "gpu-bin/$name"
done
# CUDA's NVRTC (and NCCL) come with the Python wheels or the toolkit; Burn loads them at run time.
libs=$(timeout 60 find / \( -name 'libnvrtc.so*' -o -name 'libnccl.so*' \) -not -path '/proc/*' -not -path '*stubs*' 2>/dev/null | xargs -r -n1 dirname | sort -u | tr '\n' ':')
export LD_LIBRARY_PATH="${libs}${LD_LIBRARY_PATH:-}"
echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"

echo "== golden comparisons on CUDA (all three cases)"
DEEPSEEK_TEST_CUDA=1 timeout 200 gpu-bin/golden --nocapture --test-threads 1 golden_cases_match_transformers_on_cuda > "$OUT/golden_cuda.txt" 2>&1
echo "exit $?"; grep -E "logits|mtp|test |result|panicked" "$OUT/golden_cuda.txt" | head -20

echo "== bf16 and f16 weights on CUDA against the f32 reference"
DEEPSEEK_TEST_CUDA=1 timeout 120 gpu-bin/half_precision --nocapture --test-threads 1 half_precision_on_cuda > "$OUT/half_precision_cuda.txt" 2>&1
echo "exit $?"; grep -E "logits|near-tie|greedy|test |result|panicked" "$OUT/half_precision_cuda.txt" | head -30

if [ -n "${SKIP_LOGITS:-}" ]; then echo "== logits skipped"; else
echo "== deepseek logits --device cuda"
timeout 45 gpu-bin/deepseek logits --model tests/golden/v3_yarn_qlora --input tests/golden/v3_yarn_qlora/reference.safetensors \
  --output "$OUT/logits_v3_yarn_qlora.safetensors" --device cuda; echo "exit $?"
fi

echo "== FP8 kernels against their twins on CUDA"
timeout 120 gpu-bin/fp8_kernels --test-threads 1 > "$OUT/fp8_kernels.txt" 2>&1
echo "exit $?"; grep -E "^test |result|panicked" "$OUT/fp8_kernels.txt" | head -20
echo "== FP8 GEMM benchmark on CUDA"
timeout 120 gpu-bin/fp8_bench --device cuda --sizes 4096x4096x4096,8192x7168x2048,4096x576x7168 --iters 10 2>&1 | tee "$OUT/fp8_bench.txt" | tail -30

echo "== MoE dispatch/combine kernels against their twins on CUDA"
timeout 120 gpu-bin/moe_kernels --test-threads 1 > "$OUT/moe_kernels.txt" 2>&1
echo "exit $?"; grep -E "^test |result|panicked" "$OUT/moe_kernels.txt" | head -20
echo "== routed experts: device kernels vs host plan vs grouped GEMM on CUDA"
timeout 150 gpu-bin/moe_bench --device cuda --tokens 1024,4096 --iters 5 2>&1 | tee "$OUT/moe_bench.txt" | tail -12

echo "== forward throughput"
bench() { timeout "$BENCH_TIMEOUT" gpu-bin/forward --preset small --runs 10 "$@" 2>&1 | tee -a "$OUT/bench.txt" | grep -E "device|expert_path|batch|tokens_per_s|median|rror|panic"; }
# CubeCL autotunes every new matmul shape on first use: the warm-up runs take long, the
# per-expert path (one shape per expert and layer) longest.
BENCH_TIMEOUT=${BENCH_TIMEOUT:-150}
bench --device cuda --expert-path grouped --batch 8 --seq 128 --warmup 2
bench --device cuda --expert-path grouped --batch 32 --seq 512 --warmup 2
if [ -n "${BENCH_PER_EXPERT:-}" ]; then bench --device cuda --expert-path per-expert --batch 8 --seq 128; fi
if [ -n "${BENCH_FLEX:-}" ]; then bench --device flex --expert-path per-expert --batch 8 --seq 128; fi

echo "== decoding with f32 and bf16 weights on CUDA"
for dt in f32 bf16; do
  timeout 60 gpu-bin/deepseek bench --preset small --device cuda --dtype "$dt" --prompt-tokens 128 --new-tokens 32 --repeats 2 2>&1 \
    | tee -a "$OUT/decode_dtype.txt" | grep -E "dtype|tokens_per_s|rror|panic"
done
