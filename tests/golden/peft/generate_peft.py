#!/usr/bin/env python3
# Golden files for LoRA adapters, from Hugging Face PEFT on the golden transformers models.
#
# What it does
#   1. PEFT -> us: wraps `v3_yarn_qlora` (q-LoRA attention) and `v3_no_qlora` (`q_proj`) in
#      PEFT LoRA adapters, gives every lora_A and lora_B random values (B is zero at PEFT's
#      init, which would make the adapter a no-op and the test unable to fail), saves them with
#      `save_pretrained` into tests/golden/peft/<case>/ and writes PEFT's logits on the case's
#      reference input_ids into <case>/peft_logits.safetensors, plus the logits of
#      `merge_and_unload()` (merged_logits) as a check of PEFT's own merge.
#      Cases: `plain` (r 4, alpha 8, attention, on v3_yarn_qlora)
#      and `rslora` (r 8, alpha 4, use_rslora, attention only, on v3_no_qlora).
#   2. us -> PEFT: loads `sft_trained/`, an adapter written by `deepseek-train sft` (see
#      tests/golden/peft/README.md for the command that made it), with
#      `PeftModel.from_pretrained` on v3_yarn_qlora and writes PEFT's logits into
#      sft_trained/peft_logits.safetensors.
#
# How to rerun (from the repository root, in the pinned venv of tests/golden/requirements.txt
# plus peft==0.21.2; keep it out of CI):
#   python tests/golden/peft/generate_peft.py
# Deterministic: fixed seeds, deterministic algorithms, one thread.
import json
import os
import shutil
import sys

import torch
import transformers
import peft

assert torch.__version__.startswith("2.15"), f"need torch 2.15.x, found {torch.__version__}"
assert transformers.__version__ == "5.23.0", f"need transformers 5.23.0, found {transformers.__version__}"
assert peft.__version__ == "0.21.2", f"need peft 0.21.2, found {peft.__version__}"

from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

torch.use_deterministic_algorithms(True)
torch.set_num_threads(1)
transformers.logging.set_verbosity_error()

HERE = os.path.dirname(os.path.abspath(__file__))
GOLDEN = os.path.dirname(HERE)
ATTN = ["q_a_proj", "q_b_proj", "q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]


def base(case):
    model = AutoModelForCausalLM.from_pretrained(
        os.path.join(GOLDEN, case),
        dtype=torch.float32,
        attn_implementation="eager",
        experts_implementation="eager",
    )
    model.eval()
    return model


def input_ids(case):
    return load_file(os.path.join(GOLDEN, case, "reference.safetensors"))["input_ids"]


def make(name, case, r, alpha, rslora, targets, seed):
    model = base(case)
    config = LoraConfig(r=r, lora_alpha=alpha, use_rslora=rslora, target_modules=targets,
                        lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    gen = torch.Generator().manual_seed(seed)
    adapted = 0
    with torch.no_grad():
        for module_name, module in model.named_modules():
            if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
                a = module.lora_A["default"].weight
                b = module.lora_B["default"].weight
                a.copy_(torch.randn(a.shape, generator=gen) / a.shape[1] ** 0.5)
                b.copy_(torch.randn(b.shape, generator=gen) * 0.3)
                adapted += 1
    model.eval()
    ids = input_ids(case)
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float().contiguous()
    out = os.path.join(HERE, name)
    shutil.rmtree(out, ignore_errors=True)
    model.save_pretrained(out)
    # PEFT also writes a model-card template: not part of the golden files.
    if os.path.exists(os.path.join(out, "README.md")):
        os.remove(os.path.join(out, "README.md"))
    # PEFT records the absolute path it loaded from: keep the file independent of this machine.
    cfg_path = os.path.join(out, "adapter_config.json")
    cfg = json.load(open(cfg_path))
    cfg["base_model_name_or_path"] = f"tests/golden/{case}"
    json.dump(cfg, open(cfg_path, "w"), indent=2, sort_keys=True)
    with torch.no_grad():
        merged = model.merge_and_unload()
        merged_logits = merged(input_ids=ids).logits.float().contiguous()
    with torch.no_grad():
        plain = base(case)(input_ids=ids).logits.float()
    diff = (logits - plain).abs().max().item()
    merge_diff = (logits - merged_logits).abs().max().item()
    save_file({"logits": logits, "merged_logits": merged_logits, "input_ids": ids},
              os.path.join(out, "peft_logits.safetensors"))
    print(f"{name}: {adapted} adapted modules on {case}; |adapter - base| max {diff:.4f}; "
          f"|merged - unmerged| max {merge_diff:.2e}")
    assert diff > 0.05, "the adapter must change the logits"


def check_ours(name, case):
    out = os.path.join(HERE, name)
    if not os.path.isdir(out):
        print(f"{name}: not present (make it with the command in tests/golden/peft/README.md)")
        return
    model = PeftModel.from_pretrained(base(case), out)
    model.eval()
    ids = input_ids(case)
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float().contiguous()
        plain = base(case)(input_ids=ids).logits.float()
    n = sum(1 for _, m in model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A)
    diff = (logits - plain).abs().max().item()
    save_file({"logits": logits, "input_ids": ids}, os.path.join(out, "peft_logits.safetensors"))
    print(f"{name}: PEFT loaded {n} adapted modules from our adapter; |adapter - base| max {diff:.4f}")
    assert n > 0 and diff > 1e-3, "our adapter must load and change PEFT's logits"


if __name__ == "__main__":
    make("plain", "v3_yarn_qlora", r=4, alpha=8, rslora=False, targets=ATTN, seed=1)
    make("rslora", "v3_no_qlora", r=8, alpha=4, rslora=True, targets=ATTN, seed=2)
    check_ours("sft_trained", "v3_yarn_qlora")
    sys.exit(0)
