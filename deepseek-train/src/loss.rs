//! The training objective of one batch (DeepSeek-V3 §2.1.2, §2.2, §4.2): next-token
//! cross-entropy, plus `λ/D · Σ_k CE_k` over the D MTP modules, plus the balance term of the
//! chosen [`BalanceMode`], summed over every MoE block (MTP blocks included).

use burn::tensor::activation::log_softmax;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use deepseek_core::{DeepSeekModel, ForwardOptions, ModelOutput};
use serde::{Deserialize, Serialize};

use crate::balance::grouped_balance_loss;
use crate::source::{Batch, Segments};

/// How expert load is balanced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum BalanceMode {
    /// DeepSeek-V3: the selection bias is updated after every step, plus the tiny sequence-wise
    /// balance loss.
    #[default]
    AuxFree,
    /// The classic batch-wise auxiliary balance loss, no bias updates (the comparison baseline).
    AuxLoss,
    /// Neither.
    None,
}

impl std::str::FromStr for BalanceMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "aux-free" => Ok(Self::AuxFree),
            "aux-loss" => Ok(Self::AuxLoss),
            "none" => Ok(Self::None),
            other => {
                Err(format!("unknown balance mode `{other}`: choose aux-free, aux-loss or none"))
            }
        }
    }
}

/// Weights of the terms.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossWeights {
    /// λ of the MTP loss at this step.
    pub mtp_lambda: f64,
    pub balance: BalanceMode,
    /// α of the balance loss (sequence-wise for aux-free, batch-wise for aux-loss).
    pub alpha: f64,
}

/// The terms of one batch; `total` is what is differentiated.
pub struct BatchLoss<B: Backend> {
    pub total: Tensor<B, 1>,
    /// Mean next-token cross-entropy (nats per token).
    pub main: Tensor<B, 1>,
    /// Mean over the MTP modules of their cross-entropy, if the model has any.
    pub mtp: Option<Tensor<B, 1>>,
    /// The balance term (already weighted by α), if any.
    pub balance: Option<Tensor<B, 1>>,
    /// `[E]` token counts of every MoE block, main blocks first.
    pub counts: Vec<Tensor<B, 1, Int>>,
}

/// Mean cross-entropy of `logits` against `targets`, in f32.
///
/// # Shapes
/// `logits`: `[b, s, V]`, `targets`: `[b, s]` → `[1]`.
pub fn cross_entropy<B: Backend>(logits: Tensor<B, 3>, targets: Tensor<B, 2, Int>) -> Tensor<B, 1> {
    let [b, s, v] = logits.dims();
    let logp = log_softmax(logits.reshape([b * s, v]).cast(burn::tensor::FloatDType::F32), 1); // [b·s, V]
    logp.gather(1, targets.reshape([b * s, 1])).mean().neg()
}

/// Cross-entropy of `logits` against `targets` averaged with per-target `weights` (0 skips a
/// target: prompt tokens in fine-tuning, padding, document boundaries), in f32.
///
/// # Shapes
/// `logits`: `[b, s, V]`, `targets`, `weights`: `[b, s]` → `[1]`.
pub fn weighted_cross_entropy<B: Backend>(
    logits: Tensor<B, 3>,
    targets: Tensor<B, 2, Int>,
    weights: Tensor<B, 2>,
) -> Tensor<B, 1> {
    let [b, s, v] = logits.dims();
    let logp = log_softmax(logits.reshape([b * s, v]).cast(burn::tensor::FloatDType::F32), 1); // [b·s, V]
    let nll = logp.gather(1, targets.reshape([b * s, 1])).neg(); // [b·s, 1]
    let weights = weights.reshape([b * s, 1]);
    // At least one target's worth in the denominator: a batch of only skipped targets gives 0.
    (nll * weights.clone()).sum().div(weights.sum().clamp_min(1.0))
}

/// Per-target negative log-likelihoods of `logits` against `targets`, in f32.
///
/// # Shapes
/// `logits`: `[b, s, V]`, `targets`: `[b, s]` → `[b, s]`.
pub fn token_losses<B: Backend>(logits: Tensor<B, 3>, targets: Tensor<B, 2, Int>) -> Tensor<B, 2> {
    let [b, s, v] = logits.dims();
    let logp = log_softmax(logits.reshape([b * s, v]).cast(burn::tensor::FloatDType::F32), 1); // [b·s, V]
    logp.gather(1, targets.reshape([b * s, 1])).neg().reshape([b, s])
}

/// Runs the model on `windows` (`[b, s + 1]`: inputs are the first `s` tokens, targets the last
/// `s`) and builds the objective.
///
/// # Shapes
/// `windows`: `[batch, seq + 1]`.
pub fn batch_loss<B: Backend>(
    model: &DeepSeekModel<B>,
    windows: Tensor<B, 2, Int>,
    weights: LossWeights,
) -> BatchLoss<B> {
    batch_objective(
        model,
        Batch { ids: windows, weights: None, segments: None, real: None },
        weights,
    )
}

/// The expert loads of `routing` over the real (non-padding) tokens: each token's K experts
/// counted with the token's 0/1 weight. MTP blocks route the first `seq - k` positions of every
/// row.
///
/// # Shapes
/// `routing.indices`: `[batch·len, K]`, `real`: `[batch, seq]` with `len ≤ seq` → `[E]`.
fn real_counts<B: Backend>(
    routing: &deepseek_core::moe::Routing<B>,
    real: &Tensor<B, 2, Int>,
    batch: usize,
) -> Tensor<B, 1, Int> {
    let [tokens, k] = routing.indices.dims();
    let [experts] = routing.counts.dims();
    let len = tokens / batch;
    let weight = real.clone().narrow(1, 0, len).reshape([tokens, 1]).expand([tokens, k]); // [T, K]
    Tensor::zeros([experts], &routing.counts.device()).scatter(
        0,
        routing.indices.clone().reshape([tokens * k]),
        weight.reshape([tokens * k]),
        burn::tensor::IndexingUpdateOp::Add,
    )
}

/// Where MTP module `k`'s targets (`ids[:, i + k + 1]`) stay inside the document of input `i`.
///
/// # Shapes
/// → `[rows, seq - k]`.
fn same_document<B: Backend>(
    segments: &Segments,
    rows: usize,
    len: usize,
    k: usize,
    device: &B::Device,
) -> Tensor<B, 2> {
    let seq = len - 1;
    let same: Vec<f32> = segments
        .tokens
        .chunks(len)
        .flat_map(|row| (0..seq - k).map(move |i| (row[i] == row[i + k + 1]) as u8 as f32))
        .collect();
    Tensor::from_data(TensorData::new(same, [rows, seq - k]), device)
}

/// The objective of `batch`: [`batch_loss`] with per-target weights and packed documents. A
/// weighted batch averages each term over its weighted targets; MTP module k trains on target
/// `i + k + 1` with the weight of that token and only inside the document of input `i`.
///
/// # Shapes
/// `batch.ids`: `[batch, seq + 1]`.
pub fn batch_objective<B: Backend>(
    model: &DeepSeekModel<B>,
    batch_data: Batch<B>,
    weights: LossWeights,
) -> BatchLoss<B> {
    let [_, len] = batch_data.ids.dims();
    let inputs = batch_data.ids.clone().narrow(1, 0, len - 1); // [b, s]
    let options = ForwardOptions { hidden_states: false, mtp: !model.mtp.is_empty() };
    let packing = batch_data.segments.as_ref().map(|s| &s.inputs);
    let out = model.forward_packed(inputs, packing, options);
    output_objective(out, &batch_data, weights)
}

/// The objective's terms from the forward output `out` of `batch`'s inputs: the prediction
/// terms of its logits and the balance terms and loads of the routing it holds (all blocks for
/// [`batch_objective`]; the MTP blocks only for the head of a recomputed step).
///
/// # Shapes
/// `out.logits`: `[batch, seq, V]`, `batch.ids`: `[batch, seq + 1]`.
pub(crate) fn output_objective<B: Backend>(
    out: ModelOutput<B>,
    batch: &Batch<B>,
    weights: LossWeights,
) -> BatchLoss<B> {
    let [rows, _] = batch.ids.dims();
    let (main, mtp) = prediction_terms(
        out.logits,
        &out.mtp_logits,
        &batch.ids,
        batch.weights.as_ref(),
        batch.segments.as_ref(),
    );
    let (balance, counts) = routing_terms(out.routing, rows, batch.real.as_ref(), weights);
    let total = objective_total(&main, mtp.as_ref(), balance.as_ref(), weights);
    BatchLoss { total, main, mtp, balance, counts }
}

/// What is differentiated: `main + λ·mtp` (λ > 0) `+ balance`.
///
/// # Shapes
/// every term `[1]` → `[1]`.
pub(crate) fn objective_total<B: Backend>(
    main: &Tensor<B, 1>,
    mtp: Option<&Tensor<B, 1>>,
    balance: Option<&Tensor<B, 1>>,
    weights: LossWeights,
) -> Tensor<B, 1> {
    let mut total = main.clone();
    if let Some(mtp) = mtp {
        if weights.mtp_lambda > 0.0 {
            total = total + mtp.clone().mul_scalar(weights.mtp_lambda);
        }
    }
    match balance {
        Some(b) => total + b.clone(),
        None => total,
    }
}

/// The next-token cross-entropy of `logits` and the mean MTP cross-entropy of `mtp_logits`
/// against `windows`, weighted as [`batch_objective`] describes.
///
/// # Shapes
/// `logits`: `[b, s, V]`, `mtp_logits[k − 1]`: `[b, s − k, V]`, `windows`: `[b, s + 1]`.
pub(crate) fn prediction_terms<B: Backend>(
    logits: Tensor<B, 3>,
    mtp_logits: &[Tensor<B, 3>],
    windows: &Tensor<B, 2, Int>,
    target_weights: Option<&Tensor<B, 2>>,
    segments: Option<&Segments>,
) -> (Tensor<B, 1>, Option<Tensor<B, 1>>) {
    let [batch, len] = windows.dims();
    let seq = len - 1;
    let device = windows.device();
    let ce = |logits: Tensor<B, 3>, targets: Tensor<B, 2, Int>, w: Option<Tensor<B, 2>>| match w {
        Some(w) => weighted_cross_entropy(logits, targets, w),
        None => cross_entropy(logits, targets),
    };
    let main = ce(logits, windows.clone().narrow(1, 1, seq), target_weights.cloned());
    // MTP module k at position i predicts token i + k + 1 (DeepSeek-V3 eq. 24–25).
    let mtp = (!mtp_logits.is_empty()).then(|| {
        let d = mtp_logits.len();
        let sum = mtp_logits
            .iter()
            .enumerate()
            .map(|(i, logits)| {
                let k = i + 1;
                let w = target_weights.map(|w| w.clone().narrow(1, k, seq - k));
                let w = match (segments, w) {
                    (Some(s), w) => {
                        let same = same_document::<B>(s, batch, len, k, &device);
                        Some(w.map_or(same.clone(), |w| w * same))
                    }
                    (None, w) => w,
                };
                ce(logits.clone(), windows.clone().narrow(1, k + 1, seq - k), w)
            })
            .reduce(|a, b| a + b)
            .expect("at least one module");
        sum.div_scalar(d as f64)
    });
    (main, mtp)
}

/// The balance term of the chosen [`BalanceMode`] summed over the MoE blocks of `routing`
/// (`None` without one), and each block's expert loads over the real tokens.
///
/// # Shapes
/// `routing[m].indices`: `[batch·len, K]`, `real`: `[batch, seq]`.
pub(crate) fn routing_terms<B: Backend>(
    routing: Vec<deepseek_core::moe::Routing<B>>,
    batch: usize,
    real: Option<&Tensor<B, 2, Int>>,
    weights: LossWeights,
) -> (Option<Tensor<B, 1>>, Vec<Tensor<B, 1, Int>>) {
    let balance = match weights.balance {
        _ if weights.alpha <= 0.0 || routing.is_empty() => None,
        BalanceMode::None => None,
        // Each sequence separately (sequence-wise), or the whole batch as one group.
        mode => Some(
            routing
                .iter()
                .map(|r| {
                    let groups = if mode == BalanceMode::AuxFree { batch } else { 1 };
                    grouped_balance_loss(r.scores.clone(), r.indices.clone(), groups, weights.alpha)
                })
                .reduce(|a, b| a + b)
                .expect("non-empty routing"),
        ),
    };
    let counts = routing
        .into_iter()
        .map(|r| match real {
            Some(real) => real_counts(&r, real, batch),
            None => r.counts,
        })
        .collect();
    (balance, counts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;
    use burn::tensor::{ElementConversion, TensorData};

    #[test]
    fn cross_entropy_matches_the_scalar_formula() {
        let device = Default::default();
        let logits = [[[1.0f32, 2.0, 0.5], [0.0, -1.0, 3.0]]];
        let targets = [[1i64, 2]];
        let ce: f32 = cross_entropy(
            Tensor::<Flex, 3>::from_data(
                TensorData::new(logits.concat().concat(), [1, 2, 3]),
                &device,
            ),
            Tensor::<Flex, 2, Int>::from_data(TensorData::new(targets.concat(), [1, 2]), &device),
        )
        .into_scalar();
        let lse = |r: [f32; 3]| r.iter().map(|x| x.exp()).sum::<f32>().ln();
        let expected = ((lse(logits[0][0]) - 2.0) + (lse(logits[0][1]) - 3.0)) / 2.0;
        assert!((ce - expected).abs() < 1e-6, "{ce} vs {expected}");
    }

    #[test]
    fn objective_adds_the_weighted_terms() {
        let device = Default::default();
        let model = deepseek_core::DeepSeekConfig::tiny().init::<Flex>(&device);
        let ids: Vec<i64> = (0..2 * 9).map(|i| (i * 37 % 256) as i64).collect();
        let windows = Tensor::<Flex, 2, Int>::from_data(TensorData::new(ids, [2, 9]), &device);
        let w = LossWeights { mtp_lambda: 0.3, balance: BalanceMode::AuxFree, alpha: 0.01 };
        let l = batch_loss(&model, windows.clone(), w);
        let total: f32 = l.total.into_scalar();
        let main: f32 = l.main.into_scalar();
        let mtp: f32 = l.mtp.unwrap().into_scalar();
        let bal: f32 = l.balance.unwrap().into_scalar();
        assert!((total - (main + 0.3 * mtp + bal)).abs() < 1e-5);
        // tiny: 2 MoE blocks + 1 MTP block, each counting 2·8 tokens × K = 2 (MTP: 2·7).
        let sums: Vec<i64> =
            l.counts.iter().map(|c| c.clone().sum().into_scalar().elem::<i64>()).collect();
        assert_eq!(sums, vec![32, 32, 28]);
        // No balance term and λ = 0: the objective is the main loss.
        let plain = batch_loss(
            &model,
            windows,
            LossWeights { mtp_lambda: 0.0, balance: BalanceMode::None, alpha: 0.01 },
        );
        assert!(plain.balance.is_none());
        let (t, m): (f32, f32) = (plain.total.into_scalar(), plain.main.into_scalar());
        assert_eq!(t, m);
    }

    #[test]
    fn padding_is_left_out_of_the_expert_loads() {
        let device = Default::default();
        let model = deepseek_core::DeepSeekConfig::tiny().init::<Flex>(&device);
        let ids: Vec<i64> = (0..2 * 9).map(|i| (i * 37 % 256) as i64).collect();
        let mut host = crate::source::HostBatch::plain(2, 9, ids);
        // Row 0 holds 8 inputs, row 1 only 5 (the rest padding).
        host.real = Some((0..2 * 8).map(|i| (i < 8 || i % 8 < 5) as i64).collect());
        let w = LossWeights { mtp_lambda: 0.3, balance: BalanceMode::None, alpha: 0.0 };
        let l = batch_objective(&model, host.to_device(&device), w);
        let sums: Vec<i64> =
            l.counts.iter().map(|c| c.clone().sum().into_scalar().elem::<i64>()).collect();
        // K = 2 per token: 13 real tokens in the main blocks; the MTP block routes the first 7
        // positions of each row, 7 + 5 of them real.
        assert_eq!(sums, vec![26, 26, 24]);
    }
}
