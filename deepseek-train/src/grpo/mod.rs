//! Reinforcement learning with verifiable rewards: GRPO (DeepSeekMath §4, DeepSeek-R1 §2.2) on
//! the batched decoding engine and the training pieces of this crate.
//!
//! A step samples `group` completions for each of `prompts_per_step` prompts with continuous
//! batching over the latent cache ([`deepseek_infer::engine::generate_traced`], which records
//! each token's log-prob and each position's experts), scores them with [`reward::Rewards`],
//! turns rewards into group-relative advantages and takes `iterations` AdamW steps on the
//! clipped objective ([`objective`]). With LoRA the reference of the KL term is the base with
//! the adapters off, so no second model is held.
//!
//! MoE models need one more thing: the training forward must route tokens as the rollout did,
//! or the importance ratio compares two different computations. The rollout's experts are
//! recorded; `routing_replay` reuses them in the training forward
//! ([`deepseek_core::DeepSeekModel::forward_replayed`]); without it, the share of tokens routed
//! differently is logged (`routing_mismatch`).
//!
//! Files: [`task`] (prompts and answers, the built-in arithmetic task), [`reward`] (the
//! `Reward` trait and the checkers), [`objective`] (advantages and the loss), [`rollout`]
//! (sampling groups and the training rows), [`run`] (the loop: checkpoints, resume, metrics,
//! evaluation, the plot).

pub mod objective;
pub mod reward;
pub mod rollout;
pub mod run;
pub mod task;

use serde::{Deserialize, Serialize};

pub use objective::LossNorm;
pub use run::{grpo, GrpoArgs, GrpoSummary};
pub use task::TaskSpec;

use crate::error::{Result, TrainError};

/// The GRPO recipe (the optimizer, schedule, seed and cadence are the [`crate::TrainConfig`]'s).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GrpoConfig {
    pub task: TaskSpec,
    /// Completions per prompt `G` (at least 2: advantages compare within a group).
    pub group: usize,
    pub prompts_per_step: usize,
    pub max_new_tokens: usize,
    /// Sampling temperature of the rollouts; the training log-probs use the same
    /// `softmax(logits / T)`.
    pub temperature: f32,
    /// Nucleus sampling of the rollouts (`None`: the whole distribution). The ratio ignores the
    /// truncation, as TRL's does.
    pub top_p: Option<f32>,
    /// `ε_low` of the clip.
    pub epsilon: f64,
    /// `ε_high` (DAPO's clip-higher); `None`: `epsilon`.
    pub epsilon_high: Option<f64>,
    /// `β` of the KL to the reference (0: no reference forward, TRL's default).
    pub beta: f64,
    /// Optimizer steps per batch of rollouts (`μ` of DeepSeekMath; TRL's `num_iterations`).
    pub iterations: usize,
    pub loss_norm: LossNorm,
    /// Divide advantages by the group's reward std (`false`: Dr. GRPO's `r − mean`).
    pub scale_rewards: bool,
    /// Route the training forward's tokens to the experts the rollout chose.
    pub routing_replay: bool,
    /// Weight of the `#### N` format reward (0: none).
    pub format_reward: f64,
    /// Sequences per training forward (memory; the update does not depend on it).
    pub micro_batch: usize,
    /// Sequences the rollout decodes together (speed; the samples do not depend on it).
    pub rollout_batch: usize,
    /// Held-out prompts per evaluation (0: all).
    pub eval_prompts: usize,
}

impl Default for GrpoConfig {
    fn default() -> Self {
        Self {
            task: TaskSpec::default(),
            group: 8,
            prompts_per_step: 8,
            max_new_tokens: 64,
            temperature: 1.0,
            top_p: None,
            epsilon: 0.2,
            epsilon_high: None,
            beta: 0.0,
            iterations: 1,
            loss_norm: LossNorm::Token,
            scale_rewards: true,
            routing_replay: false,
            format_reward: 0.0,
            micro_batch: 16,
            rollout_batch: 64,
            eval_prompts: 0,
        }
    }
}

impl GrpoConfig {
    /// `ε_high`.
    pub fn epsilon_high(&self) -> f64 {
        self.epsilon_high.unwrap_or(self.epsilon)
    }

    /// Checks the settings, naming the flag to fix.
    pub fn validate(&self) -> Result<()> {
        if self.group < 2 {
            return Err(TrainError::config(
                "group",
                format!(
                    "must be at least 2 (advantages compare completions within a group), got {}",
                    self.group
                ),
            ));
        }
        for (field, v) in [
            ("prompts_per_step", self.prompts_per_step),
            ("max_new_tokens", self.max_new_tokens),
            ("iterations", self.iterations),
            ("micro_batch", self.micro_batch),
            ("rollout_batch", self.rollout_batch),
        ] {
            if v == 0 {
                return Err(TrainError::config(field, "must be at least 1"));
            }
        }
        if !(self.temperature > 0.0 && self.temperature.is_finite()) {
            return Err(TrainError::config(
                "temperature",
                format!("must be positive (GRPO samples), got {}", self.temperature),
            ));
        }
        if let Some(p) = self.top_p {
            if !(p > 0.0 && p <= 1.0) {
                return Err(TrainError::config("top_p", format!("must be in (0, 1], got {p}")));
            }
        }
        for (field, v) in [("epsilon", self.epsilon), ("epsilon_high", self.epsilon_high())] {
            if !(v > 0.0 && v.is_finite()) || (field == "epsilon" && v >= 1.0) {
                return Err(TrainError::config(field, format!("must be in (0, 1), got {v}")));
            }
        }
        if !(self.beta >= 0.0 && self.beta.is_finite()) {
            return Err(TrainError::config("beta", format!("must be ≥ 0, got {}", self.beta)));
        }
        if !(self.format_reward >= 0.0 && self.format_reward.is_finite()) {
            return Err(TrainError::config("format_reward", "must be ≥ 0"));
        }
        Ok(())
    }
}
