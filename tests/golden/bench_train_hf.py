#!/usr/bin/env python3
# Training-step throughput of Hugging Face transformers' DeepseekV3ForCausalLM in PyTorch eager mode (no
# torch.compile), float32, CPU, on the project's "small" configuration, as a baseline for the Burn trainer.
#
# Config (deepseek-core/src/config.rs `DeepSeekConfig::small`): vocab 1024, hidden 256, 4 layers (layer 0 dense
# with intermediate 704, layers 1-3 MoE), 8 heads, q_lora_rank 64, kv_lora_rank 32, qk_nope/qk_rope/v head dims
# 32/16/32, 16 routed experts (moe_intermediate 128) top-4, n_group 4 / topk_group 2, 2 shared experts,
# routed_scaling_factor 2.5, sigmoid + noaux_tc routing, plain RoPE (theta 10000, no YaRN), rms_norm_eps 1e-6,
# untied head, max_position_embeddings 2048. HF's default init (std 0.02).
#
# One step: forward on random token ids (a fresh seeded batch each step), cross-entropy of logits[:, :-1]
# against ids[:, 1:], backward, clip_grad_norm_(1.0), AdamW(lr 2.2e-4, betas (0.9, 0.95), weight_decay 0.1)
# step, zero_grad. Throughput counts batch x seq input tokens per step; the figure is the median over the
# measured steps (after --warmup unmeasured ones).
#
# Not included: multi-token prediction. The small preset has num_nextn_predict_layers = 1, but transformers'
# DeepseekV3ForCausalLM has no MTP training path (its MtpModel is a draft model for generate), so this is the
# main model only. No auxiliary balance loss and no update of the routing bias `e_score_correction_bias` (a
# buffer in HF) either.
#
# Rerun: pip install -r tests/golden/requirements.txt && python tests/golden/bench_train_hf.py
#   --impl default  (HF's defaults: sdpa attention, grouped_mm experts when available; the default)
#   --impl eager    (eager attention and the per-expert Python loop)
#   --lora R        (PEFT LoRA of rank R, alpha 2R, on the five MLA projections, base frozen, no weight decay:
#                    the fine-tuning step `cargo bench -p deepseek-train --bench train_step -- --lora R` times;
#                    needs peft==0.21.2)
import argparse
import os
import statistics
import sys
import time

import torch
import transformers

assert torch.__version__.startswith("2.15"), f"need torch 2.15.x, found {torch.__version__}"
assert transformers.__version__ == "5.23.0", f"need transformers 5.23.0, found {transformers.__version__}"

from transformers import DeepseekV3Config, DeepseekV3ForCausalLM  # noqa: E402

transformers.logging.set_verbosity_error()


def small_config():
    return DeepseekV3Config(
        vocab_size=1024,
        hidden_size=256,
        intermediate_size=704,
        moe_intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=8,
        n_shared_experts=2,
        n_routed_experts=16,
        num_experts_per_tok=4,
        n_group=4,
        topk_group=2,
        routed_scaling_factor=2.5,
        norm_topk_prob=True,
        first_k_dense_replace=1,
        q_lora_rank=64,
        kv_lora_rank=32,
        qk_nope_head_dim=32,
        qk_rope_head_dim=16,
        v_head_dim=32,
        max_position_embeddings=2048,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        rope_interleave=True,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        attention_dropout=0.0,
        num_mtp_layers=0,
        use_cache=False,
        dtype="float32",
    )


def main():
    ap = argparse.ArgumentParser(description="HF DeepSeek-V3 training-step throughput on the `small` preset")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20, help="measured steps (default 20)")
    ap.add_argument("--warmup", type=int, default=3, help="unmeasured steps first (default 3)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: all cores)")
    ap.add_argument("--impl", choices=["default", "eager"], default="default")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lora", type=int, default=0, help="LoRA rank on the MLA projections (0: train every weight)")
    args = ap.parse_args()
    if args.steps < 1 or args.seq < 2:
        ap.error("need --steps >= 1 and --seq >= 2")

    threads = args.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    torch.manual_seed(args.seed)

    config = small_config()
    if args.impl == "eager":
        config._attn_implementation = "eager"
        config._experts_implementation = "eager"
    model = DeepseekV3ForCausalLM(config).train()
    n_params = sum(p.numel() for p in model.parameters())
    decay = 0.1
    if args.lora:
        from peft import LoraConfig, get_peft_model
        targets = ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]
        model = get_peft_model(model, LoraConfig(r=args.lora, lora_alpha=2 * args.lora, target_modules=targets,
                                                 lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")).train()
        decay = 0.0
    params = [p for p in model.parameters() if p.requires_grad]
    print(f"trainable params {sum(p.numel() for p in params)} of {n_params}", file=sys.stderr)
    opt = torch.optim.AdamW(params, lr=2.2e-4, betas=(0.9, 0.95), weight_decay=decay)
    gen = torch.Generator().manual_seed(args.seed + 1)
    tokens = args.batch * args.seq

    times = []
    for step in range(args.warmup + args.steps):
        ids = torch.randint(0, config.vocab_size, (args.batch, args.seq), generator=gen)
        t0 = time.perf_counter()
        logits = model(input_ids=ids, use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, config.vocab_size).float(), ids[:, 1:].reshape(-1))
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        measured = step >= args.warmup
        if measured:
            times.append(dt)
        print(f"step {step:3d}{'' if measured else ' (warmup)'}: loss {loss.item():.4f} grad_norm {gnorm.item():.3f} "
              f"{dt * 1e3:.1f} ms {tokens / dt:.0f} tok/s", file=sys.stderr, flush=True)

    med = statistics.median(times)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, threads {torch.get_num_threads()}, "
          f"attn {model.config._attn_implementation}, experts {model.config._experts_implementation}, "
          f"params {n_params}, lora rank {args.lora or 'none'}, batch {args.batch} x {args.seq}, {args.warmup} warmup + {args.steps} measured steps")
    print("note: main model only; transformers' DeepseekV3 has no MTP training path, so the small preset's "
          "MTP module (num_nextn_predict_layers = 1) is not trained here")
    print(f"step median {med * 1e3:.1f} ms (min {min(times) * 1e3:.1f}, max {max(times) * 1e3:.1f})")
    print(f"train_tokens_per_s: {tokens / med:.0f}")


if __name__ == "__main__":
    main()
