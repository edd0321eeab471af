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

/// The MTP modules after the main model (DeepSeek-V3 eq. 21–23): module k combines depth
/// k − 1's states at positions `0..s − k` with the embeddings of the tokens k ahead; its logits
/// are `head(head_norm(h_k))`. Stops at the first module with no position left.
///
/// # Shapes
/// `final_hidden`, `embeddings`: `[batch, seq, d]` → logits `[batch, seq − k, vocab]` for each
/// module k, and the routing of each module's MoE block.
pub fn forward_modules<B: Backend>(
    modules: &[MtpModule<B>],
    final_hidden: Tensor<B, 3>,
    embeddings: Tensor<B, 3>,
    rope: &RotaryEmbedding,
    packing: Option<&Packing>,
    policy: &ExecutionPolicy,
    head: impl Fn(Tensor<B, 3>) -> Tensor<B, 3>,
) -> (Vec<Tensor<B, 3>>, Vec<Routing<B>>) {
    let [_, seq, _] = embeddings.dims();
    let (mut logits, mut routing) = (Vec::new(), Vec::new());
    let mut hidden = final_hidden;
    for (i, module) in modules.iter().enumerate() {
        let k = i + 1;
        if seq <= k {
            break;
        }
        let prev = hidden.narrow(1, 0, seq - k); // [b, s - k, d]
        let next = embeddings.clone().narrow(1, k, seq - k); // [b, s - k, d]
        let narrowed = packing.map(|p| p.narrow(seq - k));
        let (h, r) = module.forward(prev, next, rope, narrowed.as_ref(), policy);
        routing.extend(r);
        logits.push(head(module.head_norm.forward(h.clone())));
        hidden = h;
    }
    (logits, routing)
}
