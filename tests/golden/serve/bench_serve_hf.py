#!/usr/bin/env python3
"""The load of `examples/loadgen.rs` against Hugging Face transformers' `generate`, one request at
a time (no batching, no server), for scale next to `deepseek serve`'s figures.

Loads the model directory `loadgen make-model` wrote (safetensors + config.json, float32, CPU),
and runs REQUESTS greedy completions with the same token-id prompts the load generator sends
(`(7 + i*31 + t*13) % 1000 + 2`), each exactly MAX_TOKENS new tokens (`min_new_tokens` keeps EOS
from ending one early; the preset has no EOS anyway). Prints generated tokens/s, and the time to
the first token (a prefill plus one token) and per-token latency, median and p99 over requests.

Rerun: python tests/golden/serve/bench_serve_hf.py --model DIR [--requests 8] [--prompt-tokens 32]
  [--max-tokens 128]   (pinned: tests/golden/requirements.txt)
"""
import argparse
import json
import math
import time

import torch
import transformers
from transformers import DeepseekV3ForCausalLM


def percentile(values, p):
    v = sorted(values)
    return v[min(len(v), max(1, math.ceil(p * len(v)))) - 1]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=128)
    args = ap.parse_args()
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM.from_pretrained(args.model, torch_dtype=torch.float32).eval()
    ttft, per_token, tokens = [], [], 0
    start = time.perf_counter()
    with torch.inference_mode():
        for i in range(args.requests):
            prompt = torch.tensor([[(7 + i * 31 + t * 13) % 1000 + 2 for t in range(args.prompt_tokens)]])
            t0 = time.perf_counter()
            model.generate(prompt, max_new_tokens=1, do_sample=False)
            first = time.perf_counter() - t0
            t0 = time.perf_counter()
            out = model.generate(
                prompt, max_new_tokens=args.max_tokens, min_new_tokens=args.max_tokens, do_sample=False
            )
            whole = time.perf_counter() - t0
            n = out.shape[1] - prompt.shape[1]
            tokens += n
            ttft.append(first)
            per_token.append((whole - first) / max(1, n - 1))
    wall = time.perf_counter() - start
    # The TTFT runs are extra work inside the wall time: count only the full generations.
    gen_time = wall - sum(ttft)
    result = {
        "impl": "transformers", "transformers": transformers.__version__, "torch": torch.__version__,
        "threads": torch.get_num_threads(), "requests": args.requests, "tokens": tokens,
        "tokens_per_s": tokens / gen_time,
        "ttft_p50_ms": 1e3 * percentile(ttft, 0.5), "ttft_p99_ms": 1e3 * percentile(ttft, 0.99),
        "itl_p50_ms": 1e3 * percentile(per_token, 0.5), "itl_p99_ms": 1e3 * percentile(per_token, 0.99),
    }
    print(
        f"transformers generate, one request at a time: {result['tokens_per_s']:.1f} tokens/s, "
        f"TTFT p50 {result['ttft_p50_ms']:.1f} ms p99 {result['ttft_p99_ms']:.1f} ms, "
        f"per token p50 {result['itl_p50_ms']:.1f} ms p99 {result['itl_p99_ms']:.1f} ms "
        f"({args.requests} requests, {tokens} tokens)"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
