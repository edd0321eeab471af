//! The GRPO objective (DeepSeekMath §4.1, DeepSeek-R1 §2.2.1, as TRL's `GRPOTrainer`
//! implements it).
//!
//! For a group of `G` completions of one prompt with rewards `r_i`, the advantage of every token
//! of completion `i` is `A_i = (r_i − mean(r)) / (std(r) + 1e-4)` (`std` with Bessel's
//! correction, as `torch.std`; without scaling `A_i = r_i − mean(r)`, Dr. GRPO). Per completion
//! token `t`, with `ρ = π_θ(o_t | q, o_<t) / π_old(o_t | q, o_<t)`:
//!
//! `ℓ_t = −[ min(ρ A, clip(ρ, 1 − ε_low, 1 + ε_high) A) − β · KL_t ]`,
//! `KL_t = π_ref/π_θ − log(π_ref/π_θ) − 1` (the k3 estimator, unbiased and ≥ 0).
//!
//! The loss is `Σ_t w_t ℓ_t` with weights that normalize it: token-level (DAPO; TRL's `dapo`)
//! `w_t = 1 / (completion tokens of the whole step)`, or sequence-level (the original GRPO)
//! `w_t = 1 / (|o_i| · completions)`. Because the weights hold the step-wide denominators, a step
//! split into micro-batches sums to the same loss and gradient.

use burn::tensor::backend::Backend;
use burn::tensor::{Bool, Tensor};
use serde::{Deserialize, Serialize};

/// How per-token terms are averaged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LossNorm {
    /// Over all completion tokens of the step (DAPO): long completions weigh by their length.
    #[default]
    Token,
    /// Over each completion's tokens, then over completions (DeepSeekMath's GRPO).
    Sequence,
}

impl std::str::FromStr for LossNorm {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "token" => Ok(Self::Token),
            "sequence" => Ok(Self::Sequence),
            other => Err(format!("unknown --loss-norm `{other}`: token or sequence")),
        }
    }
}

/// Group-relative advantages of `rewards`, groups of `group` consecutive completions.
pub fn advantages(rewards: &[f64], group: usize, scale: bool) -> Vec<f64> {
    assert!(group >= 2 && rewards.len().is_multiple_of(group), "whole groups of at least 2");
    rewards
        .chunks(group)
        .flat_map(|g| {
            let mean = g.iter().sum::<f64>() / g.len() as f64;
            let var = g.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / (g.len() - 1) as f64;
            let std = var.sqrt();
            g.iter().map(move |r| if scale { (r - mean) / (std + 1e-4) } else { r - mean })
        })
        .collect()
}

/// The weight of each token of a completion of `len` tokens, in a step of `total_tokens`
/// completion tokens over `completions` completions (see the module docs).
pub fn token_weight(norm: LossNorm, len: usize, total_tokens: usize, completions: usize) -> f64 {
    match norm {
        LossNorm::Token => 1.0 / total_tokens as f64,
        LossNorm::Sequence => 1.0 / (len * completions) as f64,
    }
}

/// The clipping range and KL weight.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ClipSettings {
    pub epsilon_low: f64,
    pub epsilon_high: f64,
    pub beta: f64,
}

/// One micro-batch's loss and its statistics (sums over completion tokens, on the device).
pub struct Objective<B: Backend> {
    /// `[1]` the weighted loss (its share of the step's).
    pub loss: Tensor<B, 1>,
    /// `[1]` tokens where the clip is active (the gradient is cut), TRL's `clip_ratio/region_mean`.
    pub clipped: Tensor<B, 1>,
    /// `[1]` Σ KL_t over completion tokens (zero without a reference).
    pub kl: Tensor<B, 1>,
    /// `[1]` Σ ρ_t over completion tokens.
    pub ratio: Tensor<B, 1>,
}

/// The GRPO loss of a micro-batch.
///
/// # Shapes
/// `logp` (with gradient), `old_logp`, `ref_logp`: `[n, seq]` log-probs of the chosen tokens;
/// `advantages`: `[n]`; `weights`: `[n, seq]`, zero off the completion tokens.
pub fn objective<B: Backend>(
    logp: Tensor<B, 2>,
    old_logp: Tensor<B, 2>,
    ref_logp: Option<Tensor<B, 2>>,
    advantages: Tensor<B, 1>,
    weights: Tensor<B, 2>,
    clip: ClipSettings,
) -> Objective<B> {
    let [n, seq] = logp.dims();
    let a = advantages.reshape([n, 1]).expand([n, seq]); // [n, seq]
    let ratio = (logp.clone() - old_logp).exp(); // [n, seq]
    let clipped_ratio = ratio.clone().clamp(1.0 - clip.epsilon_low, 1.0 + clip.epsilon_high);
    let surrogate = (ratio.clone() * a.clone()).min_pair(clipped_ratio * a.clone()); // [n, seq]
    let on: Tensor<B, 2, Bool> = weights.clone().greater_elem(0.0);
    let mask = on.clone().float();
    let (mut per_token, kl) = (surrogate.neg(), mask.zeros_like());
    let kl = match ref_logp {
        Some(reference) if clip.beta != 0.0 => {
            let d = reference - logp; // log(π_ref / π_θ)
            let kl = d.clone().exp() - d - 1.0;
            per_token = per_token + kl.clone().mul_scalar(clip.beta);
            kl
        }
        _ => kl,
    };
    let loss = (per_token * weights).sum();
    // Clip active: the ratio left the range on the side where the advantage pushes it further.
    let low = ratio.clone().lower_elem(1.0 - clip.epsilon_low).bool_and(a.clone().lower_elem(0.0));
    let high = ratio.clone().greater_elem(1.0 + clip.epsilon_high).bool_and(a.greater_elem(0.0));
    let clipped = low.bool_or(high).bool_and(on).float().sum();
    Objective {
        loss,
        clipped: clipped.detach(),
        kl: (kl * mask.clone()).sum().detach(),
        ratio: (ratio * mask).sum().detach(),
    }
}
