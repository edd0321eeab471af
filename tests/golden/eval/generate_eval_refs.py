#!/usr/bin/env python3
# Reference log-likelihoods for `deepseek eval --kind choice`, computed as lm-evaluation-harness
# computes them, with Hugging Face transformers' DeepseekV3ForCausalLM on the golden model
# `v3_yarn_qlora` and the byte-level tokenizer of tests/golden/tokenizer/:
#   - trailing spaces of the context move to the continuation;
#   - whole = encode(context + continuation), context_enc = encode(context),
#     continuation_enc = whole[len(context_enc):];
#   - the model reads (context_enc + continuation_enc)[-(max_length + 1):][:-1], and the
#     log-likelihood is the sum of log-softmax at the continuation's tokens;
# one request at a time (no batching), float32, eager attention and experts.
# Writes tests/golden/eval/choice_refs.json.
#
# Rerun (the pinned venv of tests/golden/requirements.txt): python tests/golden/eval/generate_eval_refs.py
import json
import os

import torch
import transformers
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM

assert torch.__version__.startswith("2.15"), torch.__version__
assert transformers.__version__ == "5.23.0", transformers.__version__
torch.use_deterministic_algorithms(True)
torch.set_num_threads(1)
transformers.logging.set_verbosity_error()

HERE = os.path.dirname(os.path.abspath(__file__))
GOLDEN = os.path.dirname(HERE)
tok = Tokenizer.from_file(os.path.join(GOLDEN, "tokenizer", "byte_tokenizer.json"))
model = AutoModelForCausalLM.from_pretrained(os.path.join(GOLDEN, "v3_yarn_qlora"), dtype=torch.float32,
                                             attn_implementation="eager", experts_implementation="eager").eval()
max_length = model.config.max_position_embeddings


def enc(text):
    return tok.encode(text, add_special_tokens=False).ids


def loglikelihood(context, continuation):
    n_spaces = len(context) - len(context.rstrip(" "))
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = enc(context + continuation)
    context_enc = enc(context)
    cont = whole[len(context_enc):]
    full = (context_enc + cont)[-(max_length + 1):]
    inp = torch.tensor([full[:-1]])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=inp).logits[0].float(), dim=-1)
    targets = full[1:]
    n = len(cont)
    return sum(logp[len(targets) - n + i, targets[len(targets) - n + i]].item() for i in range(n))


refs = []
for line in open(os.path.join(HERE, "choice.jsonl")):
    item = json.loads(line)
    context = item.get("question", item.get("context"))
    refs.append([loglikelihood(context, c) for c in item["choices"]])
json.dump({"loglikelihoods": refs}, open(os.path.join(HERE, "choice_refs.json"), "w"), indent=1)
print(json.dumps(refs))
