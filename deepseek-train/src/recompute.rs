//! Activation checkpointing by per-block recomputation (`--checkpoint-activations`; Chen et al.
//! 2016, "Training Deep Nets with Sublinear Memory Cost"). The plain step keeps every saved
//! tensor of every block's autodiff graph until the backward pass; this step keeps only the
//! residual stream between blocks and rebuilds one block's graph at a time.
//!
//! One micro-batch, with `x₀` the embeddings and `x_{l+1} = block_l(x_l)`:
//! 1. **Forward without a graph**: the blocks run on an untracked copy of the model (the same
//!    code and kernels as the tracked pass, so the same values), keeping `x₀ … x_L`. The expert
//!    loads and balance terms of the main blocks are read here, once.
//! 2. **Head**: from a fresh leaf `x_L`, the final norm, head, MTP modules (with their own
//!    embedding lookup) and the objective `main + λ·mtp + MTP blocks' balance`; its backward
//!    gives the head's and MTP modules' gradients and `g_L = ∂objective/∂x_L`.
//! 3. **Blocks, last to first**: block `l` is recomputed from a fresh leaf `x_l`, and
//!    `Σ block_l(x_l)·g_{l+1} + balance_l` is differentiated: its gradient in the block's
//!    parameters is theirs in the full objective (the chain rule, one block at a time), and its
//!    gradient in `x_l` is `g_l`. The recomputation's routing is discarded, so the bias update's
//!    token counts come from step 1 alone: nothing is counted twice.
//! 4. **Embedding**: `Σ embed(ids)·g₀` adds the embedding's gradient from the main path.
//!
//! Memory: the `L + 1` residual tensors `[batch, seq, d]` and one block's graph, instead of
//! every block's graph. Cost: each main block runs forward twice. The result equals the plain
//! step's up to the order of floating-point sums. Randomness inside a block (LoRA dropout)
//! would draw other masks in the recomputation, so the trainer refuses that combination.

use burn::module::Module;
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::Tensor;
use deepseek_core::DeepSeekModel;

use crate::error::{Result, TrainError};
use crate::loss::{objective_total, output_objective, routing_terms, BatchLoss, LossWeights};
use crate::source::Batch;

/// The objective of `batch` ([`crate::loss::batch_objective`]) and the gradients of
/// `objective / shares` in the parameters of `model`, block by block. The returned terms are
/// values (no graph); `total` is unscaled. Fails only when an expert-parallel peer is gone.
///
/// # Shapes
/// `batch.ids`: `[batch, seq + 1]`.
pub fn checkpointed_gradients<AB: AutodiffBackend>(
    model: &DeepSeekModel<AB>,
    batch: Batch<AB>,
    weights: LossWeights,
    shares: f64,
) -> Result<(BatchLoss<AB>, GradientsParams)> {
    let [rows, len] = batch.ids.dims();
    let inputs = batch.ids.clone().narrow(1, 0, len - 1); // [b, s]
    let (real, packing) = (batch.real.as_ref(), batch.segments.as_ref().map(|s| &s.inputs));
    let mut grads = GradientsAccumulator::<DeepSeekModel<AB>>::new();

    // 1. The residual stream without a graph; the main blocks' loads and balance values.
    let untracked = model.clone().no_grad();
    let mut stream = vec![untracked.embed_tokens.forward(inputs.clone())]; // x₀: [b, s, d]
    let (mut balance, mut counts) = (None::<Tensor<AB, 1>>, Vec::new());
    for index in 0..model.layers.len() {
        let x = stream.last().expect("x₀").clone();
        let (out, routing) = untracked.block(index, x, packing);
        let (b, c) = routing_terms(routing.into_iter().collect(), rows, real, weights);
        balance = sum(balance, b);
        counts.extend(c);
        stream.push(out);
    }
    drop(untracked);

    // 2. The head and the MTP modules, from a fresh leaf x_L.
    let x = leaf(stream.pop().expect("x_L"));
    let embeddings = model.embed_tokens.forward(inputs.clone());
    let out = model.finish(x.clone(), embeddings, packing, !model.mtp.is_empty());
    let head = output_objective(out, &batch, weights); // the MTP blocks' balance and loads
    barrier(model)?;
    let backward = head.total.div_scalar(shares).backward();
    let mut g = x.grad(&backward).expect("the head depends on its input");
    grads.accumulate(model, GradientsParams::from_grads(backward, model));
    balance = sum(balance, head.balance.map(Tensor::detach));
    counts.extend(head.counts);

    // 3. Each block again, last to first.
    for index in (0..model.layers.len()).rev() {
        let x = leaf(stream.pop().expect("x_l"));
        let (out, routing) = model.block(index, x.clone(), packing);
        let (b, _) = routing_terms(routing.into_iter().collect(), rows, real, weights);
        let mut objective = (out * Tensor::from_inner(g)).sum();
        if let Some(b) = b {
            objective = objective + b.div_scalar(shares);
        }
        barrier(model)?;
        let backward = objective.backward();
        g = x.grad(&backward).expect("a block depends on its input");
        grads.accumulate(model, GradientsParams::from_grads(backward, &model.layers[index]));
    }

    // 4. The embedding's gradient from the main path.
    if model.embed_tokens.weight.is_require_grad() {
        let embeddings = model.embed_tokens.forward(inputs); // [b, s, d]
        let backward = (embeddings * Tensor::from_inner(g)).sum().backward();
        grads.accumulate(model, GradientsParams::from_grads(backward, &model.embed_tokens));
    }

    let (main, mtp) = (head.main.detach(), head.mtp.map(Tensor::detach));
    let total = objective_total(&main, mtp.as_ref(), balance.as_ref(), weights);
    Ok((BatchLoss { total, main, mtp, balance, counts }, grads.grads()))
}

/// A new autodiff leaf holding `x`'s values.
fn leaf<AB: AutodiffBackend, const D: usize>(x: Tensor<AB, D>) -> Tensor<AB, D> {
    Tensor::from_inner(x.inner()).require_grad()
}

fn sum<AB: AutodiffBackend>(
    a: Option<Tensor<AB, 1>>,
    b: Option<Tensor<AB, 1>>,
) -> Option<Tensor<AB, 1>> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a + b),
        (a, b) => a.or(b),
    }
}

/// Under expert parallelism the ranks of a group meet before each backward: Burn holds a
/// graph's lock for a whole backward, all-to-alls included, and a thread ending a backward locks
/// every graph of the process to clean up; unaligned, a rank in that clean-up could wait on a
/// peer that waits on it in an all-to-all (see `pipeline::run`).
fn barrier<AB: AutodiffBackend>(model: &DeepSeekModel<AB>) -> Result<()> {
    let Some(parallel) = &model.policy().expert_parallel else { return Ok(()) };
    let exchange = parallel.exchange();
    exchange.all_reduce_sum(&mut [0.0]).map_err(|e| TrainError::Rank {
        rank: exchange.rank(),
        problem: format!("before the backward of a recomputed block: {e}"),
    })
}
