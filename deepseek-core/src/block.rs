//! One transformer block: `h = x + attn(norm(x)); out = h + ffn(norm(h))`, where the feed-forward
//! part is a dense SwiGLU MLP for the first `first_k_dense_replace` blocks and DeepSeekMoE after.

use burn::module::Module;
use burn::tensor::{backend::Backend, Int, Tensor};

use crate::config::DeepSeekConfig;
use crate::mla::{Mla, MlaConfig};
use crate::mlp::{Mlp, MlpConfig};
use crate::moe::{Moe, MoeConfig, Routing};
use crate::norm::{RmsNorm, RmsNormConfig};
use crate::packing::Packing;
use crate::policy::ExecutionPolicy;
use crate::rope::RotaryEmbedding;

/// The feed-forward half of a block, chosen once per layer index.
// One per block, built once: the size of the larger variant costs nothing, and Burn's module
// derive does not see through a `Box`.
#[allow(clippy::large_enum_variant)]
#[derive(Module, Debug)]
pub enum FeedForward<B: Backend> {
    /// A dense SwiGLU MLP (the first `first_k_dense_replace` blocks).
    Dense(Mlp<B>),
    /// DeepSeekMoE.
    Moe(Moe<B>),
}

/// A pre-norm decoder block; field names follow the checkpoints.
#[derive(Module, Debug)]
pub struct DecoderLayer<B: Backend> {
    /// Norm before attention.
    pub input_layernorm: RmsNorm<B>,
    /// Multi-head latent attention.
    pub self_attn: Mla<B>,
    /// Norm before the feed-forward half.
    pub post_attention_layernorm: RmsNorm<B>,
    /// Dense MLP or MoE.
    pub mlp: FeedForward<B>,
}

impl DeepSeekConfig {
    /// Attention settings of every block.
    pub fn mla_config(&self) -> MlaConfig {
        MlaConfig::new(
            self.hidden_size,
            self.num_attention_heads,
            self.kv_lora_rank,
            self.qk_nope_head_dim,
            self.qk_rope_head_dim,
            self.v_head_dim,
            self.rms_norm_eps,
            self.softmax_scale(),
        )
        .with_q_lora_rank(self.q_lora_rank)
    }

    /// Block `layer` (indices `>= num_hidden_layers` are MTP blocks, always MoE).
    pub fn init_layer<B: Backend>(&self, layer: usize, device: &B::Device) -> DecoderLayer<B> {
        let norm = RmsNormConfig::new(self.hidden_size).with_eps(self.rms_norm_eps);
        let mlp = if self.is_moe_layer(layer) {
            FeedForward::Moe(MoeConfig::from_model(self).init(device))
        } else {
            FeedForward::Dense(
                MlpConfig::new(self.hidden_size, self.intermediate_size).init(device),
            )
        };
        DecoderLayer {
            input_layernorm: norm.init(device),
            self_attn: self.mla_config().init(device),
            post_attention_layernorm: norm.init(device),
            mlp,
        }
    }
}

impl<B: Backend> DecoderLayer<B> {
    /// The block over `x` from position 0 (or over the packed documents of `packing`).
    ///
    /// # Shapes
    /// `x`: `[batch, seq, d_model]` → `[batch, seq, d_model]`, plus the routing if this is a
    /// MoE block.
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        rope: &RotaryEmbedding,
        packing: Option<&Packing>,
        policy: &ExecutionPolicy,
    ) -> (Tensor<B, 3>, Option<Routing<B>>) {
        self.forward_with_attention(x, policy, |attn, normed| {
            attn.forward(normed, rope, packing, policy.gemm)
        })
    }

    /// The block with the attention call supplied by the caller (who may read and write a KV
    /// cache or pick the absorbed path): `attend(self_attn, input_layernorm(x))`.
    ///
    /// # Shapes
    /// `x`: `[batch, seq, d_model]` → `[batch, seq, d_model]`.
    pub fn forward_with_attention(
        &self,
        x: Tensor<B, 3>,
        policy: &ExecutionPolicy,
        attend: impl FnOnce(&Mla<B>, Tensor<B, 3>) -> Tensor<B, 3>,
    ) -> (Tensor<B, 3>, Option<Routing<B>>) {
        self.forward_inner(x, policy, None, attend)
    }

    /// [`DecoderLayer::forward`] from position 0 with a MoE block's tokens sent to the experts
    /// `replay` names (routing replay, [`crate::moe::Router::route`]); a dense block ignores it.
    ///
    /// # Shapes
    /// `x`: `[batch, seq, d_model]`, `replay`: `[batch·seq, K]` → `[batch, seq, d_model]`.
    pub fn forward_replayed(
        &self,
        x: Tensor<B, 3>,
        rope: &RotaryEmbedding,
        replay: Option<Tensor<B, 2, Int>>,
        policy: &ExecutionPolicy,
    ) -> (Tensor<B, 3>, Option<Routing<B>>) {
        self.forward_inner(x, policy, replay, |attn, normed| {
            attn.forward(normed, rope, None, policy.gemm)
        })
    }

    fn forward_inner(
        &self,
        x: Tensor<B, 3>,
        policy: &ExecutionPolicy,
        replay: Option<Tensor<B, 2, Int>>,
        attend: impl FnOnce(&Mla<B>, Tensor<B, 3>) -> Tensor<B, 3>,
    ) -> (Tensor<B, 3>, Option<Routing<B>>) {
        let h = x.clone() + attend(&self.self_attn, self.input_layernorm.forward(x));
        let normed = self.post_attention_layernorm.forward(h.clone());
        match &self.mlp {
            FeedForward::Dense(mlp) => (h + mlp.forward(normed, policy.gemm), None),
            FeedForward::Moe(moe) => {
                let (y, routing) = moe.forward_replayed(normed, policy, replay);
                (h + y, Some(routing))
            }
        }
    }
}
