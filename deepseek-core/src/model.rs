//! The causal language model: token embedding, the decoder blocks, the final norm, the untied
//! output head, and the optional MTP modules (DeepSeek-V3 §2).

use burn::module::{Module, ModuleMapper, Param};
use burn::nn::{Embedding, EmbeddingConfig};
use burn::tensor::{backend::Backend, FloatDType, Int, Tensor};

use crate::block::DecoderLayer;
use crate::cache::LatentCache;
use crate::config::DeepSeekConfig;
use crate::dtype::WeightDtype;
use crate::error::{DeepSeekError, Result};
use crate::fp8::GemmPrecision;
use crate::moe::Routing;
use crate::mtp::MtpModule;
use crate::norm::{RmsNorm, RmsNormConfig};
use crate::packing::Packing;
use crate::policy::ExecutionPolicy;
use crate::projection::Projection;
use crate::rope::RotaryEmbedding;
use crate::slot_cache::SlotCache;

/// A DeepSeek-V2/V3 model: weights, the rotary tables, the config and the [`ExecutionPolicy`]
/// its forward passes run under. Single-device: a latent KV cache is passed into
/// [`DeepSeekModel::forward_cached`] by the caller, expert parallelism arrives through the
/// policy, and the balancing-bias update lives with training.
#[derive(Module, Debug)]
pub struct DeepSeekModel<B: Backend> {
    /// `[vocab, d]` token embedding.
    pub embed_tokens: Embedding<B>,
    /// The main decoder blocks.
    pub layers: Vec<DecoderLayer<B>>,
    /// The final norm.
    pub norm: RmsNorm<B>,
    /// `[d] → [vocab]`, untied from the embedding; shared by the MTP modules.
    pub lm_head: Projection<B>,
    /// The MTP modules, depth 1 first.
    pub mtp: Vec<MtpModule<B>>,
    /// Rotary tables (YaRN included).
    #[module(skip)]
    pub rope: RotaryEmbedding,
    /// The configuration the model was built from.
    #[module(skip)]
    pub config: DeepSeekConfig,
    /// How the forward passes run; set with [`DeepSeekModel::with_policy`].
    #[module(skip)]
    policy: ExecutionPolicy,
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
    /// `[batch·seq, K]` experts chosen for the new positions by each MoE block in order (rows
    /// in `input_ids` order); what a rollout records for routing replay.
    pub experts: Vec<Tensor<B, 2, Int>>,
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
            lm_head: Projection::new(self.hidden_size, self.vocab_size, device),
            mtp: (1..=self.num_nextn_predict_layers).map(|k| self.init_mtp(k, device)).collect(),
            rope: RotaryEmbedding::new(&self.rope, self.qk_rope_head_dim),
            config: self.clone(),
            policy: ExecutionPolicy::default(),
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
    pub fn forward_with(
        &self,
        input_ids: Tensor<B, 2, Int>,
        options: ForwardOptions,
    ) -> ModelOutput<B> {
        self.forward_packed(input_ids, None, options)
    }

    /// [`DeepSeekModel::forward_with`] over rows that may pack several documents each
    /// (`packing`, see [`crate::packing`]): every token computes what it computes in its
    /// document alone. MTP module k at a document's last k positions combines that document's
    /// state with the next document's tokens: such outputs predict across a boundary, and a
    /// loss must not use them.
    ///
    /// # Shapes
    /// `input_ids`: `[batch, seq]`; `packing` of the same `[batch, seq]`.
    pub fn forward_packed(
        &self,
        input_ids: Tensor<B, 2, Int>,
        packing: Option<&Packing>,
        options: ForwardOptions,
    ) -> ModelOutput<B> {
        if let Some(p) = packing {
            assert_eq!(p.dims(), input_ids.dims(), "packing of the input's shape");
        }
        let embeddings = self.embed_tokens.forward(input_ids); // [b, s, d]
        let mut x = embeddings.clone();
        let mut hidden_states = Vec::new();
        let mut routing = Vec::new();
        for index in 0..self.layers.len() {
            let (out, r) = self.block(index, x, packing);
            x = out;
            routing.extend(r);
            if options.hidden_states {
                hidden_states.push(x.clone());
            }
        }
        let mut out = self.finish(x, embeddings, packing, options.mtp);
        routing.append(&mut out.routing);
        ModelOutput { hidden_states, routing, ..out }
    }

    /// Main block `index` under the model's policy: one step of [`DeepSeekModel::forward_packed`]
    /// (activation checkpointing runs the blocks one at a time).
    ///
    /// # Shapes
    /// `x`: `[batch, seq, d]` → `[batch, seq, d]`, plus the routing of a MoE block.
    pub fn block(
        &self,
        index: usize,
        x: Tensor<B, 3>,
        packing: Option<&Packing>,
    ) -> (Tensor<B, 3>, Option<Routing<B>>) {
        self.layers[index].forward(x, &self.rope, packing, &self.policy)
    }

    /// What follows the main blocks: the final norm, the head and, with `mtp`, the MTP modules
    /// over `embeddings` (the output's `routing` holds only the MTP blocks' routing, and
    /// `hidden_states` is empty).
    ///
    /// # Shapes
    /// `x`, `embeddings`: `[batch, seq, d]` → logits `[batch, seq, vocab]`.
    pub fn finish(
        &self,
        x: Tensor<B, 3>,
        embeddings: Tensor<B, 3>,
        packing: Option<&Packing>,
        mtp: bool,
    ) -> ModelOutput<B> {
        let final_hidden = self.norm.forward(x);
        let logits = self.head(final_hidden.clone());
        let (mut mtp_logits, mut routing) = (Vec::new(), Vec::new());
        if mtp {
            (mtp_logits, routing) = crate::mtp::forward_modules(
                &self.mtp,
                final_hidden.clone(),
                embeddings,
                &self.rope,
                packing,
                &self.policy,
                |h| self.head(h),
            );
        }
        ModelOutput { logits, final_hidden, hidden_states: Vec::new(), routing, mtp_logits }
    }

    /// The main model's forward from position 0 with routing replay: MoE block `m` (in order)
    /// sends each token to the experts `replay[m]` names instead of choosing them (the
    /// experts a rollout recorded, so that a training forward computes what the rollout
    /// computed). No MTP modules. `routing` in the output holds the replayed experts with this
    /// model's gate weights.
    ///
    /// # Shapes
    /// `input_ids`: `[batch, seq]`, `replay[m]`: `[batch·seq, K]` → logits `[batch, seq, vocab]`.
    pub fn forward_replayed(
        &self,
        input_ids: Tensor<B, 2, Int>,
        replay: &[Tensor<B, 2, Int>],
    ) -> Result<ModelOutput<B>> {
        let moe_blocks = self
            .layers
            .iter()
            .filter(|l| matches!(l.mlp, crate::block::FeedForward::Moe(_)))
            .count();
        if replay.len() != moe_blocks {
            return Err(DeepSeekError::Input(format!(
                "routing replay for {} MoE blocks; the model has {moe_blocks}",
                replay.len()
            )));
        }
        let [batch, seq] = input_ids.dims();
        let k = self.config.num_experts_per_tok;
        if let Some(bad) = replay.iter().find(|r| r.dims() != [batch * seq, k]) {
            return Err(DeepSeekError::Input(format!(
                "replayed routing of shape {:?}; a batch of [{batch}, {seq}] needs [{}, {k}]",
                bad.dims(),
                batch * seq
            )));
        }
        let mut x = self.embed_tokens.forward(input_ids); // [b, s, d]
        let mut routing = Vec::new();
        let mut given = replay.iter();
        for layer in &self.layers {
            let replay = match layer.mlp {
                crate::block::FeedForward::Moe(_) => given.next().cloned(),
                crate::block::FeedForward::Dense(_) => None,
            };
            let (out, r) = layer.forward_replayed(x, &self.rope, replay, &self.policy);
            x = out;
            routing.extend(r);
        }
        let final_hidden = self.norm.forward(x);
        let logits = self.head(final_hidden.clone());
        Ok(ModelOutput {
            logits,
            final_hidden,
            hidden_states: Vec::new(),
            routing,
            mtp_logits: Vec::new(),
        })
    }

    /// Runs the new tokens `input_ids` after the `cache.len()` cached ones, appending their
    /// latents to `cache`. Fails, before computing anything, when they do not fit.
    ///
    /// # Shapes
    /// `input_ids`: `[batch, seq]` → logits `[batch, seq, vocab]`.
    pub fn forward_cached(
        &self,
        input_ids: Tensor<B, 2, Int>,
        cache: &mut LatentCache<B>,
        path: AttentionPath,
    ) -> Result<CachedOutput<B>> {
        let [batch, seq] = input_ids.dims();
        if cache.blocks() != self.layers.len() {
            return Err(DeepSeekError::Input(format!(
                "a cache of {} blocks for a model of {} (LatentCache::new)",
                cache.blocks(),
                self.layers.len()
            )));
        }
        cache.check_fits(batch, seq)?;
        let mut x = self.embed_tokens.forward(input_ids); // [b, s, d]
        let gemm = self.policy.gemm;
        let mut experts = Vec::new();
        for (layer, slot) in self.layers.iter().zip(cache.slots_mut().iter_mut()) {
            let (out, routing) = layer.forward_with_attention(x, &self.policy, |attn, normed| {
                attn.forward_cached(normed, &self.rope, slot, path, gemm)
            });
            x = out;
            experts.extend(routing.map(|r| r.indices));
        }
        let final_hidden = self.norm.forward(x);
        Ok(CachedOutput { logits: self.head(final_hidden.clone()), final_hidden, experts })
    }

    /// Prefills a new sequence into the next free row of a shared [`SlotCache`] (continuous
    /// batching: a sequence joins the decoding batch); returns the row it took and the output,
    /// which equals [`DeepSeekModel::forward_cached`]'s prefill of the same prompt alone. Fails,
    /// before computing anything, when no row is free or the prompt does not fit.
    ///
    /// # Shapes
    /// `input_ids`: `[1, seq]` → logits `[1, seq, vocab]`.
    pub fn prefill_slot(
        &self,
        input_ids: Tensor<B, 2, Int>,
        cache: &mut SlotCache<B>,
    ) -> Result<(usize, CachedOutput<B>)> {
        let [batch, seq] = input_ids.dims();
        if batch != 1 {
            return Err(DeepSeekError::Input(format!(
                "a slot prefill takes one sequence, got a batch of {batch}"
            )));
        }
        self.check_slot_cache(cache)?;
        let row = cache.open(seq)?;
        let mut x = self.embed_tokens.forward(input_ids); // [1, s, d]
        let gemm = self.policy.gemm;
        let mut experts = Vec::new();
        for (layer, buffers) in self.layers.iter().zip(cache.blocks_mut().iter_mut()) {
            let (out, routing) = layer.forward_with_attention(x, &self.policy, |attn, normed| {
                attn.forward_prefill_slot(normed, &self.rope, buffers, row, gemm)
            });
            x = out;
            experts.extend(routing.map(|r| r.indices));
        }
        let final_hidden = self.norm.forward(x);
        Ok((row, CachedOutput { logits: self.head(final_hidden.clone()), final_hidden, experts }))
    }

    /// One decoding step of every sequence in `cache` together: row `i` of `input_ids` is the
    /// next token of the sequence in row `i`, at its own position. The projections and experts
    /// see one batch of `active` tokens; each row's output equals its own
    /// [`DeepSeekModel::forward_cached`] step (absorbed path) up to the rounding of the batched
    /// GEMMs. Fails, before computing anything, when the rows do not match or a row is full.
    ///
    /// # Shapes
    /// `input_ids`: `[active, 1]` → logits `[active, 1, vocab]`.
    pub fn decode_slots(
        &self,
        input_ids: Tensor<B, 2, Int>,
        cache: &mut SlotCache<B>,
    ) -> Result<CachedOutput<B>> {
        let [rows, seq] = input_ids.dims();
        if rows != cache.active() || seq != 1 {
            return Err(DeepSeekError::Input(format!(
                "a decoding step takes one token for each of the {} active sequences, got [{rows}, {seq}]",
                cache.active()
            )));
        }
        self.check_slot_cache(cache)?;
        cache.check_step()?;
        let positions = cache.lens().to_vec();
        // The rows' tokens side by side, so every GEMM is one of `rows` rows.
        let mut x = self.embed_tokens.forward(input_ids.reshape([1, rows])); // [1, rows, d]
        let gemm = self.policy.gemm;
        let mut experts = Vec::new();
        for (layer, buffers) in self.layers.iter().zip(cache.blocks_mut().iter_mut()) {
            let (out, routing) = layer.forward_with_attention(x, &self.policy, |attn, normed| {
                attn.forward_decode_slots(normed, &self.rope, buffers, &positions, gemm)
            });
            x = out;
            experts.extend(routing.map(|r| r.indices));
        }
        cache.advance();
        let (d, vocab) = (self.config.hidden_size, self.config.vocab_size);
        let hidden = self.norm.forward(x); // [1, rows, d]
        let logits = self.head(hidden.clone()).reshape([rows, 1, vocab]);
        Ok(CachedOutput { logits, final_hidden: hidden.reshape([rows, 1, d]), experts })
    }

    fn check_slot_cache(&self, cache: &SlotCache<B>) -> Result<()> {
        if cache.blocks() != self.layers.len() {
            return Err(DeepSeekError::Input(format!(
                "a slot cache of {} blocks for a model of {} (SlotCache::new)",
                cache.blocks(),
                self.layers.len()
            )));
        }
        Ok(())
    }

    /// MTP module `k` (1-based) over new positions, with its own one-block `cache` (see
    /// [`LatentCache::for_mtp`]): position `i` combines the hidden state `h_i` (the main model's
    /// final-normed output for k = 1) with the embedding of the token at `i + k`. Returns the
    /// logits predicting the token at `i + k + 1` and the module's hidden states (input of
    /// module k + 1).
    ///
    /// # Shapes
    /// `hidden`: `[batch, seq, d]`, `next_ids`: `[batch, seq]` → logits `[batch, seq, vocab]`.
    pub fn forward_mtp_cached(
        &self,
        k: usize,
        hidden: Tensor<B, 3>,
        next_ids: Tensor<B, 2, Int>,
        cache: &mut LatentCache<B>,
    ) -> Result<CachedOutput<B>> {
        let module = self.mtp.get(k.wrapping_sub(1)).ok_or_else(|| {
            DeepSeekError::Input(format!(
                "MTP module {k} requested; the model has {} (num_nextn_predict_layers)",
                self.mtp.len()
            ))
        })?;
        let [batch, seq, _] = hidden.dims();
        cache.check_fits(batch, seq)?;
        let x = module.combine(hidden, self.embed_tokens.forward(next_ids), &self.policy); // [b, s, d]
        let slot = match cache.slots_mut() {
            [slot] => slot,
            slots => {
                return Err(DeepSeekError::Input(format!(
                    "an MTP module needs a one-block cache (LatentCache::for_mtp), got {} blocks",
                    slots.len()
                )))
            }
        };
        let gemm = self.policy.gemm;
        // The prompt's positions go the naive way, as a main-model prefill does; each draft step
        // after it over the latent (absorbed): the naive path would expand keys and values for
        // the whole context at every step (half of a speculative step's time on `small`).
        let path = if slot.is_empty() { AttentionPath::Naive } else { AttentionPath::Absorbed };
        let (h, routing) = module.block.forward_with_attention(x, &self.policy, |attn, normed| {
            attn.forward_cached(normed, &self.rope, slot, path, gemm)
        });
        Ok(CachedOutput {
            logits: self.head(module.head_norm.forward(h.clone())),
            final_hidden: h,
            experts: routing.into_iter().map(|r| r.indices).collect(),
        })
    }

    /// The output head ([`head_logits`]).
    fn head(&self, hidden: Tensor<B, 3>) -> Tensor<B, 3> {
        head_logits(&self.lm_head, hidden)
    }

    /// The dtype of the weights and activations ([`crate::LoadOptions::dtype`]); read from the
    /// embedding, which every forward starts from.
    pub fn dtype(&self) -> WeightDtype {
        WeightDtype::of(self.embed_tokens.weight.val().dtype()).unwrap_or_default()
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

    /// This model running under `policy` (GEMM precision, expert path, expert parallelism,
    /// node limit): one value for every block, checked against the model here.
    pub fn with_policy(mut self, policy: ExecutionPolicy) -> Result<Self> {
        let (experts, top_k) = (self.config.n_routed_experts, self.config.num_experts_per_tok);
        if let Some(p) = &policy.expert_parallel {
            if p.n_experts() != experts {
                return Err(DeepSeekError::config(
                    "expert_parallel",
                    format!("placement for {} experts on a model with {experts}", p.n_experts()),
                ));
            }
        }
        if let Some(limit) = policy.node_limit {
            limit
                .check(experts, top_k)
                .map_err(|problem| DeepSeekError::config("node_limit", problem))?;
        }
        self.policy = policy;
        Ok(self)
    }

    /// How this model's forward passes run.
    pub fn policy(&self) -> &ExecutionPolicy {
        &self.policy
    }

    /// The decoder blocks of the model, mutably: the main blocks, then each MTP module's block.
    pub fn blocks_mut(&mut self) -> impl Iterator<Item = &mut DecoderLayer<B>> {
        self.layers.iter_mut().chain(self.mtp.iter_mut().map(|m| &mut m.block))
    }

    /// [`DeepSeekModel::forward_with`] after [`DeepSeekModel::check_input`]: the entry point for
    /// untrusted input.
    pub fn try_forward(
        &self,
        input_ids: Tensor<B, 2, Int>,
        options: ForwardOptions,
    ) -> Result<ModelOutput<B>> {
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
        let ids: Vec<i64> =
            input_ids.to_data().convert::<i64>().into_vec().expect("int tensor data");
        let vocab = self.config.vocab_size as i64;
        if let Some((pos, id)) = ids.iter().enumerate().find(|(_, &id)| id < 0 || id >= vocab) {
            return Err(DeepSeekError::Input(format!(
                "token id {id} at flat position {pos} is outside the vocabulary 0..{vocab}"
            )));
        }
        Ok(())
    }
}

/// The output head `lm_head` applied to `hidden` (the final norm's output), as every forward
/// computes the logits: always at the tensors' precision (DeepSeek-V3 §3.3.1 keeps the head out
/// of FP8), widened to f32 whatever the model's dtype, so losses, softmaxes and sampling see f32
/// ([`crate::dtype`]).
///
/// # Shapes
/// `hidden`: `[batch, seq, d]` → `[batch, seq, vocab]`.
pub fn head_logits<B: Backend>(lm_head: &Projection<B>, hidden: Tensor<B, 3>) -> Tensor<B, 3> {
    lm_head.forward(hidden, GemmPrecision::Full).cast(FloatDType::F32)
}

/// Weight dtype conversion of a model built in memory ([`crate::dtype`]).
impl<B: Backend> DeepSeekModel<B> {
    /// This model with its weights held in `dtype`: every weight but the routers' correction
    /// biases (always f32) and the LoRA adapters (they keep their own dtype). Loading with
    /// [`crate::LoadOptions::dtype`] stores each weight in its dtype directly; this is for
    /// models built in memory (presets, fresh initializations).
    pub fn cast(self, dtype: WeightDtype) -> Self {
        /// Casts float parameters, except those under a path component it keeps.
        struct Cast {
            dtype: FloatDType,
            path: Vec<String>,
        }
        impl<B: Backend> ModuleMapper<B> for Cast {
            fn enter_module(&mut self, name: &str, _: &str) {
                self.path.push(name.to_string());
            }
            fn exit_module(&mut self, _: &str, _: &str) {
                self.path.pop();
            }
            fn map_float<const D: usize>(
                &mut self,
                param: Param<Tensor<B, D>>,
            ) -> Param<Tensor<B, D>> {
                let kept = self.path.iter().any(|p| KEPT.contains(&p.as_str()));
                if kept {
                    return param;
                }
                // Rounded on the host from f32, as the loader rounds (to nearest, ties to even,
                // as PyTorch does): Flex's cast goes through f64 and `half`'s f64 → bf16 drops
                // the low mantissa bits first, which rounds some values the wrong way.
                let dtype = self.dtype;
                param.map(|t| {
                    let (device, grad) = (t.device(), t.is_require_grad());
                    let values = t.into_data().convert::<f32>();
                    Tensor::from_data(values, (&device, dtype.into())).set_require_grad(grad)
                })
            }
        }
        /// Path components whose parameters keep their dtype.
        const KEPT: [&str; 2] = ["e_score_correction_bias", "lora"];
        self.map(&mut Cast { dtype: dtype.float(), path: Vec::new() })
    }
}
