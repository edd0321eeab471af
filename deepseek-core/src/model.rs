//! The causal language model: token embedding, the decoder blocks, the final norm, the untied
//! output head, and the optional MTP modules (DeepSeek-V3 §2).

use crate::fp8::GemmPrecision;
use burn::module::Module;
use burn::nn::{Embedding, EmbeddingConfig, Linear, LinearConfig};
use burn::tensor::{backend::Backend, Int, Tensor};

use crate::block::DecoderLayer;
use crate::cache::LatentCache;
use crate::config::DeepSeekConfig;
use crate::error::{DeepSeekError, Result};
use crate::moe::Routing;
use crate::mtp::MtpModule;
use crate::norm::{RmsNorm, RmsNormConfig};
use crate::rope::RotaryEmbedding;

/// A DeepSeek-V2/V3 model. Single-device and stateless: caches, sharding and the balancing-bias
/// update live with inference and training.
#[derive(Module, Debug)]
pub struct DeepSeekModel<B: Backend> {
    pub embed_tokens: Embedding<B>,
    pub layers: Vec<DecoderLayer<B>>,
    pub norm: RmsNorm<B>,
    pub lm_head: Linear<B>,
    pub mtp: Vec<MtpModule<B>>,
    #[module(skip)]
    pub rope: RotaryEmbedding,
    #[module(skip)]
    pub config: DeepSeekConfig,
}

/// What one forward pass can return besides the logits.
#[derive(Debug, Clone, Copy, Default)]
pub struct ForwardOptions {
    /// Keep the residual stream after every block.
    pub hidden_states: bool,
    /// Run the MTP modules.
    pub mtp: bool,
}

pub use crate::mla::AttentionPath;

/// Result of [`DeepSeekModel::forward_cached`].
#[derive(Debug, Clone)]
pub struct CachedOutput<B: Backend> {
    /// `[batch, seq, vocab]` logits of the new positions.
    pub logits: Tensor<B, 3>,
    /// `[batch, seq, d]` final-normed hidden states of the new positions (MTP drafting input).
    pub final_hidden: Tensor<B, 3>,
}

/// Result of [`DeepSeekModel::forward_with`].
#[derive(Debug, Clone)]
pub struct ModelOutput<B: Backend> {
    /// `[batch, seq, vocab]`
    pub logits: Tensor<B, 3>,
    /// `[batch, seq, d]` after the final norm (the input of the head and of MTP module 1).
    pub final_hidden: Tensor<B, 3>,
    /// `[batch, seq, d]` output of each block, when requested.
    pub hidden_states: Vec<Tensor<B, 3>>,
    /// Routing of every MoE block in order: main blocks first, then MTP blocks.
    pub routing: Vec<Routing<B>>,
    /// `[batch, seq - k, vocab]` logits of MTP module k (predicting token `i + k + 1`), k = 1..=D.
    pub mtp_logits: Vec<Tensor<B, 3>>,
}

impl DeepSeekConfig {
    /// Builds the model with freshly initialized (lazily allocated) weights.
    pub fn init<B: Backend>(&self, device: &B::Device) -> DeepSeekModel<B> {
        DeepSeekModel {
            embed_tokens: EmbeddingConfig::new(self.vocab_size, self.hidden_size).init(device),
            layers: (0..self.num_hidden_layers).map(|l| self.init_layer(l, device)).collect(),
            norm: RmsNormConfig::new(self.hidden_size).with_eps(self.rms_norm_eps).init(device),
            lm_head: LinearConfig::new(self.hidden_size, self.vocab_size).with_bias(false).init(device),
            mtp: (1..=self.num_nextn_predict_layers).map(|k| self.init_mtp(k, device)).collect(),
            rope: RotaryEmbedding::new(&self.rope, self.qk_rope_head_dim),
            config: self.clone(),
        }
    }
}

impl<B: Backend> DeepSeekModel<B> {
    /// Logits of the main model.
    ///
    /// # Shapes
    /// `input_ids`: `[batch, seq]` → `[batch, seq, vocab]`.
    pub fn forward(&self, input_ids: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        self.forward_with(input_ids, ForwardOptions::default()).logits
    }

    /// Full forward pass, with what `options` asks for.
    ///
    /// # Shapes
    /// `input_ids`: `[batch, seq]`.
    pub fn forward_with(&self, input_ids: Tensor<B, 2, Int>, options: ForwardOptions) -> ModelOutput<B> {
        let embeddings = self.embed_tokens.forward(input_ids); // [b, s, d]
        let mut x = embeddings.clone();
        let mut hidden_states = Vec::new();
        let mut routing = Vec::new();
        for layer in &self.layers {
            let (out, r) = layer.forward(x, &self.rope, 0);
            x = out;
            routing.extend(r);
            if options.hidden_states {
                hidden_states.push(x.clone());
            }
        }
        let final_hidden = self.norm.forward(x);
        let logits = self.lm_head.forward(final_hidden.clone());
        let mut mtp_logits = Vec::new();
        if options.mtp {
            let [_, seq, _] = embeddings.dims();
            let mut hidden = final_hidden.clone();
            for (i, module) in self.mtp.iter().enumerate() {
                let k = i + 1;
                if seq <= k {
                    break;
                }
                let prev = hidden.narrow(1, 0, seq - k); // [b, s - k, d]
                let next = embeddings.clone().narrow(1, k, seq - k); // [b, s - k, d]
                let (h, r) = module.forward(prev, next, &self.rope);
                routing.extend(r);
                mtp_logits.push(self.lm_head.forward(module.head_norm.forward(h.clone())));
                hidden = h;
            }
        }
        ModelOutput { logits, final_hidden, hidden_states, routing, mtp_logits }
    }

    /// Runs the new tokens `input_ids` after the `cache.len()` cached ones, appending their
    /// latents to `cache`. Fails, before computing anything, when they do not fit.
    ///
    /// # Shapes
    /// `input_ids`: `[batch, seq]` → logits `[batch, seq, vocab]`.
    pub fn forward_cached(&self, input_ids: Tensor<B, 2, Int>, cache: &mut LatentCache<B>, path: AttentionPath) -> Result<CachedOutput<B>> {
        let [batch, seq] = input_ids.dims();
        cache.check_fits(batch, seq)?;
        let mut x = self.embed_tokens.forward(input_ids); // [b, s, d]
        for (l, layer) in self.layers.iter().enumerate() {
            let (out, _) = layer.forward_with_attention(x, |attn, normed| attn.forward_cached(normed, &self.rope, cache, l, path));
            x = out;
        }
        cache.advance(seq);
        let final_hidden = self.norm.forward(x);
        Ok(CachedOutput { logits: self.lm_head.forward(final_hidden.clone()), final_hidden })
    }

    /// MTP module `k` (1-based) over new positions, with its own one-block `cache` (see
    /// [`LatentCache::for_mtp`]): position `i` combines the hidden state `h_i` (the main model's
    /// final-normed output for k = 1) with the embedding of the token at `i + k`. Returns the
    /// logits predicting the token at `i + k + 1` and the module's hidden states (input of
    /// module k + 1).
    ///
    /// # Shapes
    /// `hidden`: `[batch, seq, d]`, `next_ids`: `[batch, seq]` → logits `[batch, seq, vocab]`.
    pub fn forward_mtp_cached(&self, k: usize, hidden: Tensor<B, 3>, next_ids: Tensor<B, 2, Int>, cache: &mut LatentCache<B>) -> Result<CachedOutput<B>> {
        let module = self.mtp.get(k.wrapping_sub(1)).ok_or_else(|| {
            DeepSeekError::Input(format!("MTP module {k} requested; the model has {} (num_nextn_predict_layers)", self.mtp.len()))
        })?;
        let [batch, seq, _] = hidden.dims();
        cache.check_fits(batch, seq)?;
        let x = module.combine(hidden, self.embed_tokens.forward(next_ids)); // [b, s, d]
        let (h, _) = module
            .block
            .forward_with_attention(x, |attn, normed| attn.forward_cached(normed, &self.rope, cache, 0, AttentionPath::Naive));
        cache.advance(seq);
        Ok(CachedOutput { logits: self.lm_head.forward(module.head_norm.forward(h.clone())), final_hidden: h })
    }

    /// Initializes every lazily-initialized parameter in place. Burn draws a lazy parameter on
    /// first use, and a clone of a still-lazy parameter draws its own values: call this before
    /// cloning a freshly initialized model (to save it, or to keep a copy of the initial weights).
    pub fn materialize(&self) {
        struct Touch;
        impl<B: Backend> burn::module::ModuleVisitor<B> for Touch {
            fn visit_float<const D: usize>(&mut self, param: &burn::module::Param<Tensor<B, D>>) {
                let _ = param.val();
            }
        }
        self.visit(&mut Touch);
    }

    /// Chooses how every MoE block runs its routed experts (a speed choice: results agree).
    pub fn with_expert_path(mut self, path: crate::moe::ExpertPath) -> Self {
        let blocks = self.layers.iter_mut().chain(self.mtp.iter_mut().map(|m| &mut m.block));
        for block in blocks {
            if let crate::block::FeedForward::Moe(moe) = &mut block.mlp {
                moe.experts.path = path;
            }
        }
        self
    }

    /// Chooses how the GEMMs of linear layers run: attention projections, dense and shared MLPs,
    /// routed experts and the MTP projections. The embedding, the output head, the MoE router,
    /// norms and the attention core keep the tensors' precision, as in DeepSeek-V3's FP8 training
    /// (§3.3.1). With [`GemmPrecision::Fp8`] the grouped expert path falls back to per expert.
    pub fn with_gemm_precision(mut self, gemm: GemmPrecision) -> Self {
        for m in &mut self.mtp {
            m.gemm = gemm;
        }
        let blocks = self.layers.iter_mut().chain(self.mtp.iter_mut().map(|m| &mut m.block));
        for block in blocks {
            block.self_attn.gemm = gemm;
            match &mut block.mlp {
                crate::block::FeedForward::Dense(mlp) => mlp.gemm = gemm,
                crate::block::FeedForward::Moe(moe) => {
                    moe.experts.gemm = gemm;
                    if let Some(shared) = &mut moe.shared_experts {
                        shared.gemm = gemm;
                    }
                }
            }
        }
        self
    }

    /// The MoE layers of the model (main layers, then MTP modules).
    fn moe_layers_mut(&mut self) -> impl Iterator<Item = &mut crate::moe::Moe<B>> {
        self.layers.iter_mut().chain(self.mtp.iter_mut().map(|m| &mut m.block)).filter_map(|block| match &mut block.mlp {
            crate::block::FeedForward::Moe(moe) => Some(moe),
            crate::block::FeedForward::Dense(_) => None,
        })
    }

    /// Spreads the routed experts of every MoE layer over the ranks of `parallel`'s exchange
    /// (`None`: every expert on this rank). Every rank of the group must then run the same
    /// forward and backward passes in step. The weights stay whole on every rank.
    pub fn with_expert_parallel(mut self, parallel: Option<crate::parallel::ExpertParallel>) -> crate::parallel::Result<Self> {
        if let Some(p) = &parallel {
            if p.n_experts() != self.config.n_routed_experts {
                return Err(crate::parallel::ParallelError::Config {
                    field: "expert_parallel",
                    problem: format!("placement for {} experts on a model with {}", p.n_experts(), self.config.n_routed_experts),
                });
            }
        }
        for moe in self.moe_layers_mut() {
            moe.experts.parallel = parallel.clone();
        }
        Ok(self)
    }

    /// Node-limited routing on every MoE layer (`None`: off). See [`crate::moe::NodeLimit`].
    pub fn with_node_limit(mut self, limit: Option<crate::moe::NodeLimit>) -> Result<Self> {
        if let Some(l) = limit {
            l.check(self.config.n_routed_experts, self.config.num_experts_per_tok)
                .map_err(|problem| crate::DeepSeekError::Config { field: "node_limit".into(), problem })?;
        }
        for moe in self.moe_layers_mut() {
            moe.gate.node_limit = limit;
        }
        Ok(self)
    }

    /// [`DeepSeekModel::forward_with`] after [`DeepSeekModel::check_input`]: the entry point for
    /// untrusted input.
    pub fn try_forward(&self, input_ids: Tensor<B, 2, Int>, options: ForwardOptions) -> Result<ModelOutput<B>> {
        self.check_input(&input_ids)?;
        Ok(self.forward_with(input_ids, options))
    }

    /// Checks token ids and length before a forward pass: ids must be in `0..vocab_size` and the
    /// sequence no longer than `max_position_embeddings`.
    pub fn check_input(&self, input_ids: &Tensor<B, 2, Int>) -> Result<()> {
        let [batch, seq] = input_ids.dims();
        if batch == 0 || seq == 0 {
            return Err(DeepSeekError::Input(format!("empty input: shape [{batch}, {seq}]")));
        }
        if seq > self.config.max_position_embeddings {
            return Err(DeepSeekError::Input(format!(
                "sequence of {seq} tokens exceeds the context of {} (max_position_embeddings)",
                self.config.max_position_embeddings
            )));
        }
        let ids: Vec<i64> = input_ids.to_data().convert::<i64>().into_vec().expect("int tensor data");
        let vocab = self.config.vocab_size as i64;
        if let Some((pos, id)) = ids.iter().enumerate().find(|(_, &id)| id < 0 || id >= vocab) {
            return Err(DeepSeekError::Input(format!(
                "token id {id} at flat position {pos} is outside the vocabulary 0..{vocab}"
            )));
        }
        Ok(())
    }
}
