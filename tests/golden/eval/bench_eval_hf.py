#!/usr/bin/env python3
# Multiple-choice evaluation throughput of transformers on the same items as `deepseek eval
# --kind choice`, scored by the same lm-evaluation-harness rules (see generate_eval_refs.py), in
# batches of --batch requests padded at the end; prints acc and items/s.
#
#   python tests/golden/eval/bench_eval_hf.py --model runs/quickstart/hf --write-task /tmp/add.jsonl
#       writes an arithmetic task (`a + b = ` with four candidate sums, 200 items) and scores it
#   python tests/golden/eval/bench_eval_hf.py --model DIR --task FILE [--batch 8] [--threads N]
import argparse
import json
import os
import random
import sys
import time

import torch
import transformers
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM

transformers.logging.set_verbosity_error()


def write_task(path, n=200, seed=0):
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            a, b = rng.randrange(20), rng.randrange(20)
            choices = [a + b, a + b + 1, a + b - 1, a + b + 10]
            order = list(range(4))
            rng.shuffle(order)
            f.write(json.dumps({"context": f".\n{a} + {b} =", "choices": [f" {choices[i]}" for i in order],
                                "answer": order.index(0)}) + "\n")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--task")
    ap.add_argument("--write-task")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.write_task:
        write_task(args.write_task)
        args.task = args.task or args.write_task
    torch.set_num_threads(args.threads or len(os.sched_getaffinity(0)))
    tok = Tokenizer.from_file(os.path.join(args.model, "tokenizer.json"))
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    items = [json.loads(l) for l in open(args.task) if l.strip()]
    t0 = time.perf_counter()
    requests = []
    for item in items:
        context = item.get("question", item.get("context"))
        for c in item["choices"]:
            n = len(context) - len(context.rstrip(" "))
            ctx, cont = (context[:-n], context[-n:] + c) if n else (context, c)
            whole = tok.encode(ctx + cont, add_special_tokens=False).ids
            ctx_ids = tok.encode(ctx, add_special_tokens=False).ids
            requests.append((whole, len(whole) - len(ctx_ids)))
    scores = []
    with torch.no_grad():
        for i in range(0, len(requests), args.batch):
            chunk = requests[i:i + args.batch]
            length = max(len(r) - 1 for r, _ in chunk)
            ids = torch.tensor([r[:-1] + [0] * (length - len(r) + 1) for r, _ in chunk])
            logp = torch.log_softmax(model(input_ids=ids).logits.float(), dim=-1)
            for row, (r, n) in enumerate(chunk):
                end = len(r) - 1
                scores.append(sum(logp[row, j, r[j + 1]].item() for j in range(end - n, end)))
    dt = time.perf_counter() - t0
    at, right = 0, 0
    for item in items:
        k = len(item["choices"])
        s = scores[at:at + k]
        at += k
        right += max(range(k), key=lambda j: s[j]) == item["answer"]
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, threads {torch.get_num_threads()}, "
          f"attn {model.config._attn_implementation}, batch {args.batch}", file=sys.stderr)
    print(json.dumps({"items": len(items), "acc": right / len(items), "items_per_s": len(items) / dt}))


if __name__ == "__main__":
    main()
