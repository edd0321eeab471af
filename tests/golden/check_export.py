#!/usr/bin/env python3
# Checks a model directory in Hugging Face layout (as our trainer exports it) against Hugging Face
# transformers: the directory must load with AutoModelForCausalLM without missing weights, and
# transformers' logits must match the logits our Rust CLI (`deepseek logits`) wrote for the same input.
#
# Round trip (from the repository root):
#   python tests/golden/check_export.py --write-input ids.safetensors --model DIR --batch 2 --seq 32 --seed 0
#   deepseek logits --model DIR --input ids.safetensors --output logits.safetensors
#   python tests/golden/check_export.py --model DIR --input ids.safetensors --logits logits.safetensors [--atol 1e-4]
#
# The model directory holds:
#   config.json        DeepSeek's original style (`rope_scaling`, `rope_theta`, `num_nextn_predict_layers`, ...,
#                      like tests/golden/v3_yarn_qlora/config.json) or the transformers-v5 style
#   model.safetensors  (or sharded model-*.safetensors + index) with the released checkpoint's key names,
#                      per-expert weights; MTP modules stored as layers num_hidden_layers.. are allowed
#   tokenizer.json     optional here; when present it must load with AutoTokenizer and stay inside the vocabulary
#
# transformers loads the weights in float32 with eager attention and eager experts (the same path the golden
# files use). A weight transformers expects but does not find, a weight whose shape differs, or an unexpected
# weight outside the MTP layers is an error. transformers' own DeepseekV3ForCausalLM ignores the MTP layers;
# the script says how many tensors that skipped.
#
# Output: `max_abs_diff: X` on stdout. Exit status 0 when max |diff| <= atol, 1 when it is above (or not
# finite), 2 when the directory or the files are unusable (load failure, missing weights, bad shapes).
#
# Versions: written against torch 2.15 and transformers 5.23.0 (tests/golden/requirements.txt); other versions
# only get a warning, but transformers' DeepSeek-V3 port has changed between releases.
import argparse
import json
import math
import os
import re
import sys

import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file, save_file

# Fields whose transformers default is the 671B model's value (or a different behaviour); when an exported
# config.json leaves them out, transformers silently uses that default. Omitting the shape fields fails loudly
# (size mismatch); omitting these can load fine and give wrong logits.
SILENT_DEFAULTS = {
    "first_k_dense_replace": 3,
    "num_experts_per_tok": 8,
    "n_group": 8,
    "topk_group": 4,
    "n_shared_experts": 1,
    "routed_scaling_factor": 2.5,
    "norm_topk_prob": True,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "num_key_value_heads": 128,
}


def fail(msg, code=2):
    print(f"ERROR: {msg}", file=sys.stderr)
    sys.exit(code)


def warn(msg):
    print(f"warning: {msg}", file=sys.stderr)


def read_config_json(model_dir):
    path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(path):
        fail(f"{path} not found")
    with open(path) as f:
        return json.load(f)


# ------------------------------------------------------------------------------------------------------------
def write_input(args):
    vocab = args.vocab
    if vocab is None:
        if args.model is None:
            fail("--write-input needs --vocab V (or --model DIR to read vocab_size from its config.json)")
        vocab = read_config_json(args.model).get("vocab_size")
        if not isinstance(vocab, int):
            fail(f"no integer vocab_size in {args.model}/config.json; pass --vocab")
    if args.batch < 1 or args.seq < 1 or vocab < 1:
        fail("--batch, --seq and --vocab must be at least 1")
    gen = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, vocab, (args.batch, args.seq), generator=gen, dtype=torch.int64)
    save_file({"input_ids": ids.contiguous()}, args.write_input, metadata={"format": "pt"})
    print(f"wrote {args.write_input}: input_ids I64 [{args.batch}, {args.seq}], ids in [0, {vocab}), seed {args.seed}")
    return 0


# ------------------------------------------------------------------------------------------------------------
def checkpoint_keys(model_dir):
    """All tensor names in the directory's safetensors file(s), with their dtype."""
    files = sorted(f for f in os.listdir(model_dir) if f.endswith(".safetensors"))
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif "model.safetensors" in files:
        files = ["model.safetensors"]
    else:
        files = [f for f in files if re.fullmatch(r"model-\d+-of-\d+\.safetensors", f)]
    if not files:
        fail(f"no model.safetensors (or model.safetensors.index.json + shards) in {model_dir}")
    keys = {}
    for name in files:
        with safe_open(os.path.join(model_dir, name), "pt") as f:
            for k in f.keys():
                keys[k] = f.get_slice(k).get_dtype()
    return files, keys


def check_tokenizer(model_dir, vocab_size):
    path = os.path.join(model_dir, "tokenizer.json")
    if not os.path.isfile(path):
        warn(f"no tokenizer.json in {model_dir}; skipping the tokenizer check")
        return
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(model_dir)
    except Exception as e:  # noqa: BLE001 - report whatever transformers raises
        fail(f"AutoTokenizer.from_pretrained({model_dir}) failed: {type(e).__name__}: {e}")
    max_id = max(tok.get_vocab().values())
    sample = tok("Hello, world! 123").input_ids
    print(f"tokenizer: {type(tok).__name__}, {len(tok)} tokens (max id {max_id}), 'Hello, world! 123' -> {sample}")
    if max_id >= vocab_size:
        fail(f"tokenizer.json has token id {max_id}, outside the model's vocab_size {vocab_size}")


def main():
    ap = argparse.ArgumentParser(
        description="Check an exported DeepSeek-V3 directory against transformers and our CLI's logits.")
    ap.add_argument("--model", help="exported model directory (config.json, model.safetensors, tokenizer.json)")
    ap.add_argument("--input", help="safetensors file with input_ids (I64 [batch, seq])")
    ap.add_argument("--logits", help="safetensors file with logits (F32 [batch, seq, vocab]) from `deepseek logits`")
    ap.add_argument("--atol", type=float, default=1e-4, help="largest allowed max |diff| (default 1e-4)")
    ap.add_argument("--verbose", action="store_true", help="keep transformers' warnings and its load report")
    ap.add_argument("--write-input", metavar="OUT", help="instead: write random input_ids to OUT and exit")
    ap.add_argument("--batch", type=int, default=2, help="--write-input: batch size (default 2)")
    ap.add_argument("--seq", type=int, default=16, help="--write-input: sequence length (default 16)")
    ap.add_argument("--vocab", type=int, help="--write-input: ids are drawn from [0, V) (default: the model's vocab_size)")
    ap.add_argument("--seed", type=int, default=0, help="--write-input: RNG seed (default 0)")
    args = ap.parse_args()

    if args.write_input:
        return write_input(args)
    if not (args.model and args.input and args.logits):
        ap.error("need --model, --input and --logits (or --write-input OUT)")

    if not torch.__version__.startswith("2.15") or transformers.__version__ != "5.23.0":
        warn(f"tested with torch 2.15 / transformers 5.23.0, running torch {torch.__version__} / "
             f"transformers {transformers.__version__}")
    if not args.verbose:
        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
    from transformers import AutoConfig, AutoModelForCausalLM

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, threads {torch.get_num_threads()}")

    # ---- config ----
    raw = read_config_json(args.model)
    if raw.get("model_type") != "deepseek_v3":
        fail(f"config.json model_type is {raw.get('model_type')!r}, expected 'deepseek_v3'")
    for key, default in SILENT_DEFAULTS.items():
        if key not in raw:
            warn(f"config.json has no `{key}`; transformers uses its default {default!r}")
    if "rope_scaling" not in raw and "rope_parameters" not in raw:
        warn("config.json has neither `rope_scaling` nor `rope_parameters`: plain RoPE (no YaRN)")
    if raw.get("scoring_func", "sigmoid") != "sigmoid" or raw.get("topk_method", "noaux_tc") != "noaux_tc":
        warn(f"scoring_func={raw.get('scoring_func')!r} topk_method={raw.get('topk_method')!r}: transformers' "
             "DeepseekV3 ignores both and always routes with sigmoid + noaux_tc, so logits will differ")
    try:
        config = AutoConfig.from_pretrained(args.model)
    except Exception as e:  # noqa: BLE001
        fail(f"AutoConfig.from_pretrained failed: {type(e).__name__}: {e}")
    if config.num_key_value_heads != config.num_attention_heads:
        fail(f"num_key_value_heads = {config.num_key_value_heads} but num_attention_heads = "
             f"{config.num_attention_heads}; MLA has as many K/V heads as query heads, and transformers repeats K/V "
             "num_attention_heads // num_key_value_heads times, so write num_key_value_heads = num_attention_heads "
             "(transformers' default is 128)")
    n_layers = config.num_hidden_layers
    n_mtp = getattr(config, "num_nextn_predict_layers", 0) or 0
    rope = getattr(config, "rope_parameters", None)
    print(f"config: vocab {config.vocab_size}, hidden {config.hidden_size}, layers {n_layers} (first "
          f"{config.first_k_dense_replace} dense), heads {config.num_attention_heads}, q_lora {config.q_lora_rank}, "
          f"kv_lora {config.kv_lora_rank}, experts {config.n_routed_experts} top-{config.num_experts_per_tok} "
          f"(groups {config.n_group} keep {config.topk_group}, shared {config.n_shared_experts}), mtp {n_mtp}, "
          f"rope {rope}")

    # ---- checkpoint keys ----
    files, keys = checkpoint_keys(args.model)
    layer_re = re.compile(r"^model\.layers\.(\d+)\.")
    mtp_keys = [k for k in keys if (m := layer_re.match(k)) and int(m.group(1)) >= n_layers]
    mtp_layers = sorted({int(layer_re.match(k).group(1)) for k in mtp_keys})
    dtypes = sorted(set(keys.values()))
    print(f"checkpoint: {', '.join(files)}: {len(keys)} tensors ({'/'.join(dtypes)}), {len(mtp_keys)} in MTP "
          f"layer(s) {mtp_layers}")
    if mtp_layers != list(range(n_layers, n_layers + len(mtp_layers))):
        warn(f"MTP layers {mtp_layers} do not follow the main layers 0..{n_layers - 1} contiguously")
    if len(mtp_layers) != n_mtp:
        warn(f"config.json says num_nextn_predict_layers = {n_mtp}, the checkpoint has {len(mtp_layers)} MTP layer(s)")

    # transformers fuses per-expert weights while loading and fails with an opaque error when one is absent,
    # so look for complete expert sets first.
    expert_re = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight$")
    have = {(int(m.group(1)), int(m.group(2)), m.group(3)) for k in keys if (m := expert_re.match(k))}
    absent = [f"model.layers.{i}.mlp.experts.{e}.{p}_proj.weight"
              for i in range(config.first_k_dense_replace, n_layers)
              for e in range(config.n_routed_experts)
              for p in ("gate", "up", "down")
              if (i, e, p) not in have]
    if absent:
        fail(f"{len(absent)} routed-expert weight(s) missing from the checkpoint, e.g. {absent[:6]}")

    check_tokenizer(args.model, config.vocab_size)

    # ---- inputs / CLI logits ----
    inp = load_file(args.input)
    if "input_ids" not in inp:
        fail(f"{args.input} has no `input_ids` (has {sorted(inp)})")
    ids = inp["input_ids"]
    if ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32):
        fail(f"input_ids must be I64 [batch, seq], got {ids.dtype} {list(ids.shape)}")
    ids = ids.to(torch.int64)
    if ids.numel() and (ids.min() < 0 or ids.max() >= config.vocab_size):
        fail(f"input_ids outside [0, {config.vocab_size})")
    if ids.shape[1] > config.max_position_embeddings:
        warn(f"seq {ids.shape[1]} > max_position_embeddings {config.max_position_embeddings}")
    out = load_file(args.logits)
    if "logits" not in out:
        fail(f"{args.logits} has no `logits` (has {sorted(out)})")
    want = out["logits"]
    expect_shape = [ids.shape[0], ids.shape[1], config.vocab_size]
    if list(want.shape) != expect_shape:
        fail(f"logits shape {list(want.shape)}, expected {expect_shape} (input_ids {list(ids.shape)} x vocab)")
    if want.dtype != torch.float32:
        warn(f"logits are {want.dtype}, expected F32; comparing in float32")
        want = want.float()

    # ---- load with transformers ----
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            args.model,
            dtype=torch.float32,
            attn_implementation="eager",
            experts_implementation="eager",
            output_loading_info=True,
        )
    except Exception as e:  # noqa: BLE001 - size mismatches and missing experts raise here
        fail(f"AutoModelForCausalLM.from_pretrained failed (a weight with the wrong shape?): {type(e).__name__}: {e}"
             f"{'' if args.verbose else ' (rerun with --verbose to see the transformers load report)'}")
    model.eval()
    missing = sorted(info["missing_keys"])
    mismatched = sorted(info["mismatched_keys"])
    unexpected = sorted(info["unexpected_keys"])
    other_unexpected = [k for k in unexpected if not ((m := layer_re.match(k)) and int(m.group(1)) >= n_layers)]
    errors = []
    if missing:
        errors.append(f"{len(missing)} weight(s) transformers expects are missing (it would initialize them "
                      f"randomly): {missing}")
    if mismatched:
        errors.append(f"{len(mismatched)} weight(s) with the wrong shape: {mismatched}")
    if other_unexpected:
        errors.append(f"{len(other_unexpected)} unexpected weight(s) outside the MTP layers: {other_unexpected}")
    for e in errors:
        print(f"ERROR: {e}", file=sys.stderr)
    if errors:
        sys.exit(2)
    print(f"transformers load: no missing or mismatched weights; ignored {len(mtp_keys)} MTP tensor(s) of the "
          f"checkpoint ({len(unexpected)} unexpected names after transformers fuses the experts), which "
          f"DeepseekV3ForCausalLM does not use; attn {model.config._attn_implementation}, experts "
          f"{model.config._experts_implementation}, {sum(p.numel() for p in model.parameters())} parameters")

    # ---- compare ----
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits.float()
    diff = (got - want).abs()
    max_diff = diff.max().item() if diff.numel() else 0.0
    if not math.isfinite(max_diff) or not torch.isfinite(want).all():
        print(f"max_abs_diff: {max_diff}")
        print("FAIL: non-finite logits", file=sys.stderr)
        return 1
    where = list(torch.unravel_index(diff.argmax(), diff.shape)) if diff.numel() else []
    agree = (got.argmax(-1) == want.argmax(-1)).float().mean().item()
    scale = want.abs().max().item()
    print(f"logits {list(want.shape)}: max |logit| {scale:.4g}, mean |diff| {diff.mean().item():.3e}, "
          f"max |diff| at [batch, pos, token] = {[int(i) for i in where]}, argmax agreement {agree * 100:.2f} %")
    print(f"max_abs_diff: {max_diff:.6e}")
    if max_diff > args.atol:
        print(f"FAIL: max |diff| {max_diff:.3e} > atol {args.atol:g}", file=sys.stderr)
        return 1
    print(f"PASS: max |diff| {max_diff:.3e} <= atol {args.atol:g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
