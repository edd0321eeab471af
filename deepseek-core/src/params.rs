//! Parameter and memory accounting, computed from the configuration alone (no weights needed):
//! total and per-token activated parameters, MTP parameters, latent KV-cache bytes per token.

use crate::config::DeepSeekConfig;

/// Parameter counts of a configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParamCount {
    /// Main model: embedding, blocks, final norm, head (MTP excluded).
    pub total: u64,
    /// Main-model parameters used for one token: everything but the unchosen routed experts.
    pub active: u64,
    /// All MTP modules, without the embedding and head they share with the main model.
    pub mtp: u64,
    /// Activated parameters of the MTP modules per token.
    pub mtp_active: u64,
}

impl DeepSeekConfig {
    fn attention_params(&self) -> u64 {
        let d = self.hidden_size as u64;
        let h = self.num_attention_heads as u64;
        let qk = self.qk_head_dim() as u64;
        let q = match self.q_lora_rank {
            Some(r) => d * r as u64 + r as u64 + r as u64 * h * qk,
            None => d * h * qk,
        };
        let kvl = self.kv_lora_rank as u64;
        let kv = d * (kvl + self.qk_rope_head_dim as u64)
            + kvl
            + kvl * h * (self.qk_nope_head_dim + self.v_head_dim) as u64;
        q + kv + h * self.v_head_dim as u64 * d
    }

    /// (total, active) parameters of block `layer`, norms included.
    pub(crate) fn layer_params(&self, layer: usize) -> (u64, u64) {
        let d = self.hidden_size as u64;
        let common = 2 * d + self.attention_params();
        if !self.is_moe_layer(layer) {
            let mlp = 3 * d * self.intermediate_size as u64;
            return (common + mlp, common + mlp);
        }
        let expert = 3 * d * self.moe_intermediate_size as u64;
        let e = self.n_routed_experts as u64;
        let bias = if self.topk_method.has_bias() { e } else { 0 };
        let router = e * d + bias;
        let shared = self.n_shared_experts as u64 * expert;
        let total = common + router + shared + e * expert;
        let active = common + router + shared + self.num_experts_per_tok as u64 * expert;
        (total, active)
    }

    /// Counts parameters from the shapes the configuration implies.
    pub fn param_count(&self) -> ParamCount {
        let d = self.hidden_size as u64;
        let v = self.vocab_size as u64;
        let (mut total, mut active) = (2 * v * d + d, 2 * v * d + d);
        for layer in 0..self.num_hidden_layers {
            let (t, a) = self.layer_params(layer);
            total += t;
            active += a;
        }
        let (mut mtp, mut mtp_active) = (0, 0);
        for k in 1..=self.num_nextn_predict_layers {
            let extra = self.mtp_extra_params();
            let (t, a) = self.layer_params(self.num_hidden_layers + k - 1);
            mtp += extra + t;
            mtp_active += extra + a;
        }
        ParamCount { total, active, mtp, mtp_active }
    }

    /// Parameters one decoded token reads: the active parameters, less the embedding table of
    /// which a token reads one row. At batch 1 every one of them is read from memory once per
    /// token, so this times the bytes per parameter over the memory's read bandwidth is the floor
    /// of a decoding step (MTP modules not counted: plain decoding does not run them).
    pub fn decode_read_params(&self) -> u64 {
        let (d, v) = (self.hidden_size as u64, self.vocab_size as u64);
        self.param_count().active - v * d + d
    }

    /// What an MTP module holds besides its block: enorm, hnorm, `shared_head.norm` and
    /// `eh_proj`.
    pub(crate) fn mtp_extra_params(&self) -> u64 {
        let d = self.hidden_size as u64;
        3 * d + 2 * d * d
    }

    /// MoE blocks among the main and MTP blocks.
    fn moe_blocks(&self) -> u64 {
        let blocks = self.num_hidden_layers + self.num_nextn_predict_layers;
        (0..blocks).filter(|&l| self.is_moe_layer(l)).count() as u64
    }

    /// Parameters of the routed experts (main and MTP blocks).
    pub fn routed_expert_params(&self) -> u64 {
        self.moe_blocks()
            * self.n_routed_experts as u64
            * 3
            * (self.hidden_size * self.moe_intermediate_size) as u64
    }

    /// The routers' correction biases (held in f32 whatever the weights' dtype).
    pub fn correction_bias_params(&self) -> u64 {
        if self.topk_method.has_bias() {
            self.moe_blocks() * self.n_routed_experts as u64
        } else {
            0
        }
    }

    /// The linear weight matrices `[out, in]` of block `layer` (what FP8 checkpoints quantize).
    pub(crate) fn layer_linears(&self, layer: usize) -> Vec<[usize; 2]> {
        let d = self.hidden_size;
        let h = self.num_attention_heads;
        let mut m = match self.q_lora_rank {
            Some(r) => vec![[r, d], [h * self.qk_head_dim(), r]],
            None => vec![[h * self.qk_head_dim(), d]],
        };
        m.push([self.kv_lora_rank + self.qk_rope_head_dim, d]);
        m.push([h * (self.qk_nope_head_dim + self.v_head_dim), self.kv_lora_rank]);
        m.push([d, h * self.v_head_dim]);
        let mlp = |width: usize| [[width, d], [width, d], [d, width]];
        if self.is_moe_layer(layer) {
            for _ in 0..self.n_routed_experts {
                m.extend(mlp(self.moe_intermediate_size));
            }
            if self.n_shared_experts > 0 {
                m.extend(mlp(self.n_shared_experts * self.moe_intermediate_size));
            }
        } else {
            m.extend(mlp(self.intermediate_size));
        }
        if layer >= self.num_hidden_layers {
            m.push([d, 2 * d]); // eh_proj
        }
        m
    }

    /// Bytes of all weights (main model and MTP) stored in bf16.
    pub fn weight_bytes_bf16(&self) -> u64 {
        let p = self.param_count();
        2 * (p.total + p.mtp)
    }

    /// Bytes of all weights in DeepSeek's FP8 checkpoint format: linear weights of the blocks as
    /// E4M3 (1 byte) plus one f32 scale per 128×128 block (partial edge blocks included);
    /// embedding, head, norms and router in bf16, the correction bias in f32.
    pub fn weight_bytes_fp8(&self) -> u64 {
        let blocks = self.num_hidden_layers + self.num_nextn_predict_layers;
        let mut linear_params = 0u64;
        let mut scale_bytes = 0u64;
        for layer in 0..blocks {
            for [rows, cols] in self.layer_linears(layer) {
                linear_params += (rows * cols) as u64;
                scale_bytes += 4 * (rows.div_ceil(128) * cols.div_ceil(128)) as u64;
            }
        }
        let bias = self.correction_bias_params();
        let p = self.param_count();
        let other = p.total + p.mtp - linear_params - bias;
        linear_params + scale_bytes + 2 * other + 4 * bias
    }

    /// Bytes per token of the latent KV cache over all main blocks: `(kv_lora_rank +
    /// qk_rope_head_dim) · dtype_bytes · num_hidden_layers`.
    pub fn kv_cache_bytes_per_token(&self, dtype_bytes: usize) -> usize {
        (self.kv_lora_rank + self.qk_rope_head_dim) * dtype_bytes * self.num_hidden_layers
    }

    /// Bytes per token a plain multi-head cache (full K and V per head) would need, for comparison.
    pub fn mha_cache_bytes_per_token(&self, dtype_bytes: usize) -> usize {
        self.num_attention_heads
            * (self.qk_head_dim() + self.v_head_dim)
            * dtype_bytes
            * self.num_hidden_layers
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v3_has_671b_parameters_and_37b_active() {
        let p = DeepSeekConfig::v3_671b().param_count();
        // Figures from the DeepSeek-V3 report: 671B total, 37B activated, MTP 11.5B unique
        // (14B with the shared embedding and head).
        assert_eq!(format!("{:.1}", p.total as f64 / 1e9), "671.0", "{p:?}");
        assert!((p.active as f64 / 1e9 - 37.5).abs() < 0.1, "{p:?}");
        assert!((p.mtp as f64 / 1e9 - 11.6).abs() < 0.1, "{p:?}");
    }

    #[test]
    fn a_decoded_token_reads_the_active_weights_and_one_embedding_row() {
        // The V3-shaped model of examples/random_model.rs, counted by hand from its shapes.
        let cfg = DeepSeekConfig {
            vocab_size: 32000,
            hidden_size: 1024,
            num_hidden_layers: 4,
            first_k_dense_replace: 1,
            intermediate_size: 2816,
            moe_intermediate_size: 512,
            num_attention_heads: 16,
            q_lora_rank: Some(384),
            kv_lora_rank: 128,
            qk_nope_head_dim: 64,
            qk_rope_head_dim: 32,
            v_head_dim: 64,
            n_routed_experts: 32,
            n_shared_experts: 1,
            num_experts_per_tok: 4,
            n_group: 4,
            topk_group: 2,
            ..DeepSeekConfig::small()
        };
        // q_a, its norm, q_b (16 heads × 96), kv_a (128 + 32), its norm, kv_b (16 × (64 + 64)),
        // o_proj, the block's two norms.
        let attention = 1024 * 384 + 384 + 384 * 1536 + 1024 * 160 + 128 + 128 * 2048;
        let attention = attention + 1024 * 1024 + 2 * 1024;
        let dense = 3 * 1024 * 2816;
        // Router and bias, then four routed experts and the shared one.
        let moe = 32 * 1024 + 32 + 5 * 3 * 1024 * 512;
        let head = 32000 * 1024 + 1024 + 1024; // head, final norm, one embedding row
        let want = 4 * attention + dense + 3 * moe + head;
        assert_eq!(cfg.decode_read_params(), want as u64);
        // About 300 MB at f32, as the speed issue estimated (305 MB).
        assert_eq!(cfg.decode_read_params() * 4 / 1_000_000, 299);
    }

    #[test]
    fn linear_shapes_account_for_every_parameter_but_norms_embeddings_and_router() {
        for cfg in
            [DeepSeekConfig::v3_671b(), DeepSeekConfig::v2_lite_16b(), DeepSeekConfig::tiny()]
        {
            let p = cfg.param_count();
            let blocks = cfg.num_hidden_layers + cfg.num_nextn_predict_layers;
            let linear: u64 =
                (0..blocks).flat_map(|l| cfg.layer_linears(l)).map(|[r, c]| (r * c) as u64).sum();
            let d = cfg.hidden_size as u64;
            let moe = (0..blocks).filter(|&l| cfg.is_moe_layer(l)).count() as u64;
            let router =
                moe * cfg.n_routed_experts as u64 * (d + cfg.topk_method.has_bias() as u64);
            let q_norm = cfg.q_lora_rank.unwrap_or(0) as u64;
            let norms = blocks as u64 * (2 * d + q_norm + cfg.kv_lora_rank as u64)
                + d
                + 3 * d * cfg.num_nextn_predict_layers as u64;
            let embed_head = 2 * cfg.vocab_size as u64 * d;
            assert_eq!(linear + router + norms + embed_head, p.total + p.mtp, "{cfg:?}");
        }
    }

    #[test]
    fn v3_fp8_weights_take_about_half_of_bf16() {
        let cfg = DeepSeekConfig::v3_671b();
        let ratio = cfg.weight_bytes_fp8() as f64 / cfg.weight_bytes_bf16() as f64;
        // The released FP8 checkpoint is about 689 GB against 1.37 TB in bf16.
        assert!((0.5..0.52).contains(&ratio), "{ratio}");
    }

    #[test]
    fn v3_latent_cache_is_70272_bytes_per_token() {
        let cfg = DeepSeekConfig::v3_671b();
        assert_eq!(cfg.kv_cache_bytes_per_token(2), 70_272);
        assert_eq!(cfg.mha_cache_bytes_per_token(2), 4_997_120);
    }
}
