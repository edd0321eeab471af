#!/usr/bin/env python3
# Wall time of one GRPO step with TRL's GRPOTrainer (transformers + PEFT, PyTorch eager, float32, CPU) on a
# model directory we exported, as the baseline of `deepseek-train grpo` (scripts/bench_grpo_vs_trl.sh runs both,
# interleaved, on the same machine).
#
# The step matches ours: the built-in arithmetic task's prompts ("a plus b", a, b < 20) rendered with the model's
# chat template, 16 prompts x 8 completions (num_generations 8), at most 6 new tokens, temperature 1, the
# exact-answer reward (the last number of the completion equals a + b), LoRA r 16 / alpha 32 on the attention
# and MLP projections (q_a_proj, q_b_proj, kv_a_proj_with_mqa, kv_b_proj, o_proj, gate_proj, up_proj,
# down_proj), AdamW lr 3e-4, beta 0 (no reference model), one iteration, loss_type "dapo" (token-level, our
# default), no gradient checkpointing. Generation is transformers' generate() (no vLLM on a CPU).
#
# Prints one line per measured step and `grpo_step_s MEDIAN` (after --warmup unmeasured steps).
#
# Rerun: pip install -r tests/golden/requirements.txt trl==1.16.0 &&
#        python tests/golden/grpo/bench_grpo_trl.py --model runs/grpo/base --steps 5
import argparse
import json
import os
import re
import statistics
import sys
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import transformers  # noqa: E402
import trl  # noqa: E402

assert trl.__version__ == "1.16.0", f"need trl 1.16.0, found {trl.__version__}"
from datasets import Dataset  # noqa: E402
from peft import LoraConfig  # noqa: E402
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, TrainerCallback  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

transformers.logging.set_verbosity_error()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True, help="an HF-layout directory with tokenizer.json and a chat template")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = json.load(open(os.path.join(args.model, "tokenizer_config.json")))
    tok = PreTrainedTokenizerFast(tokenizer_file=os.path.join(args.model, "tokenizer.json"))
    tok.chat_template = cfg["chat_template"]
    # The end-of-turn text (a newline in the byte-level example models) as its token string.
    eos_ids = tok(cfg.get("eos_token") or "\n", add_special_tokens=False).input_ids
    assert len(eos_ids) == 1, f"the EOS text is {len(eos_ids)} tokens"
    tok.eos_token = tok.convert_ids_to_tokens(eos_ids[0])
    tok.pad_token = tok.convert_ids_to_tokens(0)
    model = AutoModelForCausalLM.from_pretrained(args.model, torch_dtype=torch.float32)
    model.generation_config.eos_token_id = eos_ids[0]
    model.generation_config.pad_token_id = 0
    prompts, answers = [], []
    for a in range(20):
        for b in range(20):
            prompts.append(tok.apply_chat_template([{"role": "user", "content": f"{a} plus {b}"}], tokenize=False, add_generation_prompt=True))
            answers.append(str(a + b))
    data = Dataset.from_dict({"prompt": prompts, "answer": answers}).shuffle(seed=0)

    def exact_answer(completions, answer, **_):
        out = []
        for c, a in zip(completions, answer):
            nums = re.findall(r"-?\d+", c)
            out.append(1.0 if nums and nums[-1] == a else 0.0)
        return out

    times = []

    class Clock(TrainerCallback):
        def on_step_begin(self, *_, **__):
            self.t = time.perf_counter()

        def on_step_end(self, *_, **__):
            times.append(time.perf_counter() - self.t)
            print(f"step {len(times)}: {times[-1]:.3f} s", file=sys.stderr)

    config = GRPOConfig(
        output_dir="/tmp/bench_grpo_trl",
        per_device_train_batch_size=128,
        num_generations=8,
        max_completion_length=6,
        temperature=1.0,
        learning_rate=3e-4,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        beta=0.0,
        num_iterations=1,
        loss_type="dapo",
        max_steps=args.warmup + args.steps,
        logging_steps=1000,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        bf16=False,
        seed=0,
        dataloader_num_workers=0,
        gradient_checkpointing=False,  # ours does not recompute activations either
    )
    lora = LoraConfig(
        r=16,
        lora_alpha=32,
        target_modules=["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        task_type="CAUSAL_LM",
    )
    trainer = GRPOTrainer(model=model, reward_funcs=exact_answer, args=config, train_dataset=data, processing_class=tok, peft_config=lora, callbacks=[Clock()])
    trainer.train()
    measured = times[args.warmup:]
    print(f"grpo_step_s {statistics.median(measured):.4f}")


if __name__ == "__main__":
    main()
