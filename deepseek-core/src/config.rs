//! The typed model configuration: every option resolved, strings turned into enums, with named
//! presets. Hugging Face `config.json` files are read by [`DeepSeekConfig::from_hf_file`] (in
//! `hf_config.rs`) into this struct.

use serde::{Deserialize, Serialize};

use crate::error::{DeepSeekError, Result};

/// How router affinities are computed from the gate logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ScoringFunc {
    /// DeepSeek-V3: independent `sigmoid(logit)` per expert.
    Sigmoid,
    /// DeepSeek-V2: `softmax` over all experts.
    Softmax,
}

/// How the top-k experts are chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TopkMethod {
    /// Plain top-k over all experts (V2 `greedy`).
    Greedy,
    /// V2 `group_limited_greedy`: group score is the max affinity of the group.
    GroupLimited,
    /// V3 `noaux_tc`: selection on `score + bias`; group score is the sum of the top-2
    /// biased scores of the group (auxiliary-loss-free balancing, DeepSeek-V3 §2.1.2).
    NoAuxTc,
}

impl TopkMethod {
    /// Whether the router carries a per-expert selection bias (`e_score_correction_bias`).
    pub fn has_bias(self) -> bool {
        matches!(self, TopkMethod::NoAuxTc)
    }
}

/// YaRN context extension of the rotary embedding (Peng et al. 2023), as DeepSeek uses it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct YarnConfig {
    /// Context extension factor (40 for V3).
    pub factor: f64,
    /// Context length the model was pretrained with before extension (4096 for V3).
    pub original_max_position_embeddings: usize,
    /// Rotations above which a dimension keeps its original frequency.
    pub beta_fast: f64,
    /// Rotations below which a dimension is fully interpolated.
    pub beta_slow: f64,
    /// `m` of the softmax scale correction `mscale(factor, mscale_all_dim)²`; 0 disables it.
    pub mscale_all_dim: f64,
    /// Multiplier of cos/sin, resolved from the config: `mscale(factor, mscale) /
    /// mscale(factor, mscale_all_dim)` when both are given (1.0 for V3), else
    /// `mscale(factor, 1)`, unless the config sets `attention_factor` itself.
    pub attention_factor: f64,
    /// Round the ramp bounds outward (floor/ceil) as DeepSeek does; `truncate: false` in a
    /// transformers config keeps them fractional.
    pub truncate: bool,
}

/// Rotary embedding of the decoupled key/query part.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RopeConfig {
    /// Base of the frequencies `theta^(-2i/d)`.
    pub theta: f64,
    /// YaRN scaling, if the checkpoint was context-extended.
    pub yarn: Option<YarnConfig>,
    /// Rotate interleaved pairs `(x[2i], x[2i+1])` as DeepSeek's checkpoints expect (true), or
    /// the halves `(x[i], x[i+d/2])` (a transformers config with `rope_interleave: false`).
    pub interleaved: bool,
}

/// FP8 block quantization of a checkpoint (`quantization_config`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fp8Quantization {
    /// Weight block size `[rows, cols]` (`[128, 128]` for V3).
    pub weight_block_size: [usize; 2],
}

/// A DeepSeek-V2/V3 model, every option resolved. Field names follow Hugging Face's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeepSeekConfig {
    /// Vocabulary size `V`.
    pub vocab_size: usize,
    /// Model width `d`.
    pub hidden_size: usize,
    /// Number of main transformer blocks (the MTP modules come after them).
    pub num_hidden_layers: usize,
    /// The first this many blocks use a dense MLP instead of MoE.
    pub first_k_dense_replace: usize,
    /// Width of the dense MLP.
    pub intermediate_size: usize,
    /// Width of one routed (and one shared) expert.
    pub moe_intermediate_size: usize,
    /// Attention heads `n_h`.
    pub num_attention_heads: usize,
    /// Rank of the query compression; `None` projects queries directly (`q_proj`).
    pub q_lora_rank: Option<usize>,
    /// Rank of the joint KV compression (the latent that is cached).
    pub kv_lora_rank: usize,
    /// Per-head query/key dimension without position information.
    pub qk_nope_head_dim: usize,
    /// Dimension of the decoupled rotary query/key part (the key part is shared by all heads).
    pub qk_rope_head_dim: usize,
    /// Per-head value dimension.
    pub v_head_dim: usize,
    /// Routed experts `E`.
    pub n_routed_experts: usize,
    /// Shared experts (always active), fused into one MLP of width `n_shared · moe_intermediate`.
    pub n_shared_experts: usize,
    /// Routed experts per token `K`.
    pub num_experts_per_tok: usize,
    /// Expert groups `G` for group-limited routing.
    pub n_group: usize,
    /// Groups kept per token.
    pub topk_group: usize,
    /// Multiplier on the routed gate weights.
    pub routed_scaling_factor: f64,
    /// Normalize the chosen gate weights to sum to one.
    pub norm_topk_prob: bool,
    /// Affinity function of the router.
    pub scoring_func: ScoringFunc,
    /// Expert selection rule of the router.
    pub topk_method: TopkMethod,
    /// Rotary embedding settings.
    pub rope: RopeConfig,
    /// Longest sequence the model accepts.
    pub max_position_embeddings: usize,
    /// Epsilon of every RMSNorm.
    pub rms_norm_eps: f64,
    /// Number of MTP modules `D` (DeepSeek-V3 §2.2).
    pub num_nextn_predict_layers: usize,
    /// FP8 block quantization of the stored weights, if any.
    pub quantization: Option<Fp8Quantization>,
    /// Beginning-of-sequence token id, if known.
    pub bos_token_id: Option<u32>,
    /// End-of-sequence token id, if known.
    pub eos_token_id: Option<u32>,
}

impl DeepSeekConfig {
    /// DeepSeek-V3 (671B total, 37B active), as in the released `config.json`.
    pub fn v3_671b() -> Self {
        Self {
            vocab_size: 129280,
            hidden_size: 7168,
            num_hidden_layers: 61,
            first_k_dense_replace: 3,
            intermediate_size: 18432,
            moe_intermediate_size: 2048,
            num_attention_heads: 128,
            q_lora_rank: Some(1536),
            kv_lora_rank: 512,
            qk_nope_head_dim: 128,
            qk_rope_head_dim: 64,
            v_head_dim: 128,
            n_routed_experts: 256,
            n_shared_experts: 1,
            num_experts_per_tok: 8,
            n_group: 8,
            topk_group: 4,
            routed_scaling_factor: 2.5,
            norm_topk_prob: true,
            scoring_func: ScoringFunc::Sigmoid,
            topk_method: TopkMethod::NoAuxTc,
            rope: RopeConfig {
                theta: 10000.0,
                yarn: Some(YarnConfig {
                    factor: 40.0,
                    original_max_position_embeddings: 4096,
                    beta_fast: 32.0,
                    beta_slow: 1.0,
                    mscale_all_dim: 1.0,
                    attention_factor: 1.0,
                    truncate: true,
                }),
                interleaved: true,
            },
            max_position_embeddings: 163840,
            rms_norm_eps: 1e-6,
            num_nextn_predict_layers: 1,
            quantization: Some(Fp8Quantization { weight_block_size: [128, 128] }),
            bos_token_id: Some(0),
            eos_token_id: Some(1),
        }
    }

    /// DeepSeek-V2-Lite (16B): softmax scoring, greedy top-6, no q-LoRA, no selection bias.
    pub fn v2_lite_16b() -> Self {
        Self {
            vocab_size: 102400,
            hidden_size: 2048,
            num_hidden_layers: 27,
            first_k_dense_replace: 1,
            intermediate_size: 10944,
            moe_intermediate_size: 1408,
            num_attention_heads: 16,
            q_lora_rank: None,
            kv_lora_rank: 512,
            qk_nope_head_dim: 128,
            qk_rope_head_dim: 64,
            v_head_dim: 128,
            n_routed_experts: 64,
            n_shared_experts: 2,
            num_experts_per_tok: 6,
            n_group: 1,
            topk_group: 1,
            routed_scaling_factor: 1.0,
            norm_topk_prob: false,
            scoring_func: ScoringFunc::Softmax,
            topk_method: TopkMethod::Greedy,
            // V3's YaRN settings but for the softmax correction: mscale = mscale_all_dim = 0.707.
            rope: {
                let v3 = Self::v3_671b().rope;
                RopeConfig {
                    yarn: v3.yarn.map(|y| YarnConfig { mscale_all_dim: 0.707, ..y }),
                    ..v3
                }
            },
            max_position_embeddings: 163840,
            rms_norm_eps: 1e-6,
            num_nextn_predict_layers: 0,
            quantization: None,
            bos_token_id: Some(100000),
            eos_token_id: Some(100001),
        }
    }

    /// A model small enough for unit tests to run in well under a second on CPU, with every
    /// structural feature of V3 switched on (q-LoRA, YaRN, groups, shared experts, MTP). Fields
    /// not listed are V3's.
    pub fn tiny() -> Self {
        let v3 = Self::v3_671b();
        Self {
            vocab_size: 256,
            hidden_size: 64,
            num_hidden_layers: 3,
            first_k_dense_replace: 1,
            intermediate_size: 96,
            moe_intermediate_size: 32,
            num_attention_heads: 4,
            q_lora_rank: Some(32),
            kv_lora_rank: 16,
            qk_nope_head_dim: 16,
            qk_rope_head_dim: 8,
            v_head_dim: 16,
            n_routed_experts: 8,
            num_experts_per_tok: 2,
            n_group: 4,
            topk_group: 2,
            rope: RopeConfig {
                yarn: v3.rope.yarn.map(|y| YarnConfig {
                    factor: 4.0,
                    original_max_position_embeddings: 64,
                    ..y
                }),
                ..v3.rope
            },
            max_position_embeddings: 256,
            quantization: None,
            bos_token_id: None,
            eos_token_id: None,
            ..v3
        }
    }

    /// The benchmark size: hidden 256, 4 layers, 8 heads, 16 routed experts top-4 in 4 groups
    /// keeping 2, 2 shared experts, q-LoRA 64, KV-LoRA 32, nope 32 / rope 16 / v 32, vocab 1024,
    /// no YaRN. Fields not listed are V3's.
    pub fn small() -> Self {
        let v3 = Self::v3_671b();
        Self {
            vocab_size: 1024,
            hidden_size: 256,
            num_hidden_layers: 4,
            first_k_dense_replace: 1,
            intermediate_size: 704,
            moe_intermediate_size: 128,
            num_attention_heads: 8,
            q_lora_rank: Some(64),
            kv_lora_rank: 32,
            qk_nope_head_dim: 32,
            qk_rope_head_dim: 16,
            v_head_dim: 32,
            n_routed_experts: 16,
            n_shared_experts: 2,
            num_experts_per_tok: 4,
            n_group: 4,
            topk_group: 2,
            rope: RopeConfig { yarn: None, ..v3.rope },
            max_position_embeddings: 2048,
            quantization: None,
            bos_token_id: None,
            eos_token_id: None,
            ..v3
        }
    }

    /// A preset by its command-line name: `v3-671b`, `v2-lite-16b`, `tiny`, `small`.
    pub fn preset(name: &str) -> Result<Self> {
        match name {
            "v3-671b" => Ok(Self::v3_671b()),
            "v2-lite-16b" => Ok(Self::v2_lite_16b()),
            "tiny" => Ok(Self::tiny()),
            "small" => Ok(Self::small()),
            other => Err(DeepSeekError::config(
                "preset",
                format!("unknown preset `{other}`; choose one of {}", Self::PRESETS.join(", ")),
            )),
        }
    }

    /// Names accepted by [`DeepSeekConfig::preset`].
    pub const PRESETS: [&'static str; 4] = ["v3-671b", "v2-lite-16b", "tiny", "small"];

    /// Per-head query/key width `nope + rope`.
    pub fn qk_head_dim(&self) -> usize {
        self.qk_nope_head_dim + self.qk_rope_head_dim
    }

    /// Whether block `layer` uses MoE (all blocks from `first_k_dense_replace` on, and every
    /// MTP block).
    pub fn is_moe_layer(&self, layer: usize) -> bool {
        self.n_routed_experts > 0 && layer >= self.first_k_dense_replace
    }

    /// Softmax scale of attention: `d_qk^-0.5 · mscale²`, with
    /// `mscale = 0.1 · mscale_all_dim · ln(factor) + 1` under YaRN (DeepSeek-V2 appendix).
    pub fn softmax_scale(&self) -> f64 {
        let base = (self.qk_head_dim() as f64).powf(-0.5);
        match self.rope.yarn {
            Some(y) => {
                let m = yarn_mscale(y.factor, y.mscale_all_dim);
                base * m * m
            }
            None => base,
        }
    }

    /// Checks every invariant the modules rely on; the message says which field to fix.
    pub fn validate(&self) -> Result<()> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("kv_lora_rank", self.kv_lora_rank),
            ("qk_nope_head_dim", self.qk_nope_head_dim),
            ("qk_rope_head_dim", self.qk_rope_head_dim),
            ("v_head_dim", self.v_head_dim),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        for (field, value) in positive {
            if value == 0 {
                return Err(DeepSeekError::config(field, "must be greater than 0"));
            }
        }
        if self.q_lora_rank == Some(0) {
            return Err(DeepSeekError::config(
                "q_lora_rank",
                "must be > 0, or null for a direct q_proj",
            ));
        }
        if !self.qk_rope_head_dim.is_multiple_of(2) {
            return Err(DeepSeekError::config(
                "qk_rope_head_dim",
                format!("must be even (RoPE rotates pairs), got {}", self.qk_rope_head_dim),
            ));
        }
        if self.first_k_dense_replace > 0 && self.intermediate_size == 0 {
            return Err(DeepSeekError::config(
                "intermediate_size",
                "dense layers need a width > 0",
            ));
        }
        if self.num_nextn_predict_layers > 0 && self.n_routed_experts == 0 {
            return Err(DeepSeekError::config(
                "num_nextn_predict_layers",
                "MTP blocks are MoE blocks: n_routed_experts must be > 0",
            ));
        }
        if self.n_routed_experts > 0 {
            if self.moe_intermediate_size == 0 {
                return Err(DeepSeekError::config(
                    "moe_intermediate_size",
                    "must be > 0 when n_routed_experts > 0",
                ));
            }
            let k = self.num_experts_per_tok;
            if k == 0 || k > self.n_routed_experts {
                return Err(DeepSeekError::config(
                    "num_experts_per_tok",
                    format!("must be in 1..={} (n_routed_experts), got {k}", self.n_routed_experts),
                ));
            }
            if self.n_group == 0 || !self.n_routed_experts.is_multiple_of(self.n_group) {
                return Err(DeepSeekError::config(
                    "n_group",
                    format!(
                        "must divide n_routed_experts ({}), got {}",
                        self.n_routed_experts, self.n_group
                    ),
                ));
            }
            if self.topk_group == 0 || self.topk_group > self.n_group {
                return Err(DeepSeekError::config(
                    "topk_group",
                    format!("must be in 1..={} (n_group), got {}", self.n_group, self.topk_group),
                ));
            }
            let per_group = self.n_routed_experts / self.n_group;
            if self.n_group > 1 && self.topk_method == TopkMethod::NoAuxTc && per_group < 2 {
                return Err(DeepSeekError::config(
                    "n_group",
                    "noaux_tc scores a group by its top-2 experts: each group needs at least 2 experts",
                ));
            }
            if self.topk_group * per_group < k && self.topk_method != TopkMethod::Greedy {
                return Err(DeepSeekError::config(
                    "topk_group",
                    format!("the {} kept group(s) hold {} experts, fewer than num_experts_per_tok = {k}", self.topk_group, self.topk_group * per_group),
                ));
            }
            if self.scoring_func == ScoringFunc::Softmax && self.topk_method == TopkMethod::NoAuxTc
            {
                return Err(DeepSeekError::config(
                    "scoring_func",
                    "noaux_tc routing is defined for sigmoid scoring",
                ));
            }
        }
        if let Some(y) = self.rope.yarn {
            if y.factor.is_nan() || y.factor < 1.0 {
                return Err(DeepSeekError::config(
                    "rope_scaling.factor",
                    format!("must be >= 1, got {}", y.factor),
                ));
            }
            if y.original_max_position_embeddings == 0 {
                return Err(DeepSeekError::config(
                    "rope_scaling.original_max_position_embeddings",
                    "must be > 0",
                ));
            }
        }
        if self.rope.theta.is_nan() || self.rope.theta <= 0.0 {
            return Err(DeepSeekError::config("rope_theta", "must be > 0"));
        }
        if self.rms_norm_eps.is_nan() || self.rms_norm_eps <= 0.0 {
            return Err(DeepSeekError::config("rms_norm_eps", "must be > 0"));
        }
        Ok(())
    }
}

/// YaRN's attention temperature correction: `0.1 · m · ln(factor) + 1` for factor > 1, else 1.
pub fn yarn_mscale(factor: f64, m: f64) -> f64 {
    if factor <= 1.0 {
        1.0
    } else {
        0.1 * m * factor.ln() + 1.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_validate() {
        for name in DeepSeekConfig::PRESETS {
            DeepSeekConfig::preset(name).unwrap().validate().unwrap();
        }
    }

    #[test]
    fn v3_softmax_scale_includes_yarn_mscale_squared() {
        // SPEC: mscale(40, 1) = 1.36889, scale = 192^-0.5 · 1.36889² = 0.135234.
        let cfg = DeepSeekConfig::v3_671b();
        let m = yarn_mscale(40.0, 1.0);
        assert!((m - 1.368_888_9).abs() < 1e-6, "{m}");
        assert!((cfg.softmax_scale() - 0.135_234).abs() < 1e-6, "{}", cfg.softmax_scale());
    }

    #[test]
    fn invalid_groups_are_rejected_with_the_field_name() {
        let mut cfg = DeepSeekConfig::tiny();
        cfg.n_group = 3;
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains("n_group"), "{err}");
    }
}
