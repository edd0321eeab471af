//! The MoE router (DeepSeek-V3 §2.1.2; V2 §2.2): affinities, group-limited top-k, gate weights.
//!
//! V3 (`noaux_tc`): `s = sigmoid(x·W_gateᵀ)`; the per-expert correction bias `b` is added **only
//! to choose** experts (`s + b`); groups are scored by the sum of their top-2 biased scores and
//! only the best `topk_group` groups stay eligible (the others are set to −∞, never 0: a 0 can
//! beat negative biased scores and pick an expert from a dropped group); the gate weights are the
//! unbiased `s` of the chosen experts, normalized when `norm_topk_prob`, times
//! `routed_scaling_factor`. V2 uses softmax affinities, no bias and (for `group_limited_greedy`)
//! the group max. Logits and scores are f32.
//!
//! Legend: T tokens, D model dim, E routed experts, K experts per token, G groups.

use burn::config::Config;
use burn::module::{Initializer, Module, Param};
use burn::tensor::activation::{sigmoid, softmax};
use burn::tensor::{backend::Backend, FloatDType, Int, Tensor};

use crate::config::{ScoringFunc, TopkMethod};
use crate::policy::ExecutionPolicy;

/// Builds a [`Router`].
#[derive(Config, Debug)]
pub struct RouterConfig {
    /// Model width `D`.
    pub d_model: usize,
    /// Routed experts `E`.
    pub n_experts: usize,
    /// Experts per token `K`.
    pub top_k: usize,
    /// Expert groups `G`.
    pub n_group: usize,
    /// Groups kept per token.
    pub topk_group: usize,
    /// Affinity function.
    pub scoring_func: ScoringFunc,
    /// Selection rule (decides whether a bias exists and how groups are scored).
    pub topk_method: TopkMethod,
    /// Normalize the chosen weights to sum to one.
    pub norm_topk_prob: bool,
    /// Multiplier on the gate weights.
    pub routed_scaling_factor: f64,
}

impl RouterConfig {
    /// A fresh router: weight drawn lazily, selection bias zero where the method has one.
    pub fn init<B: Backend>(&self, device: &B::Device) -> Router<B> {
        // Lazy like Burn's own layers: loading a checkpoint replaces it before it is ever drawn.
        let bound = (1.0 / self.d_model as f64).sqrt();
        let weight = Initializer::Uniform { min: -bound, max: bound }
            .init([self.n_experts, self.d_model], device);
        // The bias is state of the balancing algorithm, not a learned parameter: no gradient.
        let bias = self.topk_method.has_bias().then(|| {
            Param::from_tensor(Tensor::zeros([self.n_experts], device)).set_require_grad(false)
        });
        Router {
            weight,
            e_score_correction_bias: bias,
            top_k: self.top_k,
            n_group: self.n_group,
            topk_group: self.topk_group,
            scoring_func: self.scoring_func,
            topk_method: self.topk_method,
            norm_topk_prob: self.norm_topk_prob,
            routed_scaling_factor: self.routed_scaling_factor,
        }
    }
}

/// Gate of one MoE layer. Its weight is stored `[E, D]` as in the checkpoints.
#[derive(Module, Debug)]
pub struct Router<B: Backend> {
    /// `[E, D]`
    pub weight: Param<Tensor<B, 2>>,
    /// `[E]` selection bias of auxiliary-loss-free balancing (f32; updated outside the model).
    pub e_score_correction_bias: Option<Param<Tensor<B, 1>>>,
    /// Experts per token `K`.
    #[module(skip)]
    pub top_k: usize,
    /// Expert groups `G`.
    #[module(skip)]
    pub n_group: usize,
    /// Groups kept per token.
    #[module(skip)]
    pub topk_group: usize,
    /// Affinity function.
    #[module(skip)]
    pub scoring_func: ScoringFunc,
    /// Selection rule.
    #[module(skip)]
    pub topk_method: TopkMethod,
    /// Normalize the chosen weights to sum to one.
    #[module(skip)]
    pub norm_topk_prob: bool,
    /// Multiplier on the gate weights.
    #[module(skip)]
    pub routed_scaling_factor: f64,
}

/// The routing decision for a batch of tokens.
#[derive(Debug, Clone)]
pub struct Routing<B: Backend> {
    /// `[T, K]` chosen experts, in order of decreasing biased score.
    pub indices: Tensor<B, 2, Int>,
    /// `[T, K]` gate weights (f32), aligned with `indices`.
    pub weights: Tensor<B, 2>,
    /// `[T, E]` unbiased affinities (f32): the sequence-wise balance loss needs them.
    pub scores: Tensor<B, 2>,
    /// `[E]` tokens routed to each expert in this batch: the bias update needs them.
    pub counts: Tensor<B, 1, Int>,
}

impl<B: Backend> Router<B> {
    /// Routes the tokens `x`, node-limited when `policy` says so.
    ///
    /// # Shapes
    /// `x`: `[T, D]`.
    pub fn forward(&self, x: Tensor<B, 2>, policy: &ExecutionPolicy) -> Routing<B> {
        self.route(x, policy, None)
    }

    /// [`Router::forward`], or with `replay` the experts given there instead of the ones the
    /// scores choose (routing replay: a training forward routes each token as its rollout
    /// did). The gate weights are still this router's own affinities of those experts, so the
    /// gate keeps its gradient.
    ///
    /// # Shapes
    /// `x`: `[T, D]`, `replay`: `[T, K]`.
    pub fn route(
        &self,
        x: Tensor<B, 2>,
        policy: &ExecutionPolicy,
        replay: Option<Tensor<B, 2, Int>>,
    ) -> Routing<B> {
        let [tokens, _] = x.dims();
        let n_experts = self.weight.dims()[0];
        let logits =
            x.cast(FloatDType::F32).matmul(self.weight.val().cast(FloatDType::F32).transpose()); // [T, E]
        let scores = match self.scoring_func {
            ScoringFunc::Sigmoid => sigmoid(logits),
            ScoringFunc::Softmax => softmax(logits, 1),
        };
        let mut choice = match &self.e_score_correction_bias {
            Some(bias) => scores.clone() + bias.val().cast(FloatDType::F32).unsqueeze::<2>(), // [T, E]
            None => scores.clone(),
        };
        if self.n_group > 1 && self.topk_method != TopkMethod::Greedy {
            let score = match self.topk_method {
                TopkMethod::NoAuxTc => BlockScore::TopSum(2),
                _ => BlockScore::Max,
            };
            choice = mask_blocks(choice, self.n_group, self.topk_group, score);
        }
        if let Some(limit) = policy.node_limit {
            let per_node = n_experts / limit.nodes;
            choice = mask_blocks(
                choice,
                limit.nodes,
                limit.max_nodes,
                BlockScore::TopSum(limit.per_node(self.top_k, per_node)),
            );
        }
        let indices = match replay {
            Some(given) => {
                assert_eq!(given.dims(), [tokens, self.top_k], "replayed routing of [T, K]");
                given
            }
            None => top_k(choice, self.top_k).1, // [T, K]
        };
        let mut weights = scores.clone().gather(1, indices.clone()); // [T, K]
        if self.norm_topk_prob && self.top_k > 1 {
            let denom = weights.clone().sum_dim(1).add_scalar(1e-20); // [T, 1]
            weights = weights / denom;
        }
        let weights = weights.mul_scalar(self.routed_scaling_factor);
        let device = indices.device();
        let flat = indices.clone().reshape([tokens * self.top_k]); // [T·K]
        let counts = Tensor::<B, 1, Int>::zeros([n_experts], &device).scatter(
            0,
            flat,
            Tensor::ones([tokens * self.top_k], &device),
            burn::tensor::IndexingUpdateOp::Add,
        );
        Routing { indices, weights, scores, counts }
    }
}

/// How a block of experts (a group, or a node) is scored for one token.
#[derive(Debug, Clone, Copy)]
enum BlockScore {
    /// The sum of its `m` best scores (V3 groups: `m = 2`; nodes: `⌈K/M⌉`).
    TopSum(usize),
    /// Its best score (V2 `group_limited_greedy`).
    Max,
}

/// Splits the experts into `blocks` contiguous blocks, keeps the `keep` best blocks per token and
/// sets the scores of the others to −∞.
///
/// # Shapes
/// `choice`: `[T, E]` → `[T, E]`.
fn mask_blocks<B: Backend>(
    choice: Tensor<B, 2>,
    blocks: usize,
    keep: usize,
    score: BlockScore,
) -> Tensor<B, 2> {
    let [tokens, n_experts] = choice.dims();
    if keep >= blocks {
        return choice;
    }
    let per_block = n_experts / blocks;
    let grouped = choice.clone().reshape([tokens, blocks, per_block]); // [T, G, E/G]
    let block_score = match score {
        BlockScore::TopSum(m) => {
            grouped.sort_descending(2).narrow(2, 0, m.min(per_block)).sum_dim(2)
        } // [T, G, 1]
        BlockScore::Max => grouped.max_dim(2), // [T, G, 1]
    }
    .reshape([tokens, blocks]); // [T, G]
    let (_, kept) = top_k(block_score, keep); // [T, keep]
    let device = choice.device();
    let dropped = Tensor::<B, 2, Int>::zeros([tokens, blocks], &device)
        // Indices are distinct, so adding ones marks each kept block once.
        .scatter(
            1,
            kept,
            Tensor::ones([tokens, keep], &device),
            burn::tensor::IndexingUpdateOp::Add,
        )
        .equal_elem(0) // [T, G] true where dropped
        .reshape([tokens, blocks, 1])
        .expand([tokens, blocks, per_block])
        .reshape([tokens, n_experts]); // [T, E]
    choice.mask_fill(dropped, f32::NEG_INFINITY)
}

/// The `k` largest entries of each row and their indices, in decreasing order. Burn 0.21's
/// `topk` requires `k` strictly below the row length, so `k == n` goes through a full sort.
///
/// # Shapes
/// `x`: `[rows, n]` → `([rows, k], [rows, k])`.
fn top_k<B: Backend>(x: Tensor<B, 2>, k: usize) -> (Tensor<B, 2>, Tensor<B, 2, Int>) {
    let [_, n] = x.dims();
    if k < n {
        x.topk_with_indices(k, 1)
    } else {
        x.sort_descending_with_indices(1)
    }
}
