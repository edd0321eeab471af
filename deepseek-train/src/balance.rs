//! Load balancing of the MoE routers (DeepSeek-V3 §2.1.2; Wang et al. 2024, arXiv 2408.15664):
//! the auxiliary-loss-free bias update, the MaxVio metric, and the sequence-wise balance loss.
//!
//! Notation: T tokens of one sequence, E routed experts, K experts per token.

use burn::module::Param;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use deepseek_core::block::FeedForward;
use deepseek_core::DeepSeekModel;

/// `b_i ← b_i + γ · sign(mean(c) − c_i)`: experts that received fewer tokens than average become
/// more attractive for selection, busier ones less. `counts` is the step's (global) token count
/// per expert.
pub fn update_bias(bias: &mut [f32], counts: &[u64], gamma: f32) {
    assert_eq!(bias.len(), counts.len(), "one count per expert");
    let mean = counts.iter().sum::<u64>() as f64 / counts.len() as f64;
    for (b, &c) in bias.iter_mut().zip(counts) {
        let gap = mean - c as f64;
        // sign(0) = 0: an expert exactly at the mean keeps its bias.
        *b += if gap > 0.0 {
            gamma
        } else if gap < 0.0 {
            -gamma
        } else {
            0.0
        };
    }
}

/// Applies [`update_bias`] to every MoE block of `model` (main blocks, then MTP blocks, the
/// order of `ModelOutput::routing`). The bias stays a non-trainable parameter.
pub fn update_model_biases<B: Backend>(
    model: &mut DeepSeekModel<B>,
    counts: &[Vec<u64>],
    gamma: f32,
) {
    update_block_biases(model.blocks_mut(), counts, gamma);
}

/// [`update_model_biases`] over some of a model's blocks (a pipeline stage's), `counts[i]`
/// for the `i`-th MoE block among them.
pub fn update_block_biases<'a, B: Backend>(
    blocks: impl Iterator<Item = &'a mut deepseek_core::block::DecoderLayer<B>>,
    counts: &[Vec<u64>],
    gamma: f32,
) {
    let mut counts = counts.iter();
    for block in blocks {
        let FeedForward::Moe(moe) = &mut block.mlp else { continue };
        let Some(bias) = moe.gate.e_score_correction_bias.as_mut() else { continue };
        let layer_counts = counts.next().expect("one count vector per MoE block");
        let device = bias.device();
        let mut values: Vec<f32> =
            bias.val().into_data().convert::<f32>().into_vec().expect("f32 bias");
        update_bias(&mut values, layer_counts, gamma);
        let n = values.len();
        *bias = Param::from_tensor(Tensor::from_data(TensorData::new(values, [n]), &device))
            .set_require_grad(false);
    }
}

/// MaxVio = (max load − mean load) / mean load.
pub fn max_vio(counts: &[u64]) -> f64 {
    let mean = counts.iter().sum::<u64>() as f64 / counts.len() as f64;
    if mean == 0.0 {
        return 0.0;
    }
    (*counts.iter().max().expect("at least one expert") as f64 - mean) / mean
}

/// Sequence-wise balance loss `α · Σ_i f_i · P_i` of one sequence, with
/// `f_i = E/(K·T) · #{t : i ∈ topk(t)}` and `P_i = mean_t s'_{i,t}`, `s' = s / Σ_j s_j`.
/// Differentiable in `scores`; `indices` only count.
///
/// # Shapes
/// `scores`: `[T, E]` (unbiased affinities), `indices`: `[T, K]` → `[1]`.
pub fn sequence_balance_loss<B: Backend>(
    scores: Tensor<B, 2>,
    indices: Tensor<B, 2, Int>,
    alpha: f64,
) -> Tensor<B, 1> {
    grouped_balance_loss(scores, indices, 1, alpha)
}

/// [`sequence_balance_loss`] of each of `groups` equal runs of consecutive tokens (the sequences
/// of a batch), averaged over the groups. With `groups = 1` over a whole batch this is the
/// classic batch-wise auxiliary balance loss (DeepSeek-V2 §2.2.3, the `aux-loss` baseline).
///
/// # Shapes
/// `scores`: `[T, E]`, `indices`: `[T, K]`, `T` divisible by `groups` → `[1]`.
pub fn grouped_balance_loss<B: Backend>(
    scores: Tensor<B, 2>,
    indices: Tensor<B, 2, Int>,
    groups: usize,
    alpha: f64,
) -> Tensor<B, 1> {
    let [tokens, experts] = scores.dims();
    let [_, k] = indices.dims();
    assert!(
        groups > 0 && tokens % groups == 0,
        "{tokens} tokens do not split into {groups} groups"
    );
    let per = tokens / groups;
    let device = scores.device();
    let chosen = Tensor::<B, 2>::zeros([groups, experts], &device).scatter(
        1,
        indices.reshape([groups, per * k]),
        Tensor::ones([groups, per * k], &device),
        burn::tensor::IndexingUpdateOp::Add,
    ); // [G, E]
    let f = chosen.mul_scalar(experts as f64 / (k * per) as f64); // [G, E]
    let normalized = scores.clone() / scores.sum_dim(1); // [T, E]
    let p = normalized.reshape([groups, per, experts]).mean_dim(1).reshape([groups, experts]); // [G, E]
    (f * p).sum_dim(1).mean().mul_scalar(alpha)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::{Autodiff, Flex};

    #[test]
    fn bias_moves_toward_balance_by_gamma() {
        let mut bias = vec![0.0f32; 4];
        update_bias(&mut bias, &[10, 2, 4, 4], 0.001); // mean 5
        assert_eq!(bias, vec![-0.001, 0.001, 0.001, 0.001]);
        let mut bias = vec![0.5f32; 2];
        update_bias(&mut bias, &[3, 3], 0.1); // balanced: unchanged
        assert_eq!(bias, vec![0.5, 0.5]);
    }

    #[test]
    fn model_biases_follow_the_counts_of_their_own_block() {
        let device = Default::default();
        let mut model = deepseek_core::DeepSeekConfig::tiny().init::<Flex>(&device);
        // tiny: blocks 1 and 2 are MoE, plus the MTP block: three count vectors.
        let counts = vec![vec![9, 1, 1, 1, 1, 1, 1, 1], vec![2; 8], vec![0, 0, 0, 0, 0, 0, 0, 16]];
        update_model_biases(&mut model, &counts, 0.5);
        let bias = |l: usize| -> Vec<f32> {
            let block = if l < model.layers.len() { &model.layers[l] } else { &model.mtp[0].block };
            let FeedForward::Moe(moe) = &block.mlp else { panic!("MoE block") };
            let b = moe.gate.e_score_correction_bias.as_ref().unwrap();
            assert!(!b.is_require_grad(), "the bias is not trainable");
            b.val().into_data().convert::<f32>().into_vec().unwrap()
        };
        assert_eq!(bias(1), vec![-0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5]);
        assert_eq!(bias(2), vec![0.0; 8]);
        assert_eq!(bias(3), vec![0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, -0.5]);
    }

    #[test]
    fn max_vio_of_known_loads() {
        assert_eq!(max_vio(&[10, 2, 4, 4]), 1.0); // (10 − 5) / 5
        assert_eq!(max_vio(&[3, 3, 3]), 0.0);
    }

    #[test]
    fn sequence_balance_loss_matches_scalar_formula_and_has_gradients() {
        type B = Autodiff<Flex>;
        let device = Default::default();
        let s = [[0.9f32, 0.2, 0.4, 0.1], [0.3, 0.8, 0.5, 0.6], [0.7, 0.1, 0.9, 0.2]]; // T = 3, E = 4
        let idx = [[0i64, 2], [1, 3], [2, 0]]; // K = 2
        let scores =
            Tensor::<B, 2>::from_data(TensorData::new(s.concat(), [3, 4]), &device).require_grad();
        let indices =
            Tensor::<B, 2, Int>::from_data(TensorData::new(idx.concat(), [3, 2]), &device);
        let loss = sequence_balance_loss(scores.clone(), indices, 0.1);
        // Scalar reference.
        let (t, e, k) = (3.0, 4.0, 2.0);
        let mut expected = 0.0;
        for i in 0..4 {
            let count = idx.iter().filter(|row| row.contains(&(i as i64))).count() as f64;
            let f = e / (k * t) * count;
            let p = s
                .iter()
                .map(|row| row[i] as f64 / row.iter().map(|&v| v as f64).sum::<f64>())
                .sum::<f64>()
                / t;
            expected += f * p;
        }
        let got = loss.clone().into_scalar() as f64;
        assert!((got - 0.1 * expected).abs() < 1e-6, "{got} vs {}", 0.1 * expected);
        let grads = loss.backward();
        assert!(scores.grad(&grads).is_some());
    }

    #[test]
    fn grouped_loss_is_the_mean_of_the_per_sequence_losses() {
        let device = Default::default();
        let scores = Tensor::<Flex, 2>::random(
            [12, 4],
            burn::tensor::Distribution::Uniform(0.05, 1.0),
            &device,
        );
        let idx: Vec<i64> =
            (0..12).flat_map(|t| [t % 4, (t * 3 + 1) % 4]).map(|i| i as i64).collect();
        let indices = Tensor::<Flex, 2, Int>::from_data(TensorData::new(idx, [12, 2]), &device);
        let grouped: f32 =
            grouped_balance_loss(scores.clone(), indices.clone(), 3, 0.5).into_scalar();
        let mean: f32 = (0..3)
            .map(|g| {
                sequence_balance_loss(
                    scores.clone().narrow(0, 4 * g, 4),
                    indices.clone().narrow(0, 4 * g, 4),
                    0.5,
                )
                .into_scalar()
            })
            .sum::<f32>()
            / 3.0;
        assert!((grouped - mean).abs() < 1e-6, "{grouped} vs {mean}");
    }
}
