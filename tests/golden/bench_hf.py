#!/usr/bin/env python3
# Times Hugging Face transformers' DeepseekV3ForCausalLM forward pass on CPU (float32, torch.inference_mode,
# default thread count) for the project's "small" configuration, as a baseline for the Burn implementation.
#
# Config: hidden 256, 4 layers (layer 0 dense with intermediate 704, layers 1-3 MoE), 8 heads, q_lora_rank 64,
# kv_lora_rank 32, qk_nope/qk_rope/v head dims 32/16/32, 16 routed experts (moe_intermediate 128) top-4,
# n_group 4 / topk_group 2, 2 shared experts, vocab 1024; input batch 8 x 128 tokens.
# 3 warm-up runs, then the median of 10 timed runs; prints `hf_forward_tokens_per_s: N`.
# With --model DIR (and --dtype) it loads that checkpoint instead (scripts/bench_bandwidth.sh
# decodes examples/random_model's V3-shaped model this way).
#
# Rerun: python -m venv .venv && pip install -r tests/golden/requirements.txt && python tests/golden/bench_hf.py
#   --impl default  (HF's defaults: sdpa attention, grouped_mm experts when available; the default)
#   --impl eager    (eager attention and the per-expert Python loop)
import argparse
import statistics
import time

import torch
import transformers

assert torch.__version__.startswith("2.15"), f"need torch 2.15.x, found {torch.__version__}"
assert transformers.__version__ == "5.23.0", f"need transformers 5.23.0, found {transformers.__version__}"

from transformers import DeepseekV3Config, DeepseekV3ForCausalLM  # noqa: E402
from bench_train_hf import small_config  # noqa: E402  (same directory)

transformers.logging.set_verbosity_error()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--impl", choices=["default", "eager"], default="default")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--generate", type=int, default=0, metavar="N",
                    help="time greedy generate() of N new tokens at batch 1 after a --seq-token prompt instead")
    ap.add_argument("--model", metavar="DIR",
                    help="a model directory (config.json + safetensors, e.g. examples/random_model's) instead of `small`")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                    help="weights and activations of a --model")
    args = ap.parse_args()

    torch.manual_seed(0)
    if args.model:
        dtype = getattr(torch, args.dtype)
        kwargs = {} if args.impl == "default" else {"attn_implementation": "eager", "experts_implementation": "eager"}
        model = DeepseekV3ForCausalLM.from_pretrained(args.model, dtype=dtype, **kwargs).eval()
        config = model.config
        config.use_cache = True
    else:
        # The `small` preset, as the training benchmark builds it.
        config = small_config()
        config.use_cache = True  # generate() decodes over the KV cache
        if args.impl == "eager":
            config._attn_implementation = "eager"
            config._experts_implementation = "eager"
        model = DeepseekV3ForCausalLM(config).eval()
    n_params = sum(p.numel() for p in model.parameters())
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq))
    tokens = args.batch * args.seq

    if args.generate:
        prompt = ids[:1]
        kwargs = dict(max_new_tokens=args.generate, min_new_tokens=args.generate, do_sample=False, use_cache=True)
        with torch.inference_mode():
            model.generate(prompt, **kwargs)
            times = []
            for _ in range(3):
                t0 = time.perf_counter()
                model.generate(prompt, **kwargs)
                times.append(time.perf_counter() - t0)
        best = min(times)
        print(f"generate {args.generate} tokens after {args.seq} prompt tokens: best {best:.3f} s")
        print(f"hf_generate_tokens_per_s: {args.generate / best:.1f}")
        return

    with torch.inference_mode():
        for _ in range(args.warmup):
            model(input_ids=ids, use_cache=False)
        times = []
        for _ in range(args.iters):
            t0 = time.perf_counter()
            model(input_ids=ids, use_cache=False)
            times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, threads {torch.get_num_threads()}, "
          f"attn {model.config._attn_implementation}, experts {model.config._experts_implementation}, "
          f"params {n_params}, batch {args.batch} x {args.seq}")
    print(f"forward median {med * 1e3:.2f} ms (min {min(times) * 1e3:.2f}, max {max(times) * 1e3:.2f})")
    print(f"hf_forward_tokens_per_s: {tokens / med:.0f}")


if __name__ == "__main__":
    main()
