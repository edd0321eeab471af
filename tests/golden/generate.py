#!/usr/bin/env python3
# Golden-file generator for the DeepSeek-V3 (Burn) implementation.
#
# What it does
#   Builds three tiny DeepSeek-V3 models with Hugging Face transformers' own DeepseekV3ForCausalLM
#   (float32, CPU, eager attention, eager experts), gives them O(1) random weights whose MoE routing
#   decisions all have a clear margin, runs a forward pass on fixed random token ids and writes, per case,
#   tests/golden/<case>/{config.json, model.safetensors, reference.safetensors}.
#   model.safetensors uses the released DeepSeek/HF checkpoint key layout (per-expert weights, the MTP
#   module stored as layer `num_hidden_layers`). reference.safetensors holds logits, per-layer hidden
#   states, router decisions, RoPE tables, the attention scale and (when the config has an MTP module)
#   the MTP logits, computed with transformers' own MtpLayer/MtpModel and cross-checked against a direct
#   composition of HF modules, and an 8-token greedy continuation from HF's own `generate` (EOS stopping
#   disabled, cross-checked against a cache-free argmax loop) with the top-1/top-2 logit margin of each step.
#   See tests/golden/README.md for the exact contents.
#
# How to rerun (from the repository root; needs about 5.6 GB for the torch wheel, keep it out of CI):
#   python -m venv .venv && . .venv/bin/activate
#   pip install -r tests/golden/requirements.txt
#   python tests/golden/generate.py
#
# Versions are pinned (tests/golden/requirements.txt) and asserted below: torch 2.15.x,
# transformers 5.23.0. The output is deterministic (fixed seeds, deterministic algorithms, one thread).
import json
import math
import os
import shutil
import sys
import tempfile

import torch
import transformers

assert torch.__version__.startswith("2.15"), f"need torch 2.15.x, found {torch.__version__}"
assert transformers.__version__ == "5.23.0", f"need transformers 5.23.0, found {transformers.__version__}"

from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM, DeepseekV3Config, DeepseekV3ForCausalLM  # noqa: E402
from transformers.modeling_layers import MtpModel  # noqa: E402
from transformers.models.deepseek_v3.modeling_deepseek_v3 import (  # noqa: E402
    DeepseekV3DecoderLayer,
    DeepseekV3RMSNorm,
    DeepseekV3TopkRouter,
)

torch.use_deterministic_algorithms(True)
torch.set_num_threads(1)
torch.set_default_dtype(torch.float32)
transformers.logging.set_verbosity_error()

HERE = os.path.dirname(os.path.abspath(__file__))
MARGIN = 1e-3  # minimum gap required for every routing decision
BATCH, SEQ = 2, 12
INPUT_SEED = 1234
ROUTER_STD = 2.0  # router weight std * sqrt(d): logits ~ N(0, 4) on RMS-normalized input
BIAS_RANGE = 0.3  # e_score_correction_bias ~ U(-0.3, 0.3)
MAX_SEEDS = 500
GREEDY_NEW_TOKENS = 8  # greedy continuation length for greedy.output_ids

COMMON = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=96,
    moe_intermediate_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=4,
    n_shared_experts=1,
    n_routed_experts=8,
    routed_scaling_factor=2.5,
    kv_lora_rank=16,
    qk_rope_head_dim=8,
    v_head_dim=16,
    qk_nope_head_dim=16,
    num_experts_per_tok=2,
    first_k_dense_replace=1,
    norm_topk_prob=True,
    hidden_act="silu",
    initializer_range=0.02,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    attention_bias=False,
    attention_dropout=0.0,
    bos_token_id=0,
    eos_token_id=1,
    pretraining_tp=1,
    use_cache=True,
)


def original_style_config(q_lora_rank, rope_scaling, n_group, topk_group, mtp, max_pos):
    """A config.json laid out like the released deepseek-ai/DeepSeek-V3 one (transformers 4.33 era keys).
    `auto_map` is left out (it points at remote code we do not ship) and so is `quantization_config`
    (these weights are float32)."""
    c = {
        "architectures": ["DeepseekV3ForCausalLM"],
        "attention_bias": COMMON["attention_bias"],
        "attention_dropout": COMMON["attention_dropout"],
        "aux_loss_alpha": 0.001,
        "bos_token_id": COMMON["bos_token_id"],
        "eos_token_id": COMMON["eos_token_id"],
        "ep_size": 1,
        "first_k_dense_replace": COMMON["first_k_dense_replace"],
        "hidden_act": COMMON["hidden_act"],
        "hidden_size": COMMON["hidden_size"],
        "initializer_range": COMMON["initializer_range"],
        "intermediate_size": COMMON["intermediate_size"],
        "kv_lora_rank": COMMON["kv_lora_rank"],
        "max_position_embeddings": max_pos,
        "model_type": "deepseek_v3",
        "moe_intermediate_size": COMMON["moe_intermediate_size"],
        "moe_layer_freq": 1,
        "n_group": n_group,
        "n_routed_experts": COMMON["n_routed_experts"],
        "n_shared_experts": COMMON["n_shared_experts"],
        "norm_topk_prob": COMMON["norm_topk_prob"],
        "num_attention_heads": COMMON["num_attention_heads"],
        "num_experts_per_tok": COMMON["num_experts_per_tok"],
        "num_hidden_layers": COMMON["num_hidden_layers"],
        "num_key_value_heads": COMMON["num_key_value_heads"],
        "num_nextn_predict_layers": mtp,
        "pretraining_tp": COMMON["pretraining_tp"],
        "q_lora_rank": q_lora_rank,
        "qk_nope_head_dim": COMMON["qk_nope_head_dim"],
        "qk_rope_head_dim": COMMON["qk_rope_head_dim"],
        "rms_norm_eps": COMMON["rms_norm_eps"],
        "rope_scaling": rope_scaling,
        "rope_theta": 10000,
        "routed_scaling_factor": COMMON["routed_scaling_factor"],
        "scoring_func": "sigmoid",
        "seq_aux": True,
        "tie_word_embeddings": COMMON["tie_word_embeddings"],
        "topk_group": topk_group,
        "topk_method": "noaux_tc",
        "torch_dtype": "float32",
        "transformers_version": "4.33.1",
        "use_cache": COMMON["use_cache"],
        "v_head_dim": COMMON["v_head_dim"],
        "vocab_size": COMMON["vocab_size"],
    }
    return c


def v5_style_config_json(rope_parameters, n_group, topk_group, mtp, max_pos):
    """Whatever `DeepseekV3Config(...).save_pretrained` writes in transformers 5.23."""
    cfg = DeepseekV3Config(
        **COMMON,
        q_lora_rank=32,
        n_group=n_group,
        topk_group=topk_group,
        num_mtp_layers=mtp,
        max_position_embeddings=max_pos,
        rope_parameters=dict(rope_parameters),
        rope_interleave=True,
        dtype="float32",
    )
    with tempfile.TemporaryDirectory() as tmp:
        cfg.save_pretrained(tmp)
        with open(os.path.join(tmp, "config.json")) as f:
            c = json.load(f)
    for key in ("rope_parameters", "rope_interleave", "head_dim", "num_nextn_predict_layers"):
        assert key in c, f"transformers did not write {key} in its v5 config.json"
    assert "rope_scaling" not in c and "rope_theta" not in c, "unexpected legacy rope keys in the v5 config.json"
    assert c["rope_interleave"] is True and c["head_dim"] == COMMON["qk_rope_head_dim"]
    return c


CASES = {
    # YaRN (factor 4, original length 4096 -> ramp low=1, high=3 over the 4 frequency pairs of rope dim 8:
    # pairs 0,1 keep the original frequency, pair 2 is a 50/50 blend, pair 3 is interpolated), q-LoRA,
    # 4 groups of 2 experts with 2 groups kept, one MTP module. max_position_embeddings = factor * original
    # as in the released config (163840 = 40 * 4096).
    "v3_yarn_qlora": dict(
        config=original_style_config(
            q_lora_rank=32,
            rope_scaling={
                "beta_fast": 32,
                "beta_slow": 1,
                "factor": 4.0,
                "mscale": 1.0,
                "mscale_all_dim": 1.0,
                "original_max_position_embeddings": 4096,
                "type": "yarn",
            },
            n_group=4,
            topk_group=2,
            mtp=1,
            max_pos=16384,
        ),
    ),
    # Plain RoPE, q_proj instead of q-LoRA, a single expert group, no MTP.
    "v3_no_qlora": dict(
        config=original_style_config(
            q_lora_rank=None, rope_scaling=None, n_group=1, topk_group=1, mtp=0, max_pos=256
        ),
    ),
    # transformers-v5 config.json (rope_parameters, rope_interleave, head_dim). YaRN factor 2, original
    # length 1024 -> low=0, high=3: pair 0 original, pairs 1 and 2 blended (2/3 and 1/3 original), pair 3
    # interpolated. mscale 1.0 != mscale_all_dim 0.707, so the cos/sin attention factor is not 1.
    # 2 groups of 4 experts with 1 group kept, one MTP module.
    "v5_style": dict(
        config=v5_style_config_json(
            rope_parameters={
                "rope_type": "yarn",
                "rope_theta": 10000.0,
                "factor": 2.0,
                "original_max_position_embeddings": 1024,
                "beta_fast": 32,
                "beta_slow": 1,
                "mscale": 1.0,
                "mscale_all_dim": 0.707,
            },
            n_group=2,
            topk_group=1,
            mtp=1,
            max_pos=2048,
        ),
    ),
}


# ----------------------------------------------------------------------------------------------------------
# YaRN correction range, printed to confirm the ramp is non-trivial (same formulas as
# transformers.modeling_rope_utils._compute_yarn_parameters with truncate=True).
def yarn_low_high(rp, dim):
    base = rp["rope_theta"]
    orig = rp["original_max_position_embeddings"]

    def corr(r):
        return dim * math.log(orig / (r * 2 * math.pi)) / (2 * math.log(base))

    lo_f, hi_f = corr(rp.get("beta_fast") or 32), corr(rp.get("beta_slow") or 1)
    low, high = max(math.floor(lo_f), 0), min(math.ceil(hi_f), dim - 1)
    ramp = [min(max((i - low) / ((high - low) or 0.001), 0.0), 1.0) for i in range(dim // 2)]
    return lo_f, hi_f, low, high, ramp


# ----------------------------------------------------------------------------------------------------------
# Weights.
def init_module_(module, gen, d):
    """O(1) initialisation of every parameter/buffer of an HF DeepSeek-V3 module, in named order."""
    for name, p in module.named_parameters():
        with torch.no_grad():
            if name.endswith("embed_tokens.weight"):
                p.copy_(torch.randn(p.shape, generator=gen))
            elif p.dim() == 1:  # every 1-D parameter is an RMSNorm weight
                assert "norm" in name, name
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            elif name.endswith("mlp.gate.weight"):
                p.copy_(torch.randn(p.shape, generator=gen) * (ROUTER_STD / math.sqrt(d)))
            elif name.endswith("experts.gate_up_proj"):  # [E, 2I, d]
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[2]))
            elif name.endswith("experts.down_proj"):  # [E, d, I]
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[2]))
            else:
                assert p.dim() == 2, name
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[1]))
    for name, b in module.named_buffers():
        if name.endswith("e_score_correction_bias"):
            with torch.no_grad():
                b.copy_((torch.rand(b.shape, generator=gen) * 2 - 1) * BIAS_RANGE)


def to_checkpoint(state_dict, prefix=""):
    """HF in-memory names -> released checkpoint names; fused experts are split per expert.
    transformers 5.23 fuses experts as gate_up_proj [E, 2I, d] (rows [:I] gate, [I:] up, see
    DeepseekV3Experts.forward `.chunk(2)` and the qwen2_moe WeightConverter Concatenate([gate, up]))
    and down_proj [E, d, I]."""
    out = {}
    for k, v in state_dict.items():
        k = prefix + k
        if k.endswith("mlp.experts.gate_up_proj"):
            base = k[: -len("gate_up_proj")]
            inter = v.shape[1] // 2
            for e in range(v.shape[0]):
                out[f"{base}{e}.gate_proj.weight"] = v[e, :inter].clone().contiguous()
                out[f"{base}{e}.up_proj.weight"] = v[e, inter:].clone().contiguous()
        elif k.endswith("mlp.experts.down_proj"):
            base = k[: -len("down_proj")]
            for e in range(v.shape[0]):
                out[f"{base}{e}.down_proj.weight"] = v[e].clone().contiguous()
        else:
            out[k] = v.detach().clone().contiguous()
    return out


def from_checkpoint_experts(ckpt, prefix):
    """Checkpoint names under `prefix` -> HF in-memory names (experts fused back), prefix removed."""
    out, experts = {}, {}
    for k, v in ckpt.items():
        if not k.startswith(prefix):
            continue
        k = k[len(prefix):]
        if ".mlp.experts." in k or k.startswith("mlp.experts."):
            head, rest = k.split("mlp.experts.", 1)
            e, proj, _ = rest.split(".")
            experts.setdefault(head, {}).setdefault(int(e), {})[proj] = v
        else:
            out[k] = v
    for head, per in experts.items():
        es = [per[e] for e in sorted(per)]
        out[head + "mlp.experts.gate_up_proj"] = torch.stack([torch.cat([x["gate_proj"], x["up_proj"]], 0) for x in es])
        out[head + "mlp.experts.down_proj"] = torch.stack([x["down_proj"] for x in es])
    return out


# ----------------------------------------------------------------------------------------------------------
# MTP module (k = 1), stored as layer `num_hidden_layers`.
class MtpWeights(torch.nn.Module):
    """Holds the MTP module with the released checkpoint's sub-module names (enorm, hnorm, eh_proj, the
    decoder block's own names, shared_head.norm). The block is an HF DeepseekV3DecoderLayer built with
    layer_idx = num_hidden_layers, so it gets a MoE MLP."""

    def __init__(self, config):
        super().__init__()
        d = config.hidden_size
        self.block = DeepseekV3DecoderLayer(config, layer_idx=config.num_hidden_layers)
        self.enorm = DeepseekV3RMSNorm(d, eps=config.rms_norm_eps)
        self.hnorm = DeepseekV3RMSNorm(d, eps=config.rms_norm_eps)
        self.eh_proj = torch.nn.Linear(2 * d, d, bias=False)
        self.shared_head_norm = DeepseekV3RMSNorm(d, eps=config.rms_norm_eps)

    def checkpoint(self, model, layer):
        p = f"model.layers.{layer}."
        out = to_checkpoint(self.block.state_dict(), p)
        out[p + "enorm.weight"] = self.enorm.weight.detach().clone()
        out[p + "hnorm.weight"] = self.hnorm.weight.detach().clone()
        out[p + "eh_proj.weight"] = self.eh_proj.weight.detach().clone()
        out[p + "shared_head.norm.weight"] = self.shared_head_norm.weight.detach().clone()
        out[p + "shared_head.head.weight"] = model.lm_head.weight.detach().clone()
        out[p + "embed_tokens.weight"] = model.model.embed_tokens.weight.detach().clone()
        return out

    def manual_forward(self, model, input_ids, h_final):
        """Direct composition of HF modules: x_i = eh_proj([enorm(Emb(t_{i+1})); hnorm(h_i)]), block over
        positions 0..s-2 (causal), then shared_head.head(shared_head.norm(.))."""
        b, s = input_ids.shape
        emb = model.model.embed_tokens(input_ids[:, 1:])
        x = self.eh_proj(torch.cat([self.enorm(emb), self.hnorm(h_final[:, :-1])], dim=-1))
        pos = torch.arange(s - 1).unsqueeze(0)
        pe = model.model.rotary_emb(x, pos)
        mask = torch.full((s - 1, s - 1), float("-inf")).triu(1)[None, None]
        out = self.block(x, attention_mask=mask, position_ids=pos, position_embeddings=pe)
        return model.lm_head(self.shared_head_norm(out))


def hf_mtp_model(model, ckpt, layer):
    """transformers 5.23's own MtpModel (modeling_layers.MtpModel/MtpLayer), loaded from our checkpoint
    keys by hand: its from_pretrained only looks for `model.layers.61.*` (DeepseekV3's
    _keys_to_ignore_on_load_unexpected), so it cannot find the MTP layer of a 3-layer model."""
    mtp = MtpModel(model, 1).eval()
    sd = from_checkpoint_experts(ckpt, f"model.layers.{layer}.")
    mapped = {}
    for k, v in sd.items():
        if k in ("enorm.weight", "hnorm.weight", "eh_proj.weight"):
            mapped["layers.0." + k] = v
        elif k == "shared_head.norm.weight":
            mapped["layers.0.post_norm.weight"] = v
        elif k in ("shared_head.head.weight", "embed_tokens.weight"):
            continue  # shared with the main model
        else:
            mapped["layers.0.mtp_block." + k] = v
    missing, unexpected = mtp.load_state_dict(mapped, strict=False)
    assert not unexpected, unexpected
    assert all(not m.startswith("layers.") for m in missing), missing
    assert torch.equal(mtp.shared_head.weight, model.lm_head.weight)
    return mtp


def hf_mtp_forward(mtp, input_ids, h_final, position_offset):
    b, s = input_ids.shape
    pos = torch.arange(s - 1).unsqueeze(0) + position_offset
    out = mtp.forward_layer(0, h_final[:, :-1], pos, None, input_ids=input_ids[:, 1:])
    return mtp._project_to_logits(out)


# ----------------------------------------------------------------------------------------------------------
# Routing analysis (margins; HF's router output is the reference, this only measures it).
def select(scores_for_choice, n_group, topk_group, k, fill=float("-inf")):
    t, e = scores_for_choice.shape
    if n_group > 1:
        gs = scores_for_choice.view(t, n_group, e // n_group).topk(2, dim=-1)[0].sum(-1)
        keep = gs.topk(topk_group, dim=-1)[1]
        gmask = torch.zeros_like(gs).scatter_(1, keep, 1).bool()
        emask = gmask.unsqueeze(-1).expand(t, n_group, e // n_group).reshape(t, e)
        scores_for_choice = scores_for_choice.masked_fill(~emask, fill)
    return scores_for_choice.topk(k, dim=-1)[1].sort(dim=-1)[0]


def routing_stats(rec, config):
    """rec: dict with router logits, bias, HF topk indices. Returns margins and trap counters."""
    n_group, topk_group, k = config.n_group, config.topk_group, config.num_experts_per_tok
    logits, bias = rec["logits"], rec["bias"]
    s = logits.sigmoid()
    sb = s + bias
    t, e = sb.shape
    group_margin = float("inf")
    masked = sb
    if n_group > 1 and topk_group < n_group:
        gs = sb.view(t, n_group, e // n_group).topk(2, dim=-1)[0].sum(-1)
        gsorted = gs.sort(dim=-1, descending=True)[0]
        group_margin = (gsorted[:, topk_group - 1] - gsorted[:, topk_group]).min().item()
    sel = select(sb, n_group, topk_group, k)
    assert torch.equal(sel, rec["idx"].sort(dim=-1)[0]), "margin analysis disagrees with HF's router"
    if n_group > 1:
        gs = sb.view(t, n_group, e // n_group).topk(2, dim=-1)[0].sum(-1)
        keep = gs.topk(topk_group, dim=-1)[1]
        gmask = torch.zeros_like(gs).scatter_(1, keep, 1).bool()
        masked = sb.masked_fill(~gmask.unsqueeze(-1).expand(t, n_group, e // n_group).reshape(t, e), float("-inf"))
    ssorted = masked.sort(dim=-1, descending=True)[0]
    expert_margin = (ssorted[:, k - 1] - ssorted[:, k]).min().item()
    bias_changes = int((select(s, n_group, topk_group, k) != sel).any(-1).sum())
    group_changes = int((sb.topk(k, dim=-1)[1].sort(-1)[0] != sel).any(-1).sum()) if n_group > 1 else 0
    zero_fill_changes = int((select(sb, n_group, topk_group, k, fill=0.0) != sel).any(-1).sum()) if n_group > 1 else 0
    return dict(
        group_margin=group_margin,
        expert_margin=expert_margin,
        bias_changes=bias_changes,
        group_changes=group_changes,
        zero_fill_changes=zero_fill_changes,
    )


def attach_router_hooks(routers):
    recs, handles = {}, []
    for layer, router in routers.items():
        def hook(mod, inp, out, layer=layer):
            logits, w, idx = out
            recs[layer] = dict(
                logits=logits.detach().clone(),
                weight=w.detach().clone(),
                idx=idx.detach().clone(),
                bias=mod.e_score_correction_bias.detach().clone(),
            )
        handles.append(router.register_forward_hook(hook))
    return recs, handles


# ----------------------------------------------------------------------------------------------------------
# Greedy decoding with transformers' own generate() (main model only, KV cache, no EOS stopping).
def top2_margin(logits):
    """logits [B, V] -> top-1 minus top-2 logit per row."""
    top = logits.topk(2, dim=-1)[0]
    return top[:, 0] - top[:, 1]


def greedy_reference(model, input_ids):
    """Runs `model.generate` greedily for GREEDY_NEW_TOKENS tokens with EOS stopping disabled and returns
    (output_ids I64 [B, S + N], margins F32 [B, N]), the margins being the top-1 minus top-2 raw logit at each
    step. Cross-checked against a manual loop: full forward over the growing sequence without a cache, argmax
    of the last position's logits."""
    b, s = input_ids.shape
    attention_mask = torch.ones_like(input_ids)
    with torch.no_grad():
        out = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=GREEDY_NEW_TOKENS,
            do_sample=False,
            num_beams=1,
            eos_token_id=None,  # overrides the model's generation config (eos 1): never stop early
            pad_token_id=None,
            use_cache=True,
            return_dict_in_generate=True,
            output_logits=True,
        )
    ids = out.sequences
    assert ids.shape == (b, s + GREEDY_NEW_TOKENS), f"generate returned {tuple(ids.shape)}"
    assert torch.equal(ids[:, :s], input_ids)
    assert len(out.logits) == GREEDY_NEW_TOKENS
    gen_logits = torch.stack(out.logits, dim=1).float()  # [B, N, V], raw (unprocessed) logits
    assert torch.equal(gen_logits.argmax(-1), ids[:, s:]), "generate's tokens are not the argmax of its logits"
    margins = torch.stack([top2_margin(gen_logits[:, j]) for j in range(GREEDY_NEW_TOKENS)], dim=1)

    # Independent check: no cache, full forward over the growing sequence each step.
    seq = input_ids.clone()
    manual_margins, max_logit_diff = [], 0.0
    with torch.no_grad():
        for j in range(GREEDY_NEW_TOKENS):
            last = model(input_ids=seq, attention_mask=torch.ones_like(seq), use_cache=False).logits[:, -1]
            max_logit_diff = max(max_logit_diff, (last - gen_logits[:, j]).abs().max().item())
            manual_margins.append(top2_margin(last))
            seq = torch.cat([seq, last.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(seq, ids), f"manual greedy loop {seq[:, s:].tolist()} != generate {ids[:, s:].tolist()}"
    manual_margins = torch.stack(manual_margins, dim=1)
    print(f"  greedy: generated ids {ids[:, s:].tolist()}; manual no-cache loop agrees; max |logits diff| cached vs "
          f"uncached = {max_logit_diff:.3e}")
    print(f"  greedy: min top-1/top-2 margin {margins.min().item():.5f} (uncached loop: "
          f"{manual_margins.min().item():.5f}); per step {[[round(x, 4) for x in r] for r in margins.tolist()]}")
    assert margins.min().item() > MARGIN and manual_margins.min().item() > MARGIN, "greedy margin too small"
    return ids.to(torch.int64).contiguous(), margins.to(torch.float32).contiguous()


# ----------------------------------------------------------------------------------------------------------
def build_model(config):
    config._attn_implementation = "eager"
    config._experts_implementation = "eager"
    model = DeepseekV3ForCausalLM(config).eval()
    assert model.config._attn_implementation == "eager"
    assert model.config._experts_implementation == "eager"
    return model


def run_case(name, spec):
    out_dir = os.path.join(HERE, name)
    if os.path.isdir(out_dir):
        shutil.rmtree(out_dir)
    os.makedirs(out_dir)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(spec["config"], f, indent=2, sort_keys=True)
        f.write("\n")
    config = AutoConfig.from_pretrained(out_dir)
    assert type(config) is DeepseekV3Config
    n_layers, d = config.num_hidden_layers, config.hidden_size
    mtp_layers = config.num_mtp_layers
    assert mtp_layers in (0, 1)

    print(f"=== {name}: q_lora_rank={config.q_lora_rank} n_group={config.n_group} topk_group={config.topk_group} "
          f"mtp={mtp_layers} rope_parameters={config.rope_parameters}")
    rp = config.rope_parameters
    if rp.get("rope_type") == "yarn":
        lo_f, hi_f, low, high, ramp = yarn_low_high(rp, config.qk_rope_head_dim)
        print(f"  yarn: corr_dim(beta_fast)={lo_f:.4f} corr_dim(beta_slow)={hi_f:.4f} -> low={low} high={high}; "
              f"ramp (1 = interpolated) per pair = {[round(r, 4) for r in ramp]}")
        assert any(r == 0 for r in ramp) and any(r == 1 for r in ramp) and any(0 < r < 1 for r in ramp)

    gen_ids = torch.Generator().manual_seed(INPUT_SEED)
    input_ids = torch.randint(0, config.vocab_size, (BATCH, SEQ), generator=gen_ids, dtype=torch.int64)

    model = build_model(config)
    moe_layers = [i for i in range(n_layers) if i >= config.first_k_dense_replace]
    mtp_mod = MtpWeights(config).eval() if mtp_layers else None

    chosen = None
    for seed in range(MAX_SEEDS):
        gen = torch.Generator().manual_seed(seed)
        init_module_(model, gen, d)
        if mtp_mod is not None:
            init_module_(mtp_mod, gen, d)
        routers = {i: model.model.layers[i].mlp.gate for i in moe_layers}
        if mtp_mod is not None:
            routers[n_layers] = mtp_mod.block.mlp.gate
        recs, handles = attach_router_hooks(routers)
        with torch.no_grad():
            out = model(input_ids=input_ids, output_hidden_states=True)
            if mtp_mod is not None:
                mtp_mod.manual_forward(model, input_ids, out.hidden_states[-1])
        for h in handles:
            h.remove()
        stats = {layer: routing_stats(recs[layer], config) for layer in routers}
        gm = min(s["group_margin"] for s in stats.values())
        em = min(s["expert_margin"] for s in stats.values())
        bias_ok = sum(s["bias_changes"] for s in stats.values()) > 0
        group_ok = config.n_group == 1 or sum(s["group_changes"] for s in stats.values()) > 0
        if gm > MARGIN and em > MARGIN and bias_ok and group_ok:
            chosen = seed
            break
    assert chosen is not None, "no seed satisfied the routing-margin conditions"
    print(f"  weight seed {chosen}")
    for layer, s in stats.items():
        print(f"  router layer {layer}: min group margin {s['group_margin']:.5f}, min expert margin "
              f"{s['expert_margin']:.5f}, tokens whose choice the bias changes {s['bias_changes']}, "
              f"tokens whose choice group-limiting changes {s['group_changes']}, tokens a 0.0 (instead of -inf) "
              f"group mask would change {s['zero_fill_changes']}")

    # ---- final reference run with capture hooks ----
    cap = {}
    handles = [
        model.model.embed_tokens.register_forward_hook(lambda m, i, o: cap.__setitem__("embeddings", o.detach().clone())),
        model.model.norm.register_forward_hook(lambda m, i, o: cap.__setitem__("final_hidden", o.detach().clone())),
        model.model.rotary_emb.register_forward_hook(lambda m, i, o: cap.__setitem__("rope", (o[0].clone(), o[1].clone()))),
    ]
    for i in range(n_layers):
        handles.append(model.model.layers[i].register_forward_hook(
            lambda m, inp, o, i=i: cap.__setitem__(f"hidden.{i}", o.detach().clone())))
    routers = {i: model.model.layers[i].mlp.gate for i in moe_layers}
    if mtp_mod is not None:
        routers[n_layers] = mtp_mod.block.mlp.gate
    recs, rh = attach_router_hooks(routers)
    handles += rh
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits.clone()
        ref = {
            "input_ids": input_ids.clone(),
            "logits": logits,
            "embeddings": cap["embeddings"],
            "final_hidden": cap["final_hidden"],
            "rope.cos": cap["rope"][0].squeeze(0).contiguous(),
            "rope.sin": cap["rope"][1].squeeze(0).contiguous(),
            "attn.scaling": torch.tensor([model.model.layers[0].self_attn.scaling], dtype=torch.float32),
        }
        for i in range(n_layers):
            ref[f"hidden.{i}"] = cap[f"hidden.{i}"]

        ckpt = to_checkpoint(model.state_dict())
        if mtp_mod is not None:
            ckpt.update(mtp_mod.checkpoint(model, n_layers))
            h_final = ref["final_hidden"]
            # the normed final hidden state is what HF hands to its MTP drafter (hidden_states[-1] is tied to
            # last_hidden_state, i.e. after model.norm)
            manual = mtp_mod.manual_forward(model, input_ids, h_final)
            mtp = hf_mtp_model(model, ckpt, n_layers)
            mtp_recs, mh = attach_router_hooks({n_layers: mtp.layers[0].mtp_block.mlp.gate})
            hf = hf_mtp_forward(mtp, input_ids, h_final, position_offset=0)
            for h in mh:
                h.remove()
            shifted = hf_mtp_forward(mtp, input_ids, h_final, position_offset=1)
            d_manual = (hf - manual).abs().max().item()
            d_shift = (hf - shifted).abs().max().item()
            print(f"  MTP: HF MtpModel vs manual composition max |diff| = {d_manual:.3e}; positions 1..s-1 "
                  f"(HF drafting convention) vs 0..s-2 max |diff| = {d_shift:.3e}")
            assert d_manual < 1e-5 and d_shift < 1e-4
            assert torch.equal(mtp_recs[n_layers]["idx"].sort(-1)[0], recs[n_layers]["idx"].sort(-1)[0])
            ref["mtp_logits.1"] = hf.clone()
    for h in handles:
        h.remove()

    for layer, rec in recs.items():
        order = rec["idx"].argsort(dim=-1)
        ref[f"router.{layer}.topk_idx"] = rec["idx"].gather(1, order).to(torch.int64).contiguous()
        ref[f"router.{layer}.topk_weight"] = rec["weight"].gather(1, order).contiguous()
        ref[f"router.{layer}.scores"] = rec["logits"].sigmoid().contiguous()
        ws = ref[f"router.{layer}.topk_weight"].sum(-1)
        assert torch.allclose(ws, torch.full_like(ws, config.routed_scaling_factor), atol=1e-5)

    greedy_ids, greedy_margins = greedy_reference(model, input_ids)
    ref["greedy.output_ids"] = greedy_ids
    ref["greedy.margins"] = greedy_margins

    for k, v in ref.items():
        assert v.dtype in (torch.float32, torch.int64), (k, v.dtype)
    for k, v in ckpt.items():
        assert v.dtype == torch.float32, (k, v.dtype)
    save_file(ckpt, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    save_file(ref, os.path.join(out_dir, "reference.safetensors"), metadata={"format": "pt"})

    # ---- reload with HF's own loader and check that it reproduces the logits ----
    reloaded, info = AutoModelForCausalLM.from_pretrained(
        out_dir, attn_implementation="eager", experts_implementation="eager", output_loading_info=True
    )
    reloaded.eval()
    assert not info["missing_keys"], info["missing_keys"]
    assert not info["mismatched_keys"], info["mismatched_keys"]
    assert all(k.startswith(f"model.layers.{n_layers}.") for k in info["unexpected_keys"]), info["unexpected_keys"]
    with torch.no_grad():
        diff = (reloaded(input_ids=input_ids).logits - logits).abs().max().item()
    print(f"  reload via AutoModelForCausalLM: max |logits diff| = {diff:.3e}; "
          f"{len(info['unexpected_keys'])} unexpected keys (the MTP layer)")
    assert diff < 1e-6
    default_impl = AutoModelForCausalLM.from_pretrained(out_dir).eval()
    with torch.no_grad():
        d2 = (default_impl(input_ids=input_ids).logits - logits).abs().max().item()
    print(f"  reload with default implementations ({default_impl.config._attn_implementation}, "
          f"{default_impl.config._experts_implementation}): max |logits diff| = {d2:.3e}")
    assert d2 < 1e-4
    print(f"  attn.scaling = {ref['attn.scaling'].item():.7f}, rope.cos {tuple(ref['rope.cos'].shape)}, "
          f"max |cos| = {ref['rope.cos'].abs().max().item():.6f}")
    return out_dir


def main():
    for name, spec in CASES.items():
        run_case(name, spec)
    total = 0
    for name in CASES:
        for f in sorted(os.listdir(os.path.join(HERE, name))):
            size = os.path.getsize(os.path.join(HERE, name, f))
            total += size
            print(f"{name}/{f}: {size} bytes")
    print(f"total: {total} bytes")


if __name__ == "__main__":
    sys.exit(main())
