//! The memory planner: bytes per rank for inference, full training and LoRA fine-tuning, computed
//! from the configuration alone (`deepseek info --plan`), so a user can tell before downloading
//! 640 GB whether a run fits.
//!
//! Per rank, in five parts:
//! - **weights**: every parameter in the weight dtype (LoRA adapters in f32), or, with FP8-resident
//!   weights (inference from an FP8 checkpoint), the blocks' projections as one byte each plus an
//!   f32 scale per 128 × 128 block; the routed experts are split
//!   over the expert-parallel ranks (`E` of the `R` ranks share one copy of the experts, DeepSeek-V3
//!   §3.2) and the correction biases stay f32.
//! - **gradients**: one f32 value per trainable parameter this rank holds (all of them in full
//!   training; only the adapters under LoRA, whose frozen base has none).
//! - **optimizer**: AdamW's two f32 moments per trainable parameter, plus an f32 master copy when
//!   the weights are held in bf16/f16 (the mixed-precision recipe of §3.3). ZeRO stage 1 splits
//!   these over the ranks holding copies of the same parameter: `R` for the dense part, `R / E`
//!   for the experts.
//! - **activations**: what the backward pass keeps (training), or the largest transient of a
//!   forward pass (inference). Training counts, per token and block, the tensors Burn's autodiff
//!   saves for our forward (listed in [`MemoryPlan::saved_per_token`]), plus the attention
//!   probabilities `[B, H, S, S]` and the logits with their softmax, times a factor of 1.45 for
//!   the copies and gradient buffers the list does not name (measured, see below). With
//!   activation checkpointing a block keeps only its input, and one block's activations are
//!   live at a time.
//! - **kv_cache**: the latent cache of `B` sequences of `S` tokens (inference).
//!
//! With pipeline parallelism the rank is the heaviest stage's; the activations stay those of a
//! whole micro-batch, since 1F1B keeps `P` micro-batches in flight on the first stage, each
//! with `1/P` of the blocks.
//!
//! What the planner does not see: the process itself (code, allocator, thread stacks: about
//! 50–100 MB on Flex), fragmentation, and workspace a backend allocates inside one kernel. The
//! measured check is in `docs/memory.md`.

use std::fmt;
use std::str::FromStr;

use crate::config::DeepSeekConfig;
use crate::dtype::WeightDtype;
use crate::error::{DeepSeekError, Result};

/// What the memory is planned for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlanTask {
    /// Prefill and decode `batch` sequences of up to `seq` tokens.
    Infer,
    /// Full training: every parameter trainable, AdamW.
    Train,
    /// LoRA on the attention projections of a frozen base.
    Lora,
}

impl FromStr for PlanTask {
    type Err = DeepSeekError;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "infer" => Ok(PlanTask::Infer),
            "train" => Ok(PlanTask::Train),
            "lora" => Ok(PlanTask::Lora),
            other => Err(DeepSeekError::Input(format!(
                "unknown task `{other}`: expected infer, train or lora"
            ))),
        }
    }
}

impl fmt::Display for PlanTask {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PlanTask::Infer => "infer",
            PlanTask::Train => "train",
            PlanTask::Lora => "lora",
        })
    }
}

/// A planning request: the run's shape and its memory options.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PlanRequest {
    /// What runs.
    pub task: PlanTask,
    /// The dtype weights (and activations) are held in.
    pub dtype: WeightDtype,
    /// Sequences per rank (a micro-batch in training).
    pub batch: usize,
    /// Tokens per sequence.
    pub seq: usize,
    /// Ranks (devices) in all.
    pub ranks: usize,
    /// Ranks sharing one copy of the routed experts (divides `ranks / pipeline_parallel`).
    pub expert_parallel: usize,
    /// Pipeline stages: contiguous blocks per stage, the embedding on the first, the head and
    /// MTP modules on the last (divides `ranks`).
    pub pipeline_parallel: usize,
    /// Recompute each block in the backward pass instead of keeping its activations.
    pub checkpoint_activations: bool,
    /// ZeRO stage 1: optimizer state (and master weights) split over the ranks holding copies.
    pub zero1: bool,
    /// LoRA rank (task `lora`).
    pub lora_rank: usize,
    /// The blocks' projections held in FP8 (an FP8 checkpoint loaded resident): E4M3 codes and
    /// 128 × 128 block scales; the rest in `dtype`. Inference only: FP8 weights do not train.
    pub fp8: bool,
}

impl PlanRequest {
    /// `task` for one sequence of `seq` tokens on one rank, f32, no options.
    pub fn new(task: PlanTask, batch: usize, seq: usize) -> Self {
        Self {
            task,
            dtype: WeightDtype::F32,
            batch,
            seq,
            ranks: 1,
            expert_parallel: 1,
            pipeline_parallel: 1,
            checkpoint_activations: false,
            zero1: false,
            lora_rank: 16,
            fp8: false,
        }
    }

    fn check(&self, cfg: &DeepSeekConfig) -> Result<()> {
        let bad = |m: String| Err(DeepSeekError::Input(m));
        if self.batch == 0 || self.seq == 0 {
            return bad("a plan needs --batch and --seq of at least 1".into());
        }
        let (pp, ep) = (self.pipeline_parallel, self.expert_parallel);
        if self.ranks == 0 || pp == 0 || !self.ranks.is_multiple_of(pp) {
            return bad(format!(
                "--pipeline-parallel {pp} must divide --ranks {} (both at least 1)",
                self.ranks
            ));
        }
        if ep == 0 || !(self.ranks / pp).is_multiple_of(ep) {
            return bad(format!(
                "--expert-parallel {ep} must divide the {} ranks of each pipeline stage",
                self.ranks / pp
            ));
        }
        if pp > cfg.num_hidden_layers {
            return bad(format!(
                "--pipeline-parallel {pp} exceeds the model's {} blocks",
                cfg.num_hidden_layers
            ));
        }
        if self.expert_parallel > 1 && !cfg.n_routed_experts.is_multiple_of(self.expert_parallel) {
            return bad(format!(
                "{} routed experts do not split over {} expert-parallel ranks",
                cfg.n_routed_experts, self.expert_parallel
            ));
        }
        if self.task == PlanTask::Infer && (self.checkpoint_activations || self.zero1) {
            return bad("--checkpoint-activations and --zero1 are training options".into());
        }
        if self.fp8 && self.task != PlanTask::Infer {
            return bad(format!(
                "--fp8 plans FP8-resident weights, which do not train: the trainers load FP8 \
                 checkpoints dequantized, so plan --task {} with --dtype bf16 (or f32)",
                self.task
            ));
        }
        if self.zero1 && self.ranks == 1 {
            return bad("--zero1 shards optimizer state over ranks: give --ranks 2 or more".into());
        }
        if self.task == PlanTask::Lora && self.lora_rank == 0 {
            return bad("--lora-rank must be at least 1".into());
        }
        if self.seq > cfg.max_position_embeddings {
            return bad(format!(
                "--seq {} exceeds the model's context of {}",
                self.seq, cfg.max_position_embeddings
            ));
        }
        Ok(())
    }
}

/// Values per bucket of the data-parallel gradient all-reduce (16 Mi, 64 MiB of f32): a
/// rank holds one bucket's flat copy and its reduced copy beyond the gradients.
pub const GRADIENT_BUCKET: usize = 1 << 24;

/// The parameters of one pipeline stage, by kind.
#[derive(Debug, Clone, Copy, Default)]
struct StageParams {
    /// Everything but the routed experts and the correction biases.
    dense: u64,
    /// The routed experts (all of them: expert parallelism divides).
    experts: u64,
    /// The routers' correction biases.
    bias: u64,
    /// The blocks' projections among `dense` (what an FP8 checkpoint stores in FP8).
    dense_linear: u64,
    /// Their 128 × 128 scale blocks.
    dense_linear_blocks: u64,
    /// The routed experts' scale blocks.
    expert_blocks: u64,
}

/// Bytes per rank, by kind (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MemoryPlan {
    /// Weights in their dtype.
    pub weights: u64,
    /// f32 gradients of the trainable parameters (with data-parallel ranks, plus two of the
    /// all-reduce's buckets).
    pub gradients: u64,
    /// AdamW moments and master weights.
    pub optimizer: u64,
    /// Saved or transient activations.
    pub activations: u64,
    /// Latent KV cache.
    pub kv_cache: u64,
}

impl MemoryPlan {
    /// The sum of the parts.
    pub fn total(&self) -> u64 {
        self.weights + self.gradients + self.optimizer + self.activations + self.kv_cache
    }

    /// Plans `request` for `cfg`.
    pub fn new(cfg: &DeepSeekConfig, request: &PlanRequest) -> Result<Self> {
        request.check(cfg)?;
        let r = request;
        let ep = r.expert_parallel as u64;
        // Parameters on this rank (the heaviest pipeline stage): the dense part, 1/E of the
        // experts, the f32 biases.
        let stage = cfg.stage_params(r.pipeline_parallel, ep);
        let (dense, experts, bias) = (stage.dense, stage.experts, stage.bias);
        let local_experts = experts / ep;
        // Ranks holding copies of a dense parameter, and of an expert.
        let replicas = (r.ranks / r.pipeline_parallel) as u64;
        let d = r.dtype.size() as u64;
        let weights = if r.fp8 {
            // Projections: a byte per weight and an f32 per block; the rest in the dtype.
            let codes = stage.dense_linear + local_experts;
            let scales = 4 * (stage.dense_linear_blocks + stage.expert_blocks / ep);
            (dense - stage.dense_linear) * d + codes + scales + bias * 4
        } else {
            (dense + local_experts) * d + bias * 4
        };

        // LoRA adapters, f32 whatever the base's dtype.
        let adapters = match r.task {
            PlanTask::Lora => cfg.lora_params(r.lora_rank),
            _ => 0,
        };
        let weights = weights + 4 * adapters;
        let (gradients, optimizer) = match r.task {
            PlanTask::Infer => (0, 0),
            PlanTask::Train => {
                let grads = (dense + local_experts + bias) * 4;
                // AdamW m and v, and an f32 master copy unless the weights are f32 already.
                let per_param = 8 + if r.dtype == WeightDtype::F32 { 0 } else { 4 };
                let (dense_share, expert_share) =
                    if r.zero1 { (replicas, replicas / ep) } else { (1, 1) };
                let state = per_param * (dense / dense_share + local_experts / expert_share);
                (grads, state)
            }
            PlanTask::Lora => {
                let share = if r.zero1 { replicas } else { 1 };
                (adapters * 4, 8 * adapters / share)
            }
        };
        let activations = match r.task {
            PlanTask::Infer => cfg.forward_peak_bytes(r.batch, r.seq, r.dtype),
            PlanTask::Train | PlanTask::Lora => {
                cfg.saved_activation_bytes(r.batch, r.seq, r.dtype, r.checkpoint_activations)
            }
        };
        let kv_cache = match r.task {
            PlanTask::Infer => {
                (r.batch * r.seq * cfg.kv_cache_bytes_per_token(r.dtype.size())) as u64
            }
            _ => 0,
        };
        // Data-parallel ranks: the gradient all-reduce sums buckets of `GRADIENT_BUCKET` values,
        // each concatenated into a flat buffer and received as a reduced copy
        // (`deepseek-train`'s `distributed::all_reduce`).
        let bucket = 4 * (GRADIENT_BUCKET as u64).min(gradients / 4);
        let gradients = if replicas > 1 { gradients + 2 * bucket } else { gradients };
        Ok(MemoryPlan { weights, gradients, optimizer, activations, kv_cache })
    }

    /// Values one token keeps for the backward pass in block `layer`: `(in the activation
    /// dtype, in f32)`. What Burn's autodiff saves for our forward pass: the inputs of every GEMM
    /// (for the weight gradient), the inputs and outputs of the norms, the RoPE inputs, the
    /// SwiGLU inputs, the gathered expert rows and their gate products; in f32, the attention
    /// core's operands and the router's.
    pub fn saved_per_token(cfg: &DeepSeekConfig, layer: usize) -> (u64, u64) {
        let d = cfg.hidden_size as u64;
        let h = cfg.num_attention_heads as u64;
        let (nope, rope, v) =
            (cfg.qk_nope_head_dim as u64, cfg.qk_rope_head_dim as u64, cfg.v_head_dim as u64);
        let kvl = cfg.kv_lora_rank as u64;
        let qk = h * (nope + rope);
        // Attention, in the activation dtype: norm input and output (2d), the q path (q-LoRA:
        // its latent twice for the norm, then the query), the latent and its norm, the expanded
        // keys and values, the rotated parts, the concatenated q and k, the output before o_proj.
        let q_path = match cfg.q_lora_rank {
            Some(r) => 2 * r as u64 + qk,
            None => qk,
        };
        let attn =
            2 * d + q_path + 2 * (kvl + rope) + h * (nope + v) + 2 * h * rope + 2 * qk + h * v;
        // The attention core and the norms' statistics run in f32: q, k, v cast (qk + qk + h·v),
        // the output (h·v).
        let attn_f32 = 2 * qk + 2 * h * v;
        let ffn = if cfg.is_moe_layer(layer) {
            let k = cfg.num_experts_per_tok as u64;
            let i = cfg.moe_intermediate_size as u64;
            let shared = cfg.n_shared_experts as u64 * i;
            // Norm (2d); per chosen expert: the gathered row, gate/up output, SiLU input and
            // output, the product, the expert output and its gated copy; the shared experts'
            // same chain.
            2 * d + k * (d + 2 * i + 3 * i + 2 * d) + (2 * shared + 3 * shared + d)
        } else {
            let i = cfg.intermediate_size as u64;
            2 * d + 2 * i + 3 * i + d
        };
        // The router in f32: its input, logits, scores and the biased scores.
        let router_f32 =
            if cfg.is_moe_layer(layer) { d + 3 * cfg.n_routed_experts as u64 } else { 0 };
        (attn + ffn, attn_f32 + router_f32)
    }
}

impl DeepSeekConfig {
    /// `(dense, routed experts, correction biases)` parameters of the heaviest of `pp` pipeline
    /// stages (by bytes with the experts split `ep` ways): contiguous runs of `⌈L/pp⌉` blocks,
    /// the embedding on the first stage, the final norm, head and MTP modules on the last, with
    /// a copy of the embedding there when there are MTP modules (as `deepseek-train` lays
    /// stages out). With one stage, every parameter of the model.
    fn stage_params(&self, pp: usize, ep: u64) -> StageParams {
        let (d, v) = (self.hidden_size as u64, self.vocab_size as u64);
        let e = self.n_routed_experts as u64;
        let expert = 3 * d * self.moe_intermediate_size as u64;
        // Block `l` (MTP blocks: with enorm, hnorm, head norm, eh_proj).
        let block = |l: usize| {
            let (total, _) = self.layer_params(l);
            let moe = self.is_moe_layer(l);
            let experts = if moe { e * expert } else { 0 };
            let bias = if moe && self.topk_method.has_bias() { e } else { 0 };
            let mtp = if l >= self.num_hidden_layers { self.mtp_extra_params() } else { 0 };
            // The projections, and their 128 × 128 scale blocks, routed experts apart.
            let (mut linear, mut blocks, mut expert_blocks) = (0u64, 0u64, 0u64);
            for (k, [rows, cols]) in self.layer_linears(l).into_iter().enumerate() {
                let n = (rows.div_ceil(128) * cols.div_ceil(128)) as u64;
                // The routed experts' matrices follow the four attention projections (five
                // with q-LoRA).
                let attention = if self.q_lora_rank.is_some() { 5 } else { 4 };
                let routed = moe && k >= attention && k < attention + 3 * e as usize;
                if routed {
                    expert_blocks += n;
                } else {
                    linear += (rows * cols) as u64;
                    blocks += n;
                }
            }
            StageParams {
                dense: total - experts - bias + mtp,
                experts,
                bias,
                dense_linear: linear,
                dense_linear_blocks: blocks,
                expert_blocks,
            }
        };
        let add = |a: StageParams, b: StageParams| StageParams {
            dense: a.dense + b.dense,
            experts: a.experts + b.experts,
            bias: a.bias + b.bias,
            dense_linear: a.dense_linear + b.dense_linear,
            dense_linear_blocks: a.dense_linear_blocks + b.dense_linear_blocks,
            expert_blocks: a.expert_blocks + b.expert_blocks,
        };
        let per_stage = self.num_hidden_layers.div_ceil(pp);
        let last = pp - 1;
        (0..pp)
            .map(|s| {
                let layers = s * per_stage..((s + 1) * per_stage).min(self.num_hidden_layers);
                let mut p = layers.map(block).fold(StageParams::default(), add);
                if s == 0 {
                    p.dense += v * d;
                }
                if s == last {
                    p.dense += v * d + d;
                    let mtp = self.num_hidden_layers
                        ..self.num_hidden_layers + self.num_nextn_predict_layers;
                    p = mtp.map(block).fold(p, add);
                    if pp > 1 && self.num_nextn_predict_layers > 0 {
                        p.dense += v * d;
                    }
                }
                p
            })
            .max_by_key(|p| p.dense + p.experts / ep)
            .expect("at least one stage")
    }

    /// Adapter parameters of LoRA rank `rank` on every attention projection (target `attn`):
    /// `r·(in + out)` per projection.
    pub fn lora_params(&self, rank: usize) -> u64 {
        let d = self.hidden_size;
        let h = self.num_attention_heads;
        let mut shapes = match self.q_lora_rank {
            Some(q) => vec![[d, q], [q, h * self.qk_head_dim()]],
            None => vec![[d, h * self.qk_head_dim()]],
        };
        shapes.push([d, self.kv_lora_rank + self.qk_rope_head_dim]);
        shapes.push([self.kv_lora_rank, h * (self.qk_nope_head_dim + self.v_head_dim)]);
        shapes.push([h * self.v_head_dim, d]);
        let per_block: usize = shapes.iter().map(|[i, o]| rank * (i + o)).sum();
        (per_block * (self.num_hidden_layers + self.num_nextn_predict_layers)) as u64
    }

    /// Bytes of the tensors of [`MemoryPlan::saved_per_token`] for `tokens` tokens in block
    /// `layer`, activations in `dtype`.
    fn block_activation_bytes(&self, layer: usize, tokens: u64, dtype: WeightDtype) -> u64 {
        let (act, f32s) = MemoryPlan::saved_per_token(self, layer);
        tokens * (act * dtype.size() as u64 + f32s * 4)
    }

    /// The attention probabilities and the scores before the softmax, `[B, H, S, S]` each in
    /// f32, of one block.
    fn attention_probs_bytes(&self, batch: usize, seq: usize) -> u64 {
        2 * 4 * (batch * self.num_attention_heads * seq * seq) as u64
    }

    /// Activations kept for the backward pass of `batch × seq` tokens (see the module docs).
    fn saved_activation_bytes(
        &self,
        batch: usize,
        seq: usize,
        dtype: WeightDtype,
        checkpoint: bool,
    ) -> u64 {
        let tokens = (batch * seq) as u64;
        let dt = dtype.size() as u64;
        let blocks = self.num_hidden_layers + self.num_nextn_predict_layers;
        let block_bytes = |l: usize| {
            self.block_activation_bytes(l, tokens, dtype) + self.attention_probs_bytes(batch, seq)
        };
        let per_block: u64 = (0..blocks).map(block_bytes).sum();
        let largest = (0..blocks).map(block_bytes).max().unwrap_or(0);
        let kept = if checkpoint {
            // Each block's input, and one block recomputed at a time.
            blocks as u64 * tokens * self.hidden_size as u64 * dt + largest
        } else {
            per_block
        };
        // The head: the final norm, the logits in f32, their log-softmax and its gradient
        // buffer, for the main model and each MTP module.
        let heads = 1 + self.num_nextn_predict_layers as u64;
        let head =
            heads * tokens * (2 * self.hidden_size as u64 * dt + 3 * 4 * self.vocab_size as u64);
        // The list of saved tensors is what our forward keeps by name; Burn's graph keeps more
        // (contiguous copies after transposes and narrows, the casts around the f32 islands, the
        // MoE gather and scatter partial sums), and the backward pass allocates gradients of the
        // same sizes at its peak. Measured on Flex (docs/memory.md: the `small` preset, 8 × 128
        // and 8 × 512 tokens) the activations at the peak are 1.45 times the list.
        (kept + head) * 29 / 20
    }

    /// The largest transient of one forward pass over `batch × seq` tokens without gradients:
    /// the residual stream, the widest block intermediate and the f32 logits.
    fn forward_peak_bytes(&self, batch: usize, seq: usize, dtype: WeightDtype) -> u64 {
        let tokens = (batch * seq) as u64;
        let dt = dtype.size() as u64;
        let blocks = self.num_hidden_layers + self.num_nextn_predict_layers;
        let widest = (0..blocks)
            .map(|l| {
                // Without autodiff only about a third of a block's tensors are alive at once.
                self.block_activation_bytes(l, tokens, dtype) / 3
                    + self.attention_probs_bytes(batch, seq)
            })
            .max()
            .unwrap_or(0);
        let logits = 2 * tokens * 4 * self.vocab_size as u64;
        2 * tokens * self.hidden_size as u64 * dt + widest + logits
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inference_weights_are_the_parameter_bytes_in_the_dtype() {
        let cfg = DeepSeekConfig::v3_671b();
        let bias = cfg.correction_bias_params();
        let mut r = PlanRequest::new(PlanTask::Infer, 1, 4096);
        r.dtype = WeightDtype::Bf16;
        let plan = MemoryPlan::new(&cfg, &r).unwrap();
        // weight_bytes_bf16 counts the biases at 2 bytes; they are held in f32.
        assert_eq!(plan.weights, cfg.weight_bytes_bf16() + 2 * bias);
        assert_eq!(plan.kv_cache, 4096 * 70_272);
        assert_eq!(plan.gradients + plan.optimizer, 0);
    }

    #[test]
    fn expert_parallelism_splits_only_the_experts_and_zero1_splits_the_state() {
        let cfg = DeepSeekConfig::v2_lite_16b();
        let mut one = PlanRequest::new(PlanTask::Train, 1, 512);
        one.dtype = WeightDtype::Bf16;
        let single = MemoryPlan::new(&cfg, &one).unwrap();
        let eight = PlanRequest { ranks: 8, expert_parallel: 8, ..one };
        let spread = MemoryPlan::new(&cfg, &eight).unwrap();
        let experts = cfg.routed_expert_params();
        assert_eq!(single.weights - spread.weights, 2 * (experts - experts / 8));
        // bf16 weights: AdamW's two moments and the f32 master copy, 12 bytes a parameter.
        assert_eq!(single.optimizer, 12 * (single.weights - 4 * cfg.correction_bias_params()) / 2);
        let zero = MemoryPlan::new(&cfg, &PlanRequest { zero1: true, ..eight }).unwrap();
        // The dense part is split 8 ways, the experts (one copy each) not at all.
        let dense = (cfg.param_count().total + cfg.param_count().mtp
            - experts
            - cfg.correction_bias_params()) as f64;
        let saved = (spread.optimizer - zero.optimizer) as f64;
        assert!((saved - 12.0 * dense * 7.0 / 8.0).abs() < 12.0 * 8.0, "{saved} {dense}");
    }

    #[test]
    fn one_stage_holds_every_parameter_and_stages_split_the_blocks() {
        for cfg in [DeepSeekConfig::v3_671b(), DeepSeekConfig::small()] {
            let p = cfg.param_count();
            let s = cfg.stage_params(1, 1);
            let (dense, experts, bias) = (s.dense, s.experts, s.bias);
            assert_eq!(dense + experts + bias, p.total + p.mtp);
            assert_eq!((experts, bias), (cfg.routed_expert_params(), cfg.correction_bias_params()));
        }
        let cfg = DeepSeekConfig::v3_671b();
        let whole = MemoryPlan::new(&cfg, &PlanRequest::new(PlanTask::Train, 1, 4096)).unwrap();
        let staged = PlanRequest {
            ranks: 16,
            pipeline_parallel: 16,
            ..PlanRequest::new(PlanTask::Train, 1, 4096)
        };
        let staged = MemoryPlan::new(&cfg, &staged).unwrap();
        // 61 blocks in 16 stages of at most 4 (the last also holds the head, the MTP block and
        // an embedding copy): about 4/61 of the model plus that.
        let ratio = staged.weights as f64 / whole.weights as f64;
        assert!((4.0 / 61.0..6.5 / 61.0).contains(&ratio), "{ratio}");
    }

    #[test]
    fn checkpointing_keeps_less_and_lora_trains_few_parameters() {
        let cfg = DeepSeekConfig::small();
        let full = MemoryPlan::new(&cfg, &PlanRequest::new(PlanTask::Train, 8, 1024)).unwrap();
        let ckpt = PlanRequest {
            checkpoint_activations: true,
            ..PlanRequest::new(PlanTask::Train, 8, 1024)
        };
        let ckpt = MemoryPlan::new(&cfg, &ckpt).unwrap();
        assert!(ckpt.activations * 2 < full.activations, "{ckpt:?} {full:?}");
        let lora = MemoryPlan::new(&cfg, &PlanRequest::new(PlanTask::Lora, 8, 1024)).unwrap();
        assert_eq!(lora.gradients, 4 * cfg.lora_params(16));
        assert!(lora.gradients * 20 < full.gradients);
    }

    #[test]
    fn fp8_resident_inference_holds_the_checkpoints_fp8_bytes() {
        // In bf16, FP8-resident weights are the released FP8 checkpoint's bytes (a separate
        // count, over the checkpoint's tensors): projections a byte each plus a scale per block.
        for cfg in [DeepSeekConfig::v3_671b(), DeepSeekConfig::v2_lite_16b()] {
            let mut r = PlanRequest::new(PlanTask::Infer, 1, 16);
            r.dtype = WeightDtype::Bf16;
            r.fp8 = true;
            let plan = MemoryPlan::new(&cfg, &r).unwrap();
            assert_eq!(plan.weights, cfg.weight_bytes_fp8());
            // Expert parallelism divides the experts' codes and scales.
            r.ranks = 8;
            r.expert_parallel = 8;
            let split = MemoryPlan::new(&cfg, &r).unwrap();
            assert!(split.weights < plan.weights / 2, "{} of {}", split.weights, plan.weights);
        }
        let mut r = PlanRequest::new(PlanTask::Train, 1, 16);
        r.fp8 = true;
        let err = MemoryPlan::new(&DeepSeekConfig::v3_671b(), &r).unwrap_err().to_string();
        assert!(err.contains("do not train"), "{err}");
    }

    #[test]
    fn bad_requests_are_clear_errors() {
        let cfg = DeepSeekConfig::small();
        let base = PlanRequest::new(PlanTask::Train, 8, 128);
        let cases = [
            (PlanRequest { batch: 0, ..base }, "--batch"),
            (PlanRequest { ranks: 3, expert_parallel: 2, ..base }, "must divide"),
            (PlanRequest { ranks: 4, pipeline_parallel: 3, ..base }, "must divide --ranks"),
            (PlanRequest { ranks: 8, pipeline_parallel: 8, ..base }, "exceeds the model's 4"),
            (PlanRequest { zero1: true, ..base }, "--ranks 2"),
            (PlanRequest { seq: 1 << 30, ..base }, "context"),
            (
                PlanRequest { task: PlanTask::Infer, zero1: true, ranks: 2, ..base },
                "training options",
            ),
        ];
        for (request, says) in cases {
            let err = MemoryPlan::new(&cfg, &request).unwrap_err().to_string();
            assert!(err.contains(says), "{request:?}: {err}");
        }
        assert!("fly"
            .parse::<PlanTask>()
            .unwrap_err()
            .to_string()
            .contains("infer, train or lora"));
    }
}
