//! Multi-token prediction modules (DeepSeek-V3 §2.2).
//!
//! Module k (1-based, D in all) predicts token `i + k + 1` at position `i`:
//! `h'_i = eh_proj([enorm(Emb(t_{i+k})); hnorm(h^{k-1}_i)])` (embedding first, as Megatron,
//! torchtitan and the released weights order it), one transformer block over the shortened
//! sequence, then the shared head after `shared_head.norm`. `h^0` is the main model's final
//! hidden state after its final norm (the convention of the serving engines that run the
//! released MTP weights); the embedding and output head are the main model's.

use burn::module::Module;
use burn::tensor::{backend::Backend, Tensor};

use crate::block::DecoderLayer;
use crate::config::DeepSeekConfig;
use crate::moe::Routing;
use crate::norm::{RmsNorm, RmsNormConfig};
use crate::packing::Packing;
use crate::policy::ExecutionPolicy;
use crate::projection::Projection;
use crate::rope::RotaryEmbedding;

/// One MTP module; stored in checkpoints as layer `num_hidden_layers + k - 1`.
#[derive(Module, Debug)]
pub struct MtpModule<B: Backend> {
    /// Norm of the embeddings of the tokens `k` ahead.
    pub enorm: RmsNorm<B>,
    /// Norm of the previous depth's hidden states.
    pub hnorm: RmsNorm<B>,
    /// `[2d] → [d]`
    pub eh_proj: Projection<B>,
    /// The module's transformer block (always MoE).
    pub block: DecoderLayer<B>,
    /// `shared_head.norm`: the norm before the shared output head.
    pub head_norm: RmsNorm<B>,
}

impl DeepSeekConfig {
    /// MTP module `k` (1-based).
    pub fn init_mtp<B: Backend>(&self, k: usize, device: &B::Device) -> MtpModule<B> {
        let norm = RmsNormConfig::new(self.hidden_size).with_eps(self.rms_norm_eps);
        MtpModule {
            enorm: norm.init(device),
            hnorm: norm.init(device),
            eh_proj: Projection::new(2 * self.hidden_size, self.hidden_size, device),
            block: self.init_layer(self.num_hidden_layers + k - 1, device),
            head_norm: norm.init(device),
        }
    }
}

impl<B: Backend> MtpModule<B> {
    /// Combines the previous depth's hidden states with the embeddings of the tokens `k` ahead
    /// and runs the block. Returns the new hidden states (before `head_norm`).
    ///
    /// # Shapes
    /// `hidden`: `[batch, n, d]` (positions `0..n`), `next_embeddings`: `[batch, n, d]` (the
    /// embeddings of the tokens `k` positions later) → `[batch, n, d]`.
    pub fn forward(
        &self,
        hidden: Tensor<B, 3>,
        next_embeddings: Tensor<B, 3>,
        rope: &RotaryEmbedding,
        packing: Option<&Packing>,
        policy: &ExecutionPolicy,
    ) -> (Tensor<B, 3>, Option<Routing<B>>) {
        self.block.forward(self.combine(hidden, next_embeddings, policy), rope, packing, policy)
    }

    /// The block's input: `eh_proj([enorm(embeddings); hnorm(hidden)])`.
    ///
    /// # Shapes
    /// `hidden`, `next_embeddings`: `[batch, n, d]` → `[batch, n, d]`.
    pub fn combine(
        &self,
        hidden: Tensor<B, 3>,
        next_embeddings: Tensor<B, 3>,
        policy: &ExecutionPolicy,
    ) -> Tensor<B, 3> {
        let x =
            Tensor::cat(vec![self.enorm.forward(next_embeddings), self.hnorm.forward(hidden)], 2); // [b, n, 2d]
        self.eh_proj.forward(x, policy.gemm)
    }
}
