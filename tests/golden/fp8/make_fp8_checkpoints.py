#!/usr/bin/env python3
# FP8 checkpoints in the released DeepSeek-V3 format, made from the v3_yarn_qlora golden case:
# every projection weight (`*_proj.weight`) stored as F8_E4M3 with an F32 `<name>_scale_inv` of
# shape [ceil(rows/br), ceil(cols/bc)], `quantization_config` in config.json. The reference
# logits come from transformers running the weights dequantized here in torch.
#   v3_fp8_128:    weight_block_size [128, 128] (every matrix is one ragged block, as V3's 576-row kv_a_proj)
#   v3_fp8_ragged: weight_block_size [32, 48]   (several blocks, partial ones on both edges)
#   python tests/golden/fp8/make_fp8_checkpoints.py
import json
import os
import shutil
import tempfile

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from generate_fp8 import block_quant  # same directory: the one reference quantizer

HERE = os.path.dirname(os.path.abspath(__file__))
BASE = os.path.join(HERE, "..", "v3_yarn_qlora")


def quantize(w, br, bc):
    codes, scales = block_quant(w, br, bc, ue8m0=False)
    return codes.view(torch.float8_e4m3fn), scales


def dequantize(q, scales, br, bc):
    rows, cols = q.shape
    full = scales.repeat_interleave(br, 0).repeat_interleave(bc, 1)[:rows, :cols]
    return q.float() * full


def make(name, block):
    br, bc = block
    out_dir = os.path.join(HERE, "..", name)
    os.makedirs(out_dir, exist_ok=True)
    config = json.load(open(os.path.join(BASE, "config.json")))
    tensors = load_file(os.path.join(BASE, "model.safetensors"))
    stored, dequant = {}, {}
    for k, v in tensors.items():
        if k.endswith("_proj.weight") and v.dim() == 2:
            q, s = quantize(v.float(), br, bc)
            stored[k] = q
            stored[k + "_scale_inv"] = s
            dequant[k] = dequantize(q, s, br, bc)
        else:
            stored[k] = v
            dequant[k] = v
    fp8_config = dict(config, quantization_config={"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [br, bc]})
    json.dump(fp8_config, open(os.path.join(out_dir, "config.json"), "w"), indent=2)
    save_file(stored, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    ref = load_file(os.path.join(BASE, "reference.safetensors"))
    ids = ref["input_ids"]
    with tempfile.TemporaryDirectory() as tmp:
        json.dump(config, open(os.path.join(tmp, "config.json"), "w"))
        save_file({k: v.contiguous() for k, v in dequant.items()}, os.path.join(tmp, "model.safetensors"))
        model = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32, attn_implementation="eager", experts_implementation="eager").eval()
        with torch.no_grad():
            logits = model(ids).logits.float()
    save_file({"input_ids": ids, "logits": logits.contiguous()}, os.path.join(out_dir, "reference.safetensors"))
    n = sum(1 for k in stored if k.endswith("_scale_inv"))
    print(f"{name}: {n} FP8 weights, block {block}, logits {tuple(logits.shape)}")


torch.set_num_threads(1)
make("v3_fp8_128", (128, 128))
make("v3_fp8_ragged", (32, 48))
