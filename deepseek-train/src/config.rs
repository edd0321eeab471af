//! The hyperparameters of a training run ([`TrainConfig`]): the recipe (schedule, optimizer,
//! balancing, MTP, FP8, node limit) and the run settings a resumed run may change
//! ([`RunSettings`]). Readable from TOML, saved in every checkpoint's `state.json`.

use deepseek_core::DeepSeekConfig;
use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};
use crate::loss::{BalanceMode, LossWeights};
use crate::optim::AdamWConfig;
use crate::schedule::LrSchedule;

/// What to do when the loss or the gradient norm is NaN or infinite.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum NonFinitePolicy {
    /// Stop with an error naming the step (no checkpoint of the poisoned state is written).
    #[default]
    Stop,
    /// Skip the update, log the step as skipped, and go on (at most 10 in a row).
    Skip,
}

impl std::str::FromStr for NonFinitePolicy {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "stop" => Ok(Self::Stop),
            "skip" => Ok(Self::Skip),
            other => Err(format!("unknown policy `{other}`: choose stop or skip")),
        }
    }
}

/// Every hyperparameter of a run. Serialized into checkpoints and readable from TOML.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// Total optimizer steps.
    pub steps: usize,
    /// Sequences per micro-batch.
    pub batch_size: usize,
    /// Tokens per sequence.
    pub seq_len: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    pub seed: u64,
    /// Peak learning rate.
    pub lr: f64,
    pub warmup_steps: usize,
    /// Fraction of `steps` at which the cosine decay starts.
    pub decay_start: f64,
    /// Fraction of `steps` at which it reaches `min_lr`.
    pub decay_end: f64,
    pub min_lr: f64,
    /// Rate of the last phase (from `decay_end`), if different from `min_lr`.
    pub final_lr: Option<f64>,
    pub optim: AdamWConfig,
    pub balance: BalanceMode,
    /// γ of the bias update (aux-free).
    pub bias_gamma: f64,
    /// Stop updating the bias from this step on (the paper stops for its last 500B tokens).
    pub bias_update_until: Option<usize>,
    /// α of the sequence-wise balance loss (aux-free).
    pub seq_aux_alpha: f64,
    /// α of the batch-wise auxiliary loss (aux-loss).
    pub aux_loss_alpha: f64,
    /// λ of the MTP loss, first phase.
    pub mtp_lambda: f64,
    /// λ after `mtp_lambda_switch` (fraction of `steps`).
    pub mtp_lambda_late: f64,
    pub mtp_lambda_switch: f64,
    /// Evaluate every this many steps (and at the end); 0: only at the end.
    pub eval_every: usize,
    /// Validation batches per evaluation (0: the whole split).
    pub eval_batches: usize,
    /// Checkpoint every this many steps (and always at the last step); 0: only at the end.
    pub checkpoint_every: usize,
    /// Checkpoints to keep.
    pub keep_checkpoints: usize,
    pub on_nonfinite: NonFinitePolicy,
    /// FP8 mixed precision (DeepSeek-V3 §3.3): the GEMMs of linear layers with E4M3 operands
    /// (1×128 activation tiles, 128×128 weight blocks) in forward and backward, f32 accumulation
    /// and master weights.
    pub fp8: bool,
    /// Node-limited routing (DeepSeek-V3 §2.1.2): each token's experts on at most `max_nodes`
    /// of `nodes` contiguous blocks of experts (the expert-parallel placement). TOML:
    /// `node_limit = { nodes = 4, max_nodes = 2 }`.
    pub node_limit: Option<deepseek_core::moe::NodeLimit>,
    /// Activation checkpointing: keep only the residual stream between blocks and recompute
    /// each block in the backward pass ([`crate::recompute`]). Same gradients, less memory,
    /// about one more forward pass of the blocks per step. A resumed run may change it.
    pub checkpoint_activations: bool,
    /// The dtype the trained weights and the activations are held in ([`crate::precision`]):
    /// bf16 or f16 with f32 master weights and moments in the optimizer, f16 with dynamic loss
    /// scaling. Under LoRA the adapters train in f32 and the frozen base is held in
    /// [`Finetune::base_dtype`].
    pub dtype: deepseek_core::WeightDtype,
    /// Loss scaling of an f16 run (TOML: `loss_scaling = { initial = 65536.0, growth_interval =
    /// 2000 }`).
    pub loss_scaling: crate::precision::LossScaling,
    /// Fine-tuning (`deepseek-train sft`, `grpo`): the base model, LoRA or full, the router.
    pub finetune: Option<Finetune>,
    /// Reinforcement learning (`deepseek-train grpo`): the task and the algorithm's settings.
    pub grpo: Option<crate::grpo::GrpoConfig>,
}

/// What the router does while fine-tuning.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum RouterMode {
    /// Gate weight and correction bias unchanged (transformers, DeepSeek's ESFT).
    #[default]
    Frozen,
    /// The auxiliary-loss-free bias updates stay on (Megatron); the gate weight trains with
    /// `--full`.
    BiasUpdate,
}

impl std::str::FromStr for RouterMode {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "frozen" => Ok(Self::Frozen),
            "bias-update" => Ok(Self::BiasUpdate),
            other => Err(format!("unknown router mode `{other}`: choose frozen or bias-update")),
        }
    }
}

/// The LoRA recipe of a fine-tuning run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraRecipe {
    pub rank: usize,
    pub alpha: f64,
    pub rslora: bool,
    pub dropout: f64,
    /// Rank of the routed experts' adapters (target `experts`).
    #[serde(default = "default_expert_rank")]
    pub expert_rank: usize,
    /// Adapted module names (`q_a_proj`, ..., `experts`).
    pub targets: Vec<String>,
}

fn default_expert_rank() -> usize {
    4
}

impl LoraRecipe {
    /// The adapter settings.
    pub fn settings(&self) -> deepseek_core::LoraSettings {
        deepseek_core::LoraSettings {
            rank: self.rank,
            alpha: self.alpha,
            rslora: self.rslora,
            dropout: self.dropout,
            expert_rank: self.expert_rank,
        }
    }

    /// The adapted module names.
    pub fn targets(&self) -> deepseek_core::LoraTargets {
        deepseek_core::LoraTargets(self.targets.clone())
    }

    /// The recipe of the adapter in `dir` (its `adapter_config.json`), to continue training it.
    pub fn from_adapter(dir: &std::path::Path) -> Result<Self> {
        let config = deepseek_core::adapter::AdapterConfig::read(dir)?;
        let targets = match &config.target_modules {
            serde_json::Value::Array(names) => {
                names.iter().filter_map(|n| n.as_str().map(String::from)).collect()
            }
            _ => {
                return Err(TrainError::config(
                    "adapter",
                    format!("{}: target_modules is a pattern; training continues only adapters that list their modules", dir.display()),
                ))
            }
        };
        let expert_rank = config
            .rank_pattern
            .iter()
            .find(|(k, _)| k.contains("experts"))
            .map_or(default_expert_rank(), |(_, r)| *r);
        Ok(Self {
            rank: config.r,
            alpha: config.lora_alpha,
            rslora: config.use_rslora,
            dropout: config.lora_dropout,
            expert_rank,
            targets,
        })
    }
}

/// A fine-tuning run's recipe beyond the optimizer and schedule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Finetune {
    /// The Hugging Face-layout model directory the run starts from (and, with LoRA, the base
    /// the adapters apply to: checkpoints hold only the adapters).
    pub base_model: std::path::PathBuf,
    /// LoRA adapters on a frozen base; `None`: every weight trains.
    pub lora: Option<LoraRecipe>,
    pub router: RouterMode,
    /// The data and how it becomes rows (set by the run; a resume checks it is unchanged).
    #[serde(default)]
    pub data: Option<SftDataSettings>,
    /// A LoRA adapter (PEFT layout) the run starts from instead of fresh adapters; `lora` is
    /// then its recipe ([`LoraRecipe::from_adapter`]).
    #[serde(default)]
    pub adapter: Option<std::path::PathBuf>,
    /// The dtype the frozen base is held in under LoRA (`--dtype`): bf16 or f16 halve its memory
    /// while the adapters, their gradients and AdamW state stay f32. Full fine-tuning trains in
    /// f32.
    #[serde(default)]
    pub base_dtype: deepseek_core::WeightDtype,
}

/// Which conversations a fine-tuning run reads and how they become rows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SftDataSettings {
    /// Training JSONL files.
    pub data: Vec<std::path::PathBuf>,
    /// Validation JSONL files (empty: the last 5% of the training conversations).
    pub val_data: Vec<std::path::PathBuf>,
    /// Longest conversation in tokens.
    pub max_len: usize,
    /// Several conversations per row.
    pub pack: bool,
    /// Prompt tokens train too.
    pub train_on_prompt: bool,
    /// Longer conversations are an error instead of skipped.
    pub strict_length: bool,
    /// FNV-1a over the files' bytes, in order: a resumed run checks its data is unchanged.
    pub fingerprint: u64,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            steps: 1000,
            batch_size: 8,
            seq_len: 128,
            grad_accum: 1,
            seed: 0,
            lr: 2.2e-4,
            warmup_steps: 20,
            decay_start: 0.67,
            decay_end: 0.97,
            min_lr: 2.2e-5,
            final_lr: Some(7.3e-6),
            optim: AdamWConfig::default(),
            balance: BalanceMode::AuxFree,
            bias_gamma: 0.001,
            bias_update_until: None,
            seq_aux_alpha: 1e-4,
            aux_loss_alpha: 1e-3,
            mtp_lambda: 0.3,
            mtp_lambda_late: 0.1,
            // 10T of the 14.8T tokens at λ = 0.3.
            mtp_lambda_switch: 10.0 / 14.8,
            eval_every: 100,
            eval_batches: 16,
            checkpoint_every: 250,
            keep_checkpoints: 3,
            on_nonfinite: NonFinitePolicy::Stop,
            fp8: false,
            checkpoint_activations: false,
            dtype: deepseek_core::WeightDtype::F32,
            loss_scaling: Default::default(),
            node_limit: None,
            finetune: None,
            grpo: None,
        }
    }
}

impl TrainConfig {
    /// The learning-rate schedule over `steps`.
    pub fn schedule(&self) -> LrSchedule {
        let at = |f: f64| (self.steps as f64 * f).round() as usize;
        LrSchedule {
            peak: self.lr,
            warmup_steps: self.warmup_steps,
            decay_start: at(self.decay_start),
            decay_end: at(self.decay_end),
            floor: self.min_lr,
            final_start: self.final_lr.map(|_| at(self.decay_end)),
            final_lr: self.final_lr.unwrap_or(self.min_lr),
        }
    }

    /// λ of the MTP loss at `step`.
    pub fn mtp_lambda_at(&self, step: usize) -> f64 {
        if (step as f64) < self.mtp_lambda_switch * self.steps as f64 {
            self.mtp_lambda
        } else {
            self.mtp_lambda_late
        }
    }

    /// The loss terms' weights at `step`.
    pub(crate) fn loss_weights(&self, step: usize) -> LossWeights {
        let alpha = match self.balance {
            BalanceMode::AuxFree => self.seq_aux_alpha,
            BalanceMode::AuxLoss => self.aux_loss_alpha,
            BalanceMode::None => 0.0,
        };
        LossWeights { mtp_lambda: self.mtp_lambda_at(step), balance: self.balance, alpha }
    }

    /// Checks the settings against each other and against the model.
    pub fn validate(&self, model: &DeepSeekConfig) -> Result<()> {
        let positive = [
            ("steps", self.steps),
            ("batch_size", self.batch_size),
            ("seq_len", self.seq_len),
            ("grad_accum", self.grad_accum),
        ];
        for (field, v) in positive {
            if v == 0 {
                return Err(TrainError::config(field, "must be at least 1"));
            }
        }
        if self.seq_len > model.max_position_embeddings {
            return Err(TrainError::config(
                "seq_len",
                format!(
                    "{} exceeds the model's context of {} tokens (max_position_embeddings)",
                    self.seq_len, model.max_position_embeddings
                ),
            ));
        }
        if self.seq_len <= model.num_nextn_predict_layers + 1 {
            return Err(TrainError::config(
                "seq_len",
                format!("must exceed the MTP depth + 1 ({})", model.num_nextn_predict_layers + 1),
            ));
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return Err(TrainError::config("lr", format!("must be positive, got {}", self.lr)));
        }
        if !(0.0..=1.0).contains(&self.decay_start)
            || !(self.decay_start..=1.0).contains(&self.decay_end)
        {
            return Err(TrainError::config(
                "decay_start/decay_end",
                "need 0 ≤ decay_start ≤ decay_end ≤ 1",
            ));
        }
        let dropout =
            self.finetune.as_ref().and_then(|f| f.lora.as_ref()).map_or(0.0, |l| l.dropout);
        if self.checkpoint_activations && dropout > 0.0 {
            return Err(TrainError::config(
                "checkpoint_activations",
                "LoRA dropout draws new masks when a block is recomputed: use --lora-dropout 0 with --checkpoint-activations",
            ));
        }
        if self.dtype != deepseek_core::WeightDtype::F32 {
            if self.fp8 {
                return Err(TrainError::config(
                    "fp8",
                    format!(
                        "FP8 training runs its GEMMs on f32 activations: use --dtype f32 with \
                         --fp8 (not {})",
                        self.dtype
                    ),
                ));
            }
            if self.finetune.as_ref().is_some_and(|f| f.lora.is_some()) {
                return Err(TrainError::config(
                    "dtype",
                    "LoRA adapters train in f32; --dtype sets the frozen base's dtype",
                ));
            }
        }
        self.loss_scaling.validate()?;
        if let Some(limit) = self.node_limit {
            limit
                .check(model.n_routed_experts, model.num_experts_per_tok)
                .map_err(|problem| TrainError::config("node_limit", problem))?;
        }
        if self.balance == BalanceMode::AuxFree
            && !model.topk_method.has_bias()
            && model.n_routed_experts > 0
        {
            return Err(TrainError::config(
                "balance",
                "aux-free balancing needs a router with a selection bias (topk_method noaux_tc)",
            ));
        }
        Ok(())
    }
}

/// The settings of a [`TrainConfig`] that `--resume` takes from the command line rather than
/// from the checkpoint: how long the run goes on and how it evaluates, saves and reacts to a
/// non-finite step. Everything else is the recipe, which a resumed run keeps.
#[derive(Debug, Clone, PartialEq)]
pub struct RunSettings {
    /// Total optimizer steps (the new total when resuming).
    pub steps: usize,
    /// Evaluate every this many steps.
    pub eval_every: usize,
    /// Validation batches per evaluation.
    pub eval_batches: usize,
    /// Checkpoint every this many steps.
    pub checkpoint_every: usize,
    /// Checkpoints to keep.
    pub keep_checkpoints: usize,
    /// What to do on a non-finite loss or gradient norm.
    pub on_nonfinite: NonFinitePolicy,
    /// Recompute the blocks in the backward pass (the same gradients).
    pub checkpoint_activations: bool,
}

impl TrainConfig {
    /// The settings a resumed run may change.
    pub fn run_settings(&self) -> RunSettings {
        RunSettings {
            steps: self.steps,
            eval_every: self.eval_every,
            eval_batches: self.eval_batches,
            checkpoint_every: self.checkpoint_every,
            keep_checkpoints: self.keep_checkpoints,
            on_nonfinite: self.on_nonfinite,
            checkpoint_activations: self.checkpoint_activations,
        }
    }

    /// This recipe with `run`'s settings.
    pub fn with_run_settings(self, run: RunSettings) -> Self {
        let RunSettings {
            steps,
            eval_every,
            eval_batches,
            checkpoint_every,
            keep_checkpoints,
            on_nonfinite,
            checkpoint_activations,
        } = run;
        Self {
            steps,
            eval_every,
            eval_batches,
            checkpoint_every,
            keep_checkpoints,
            on_nonfinite,
            checkpoint_activations,
            ..self
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_readme_toml_example_parses_and_unknown_keys_are_errors() {
        let readme = include_str!("../README.md");
        let start = readme.find("```toml\n").expect("a TOML example") + 8;
        let text = &readme[start..start + readme[start..].find("```").unwrap()];
        let cfg: TrainConfig = toml::from_str(text).unwrap();
        assert_eq!(cfg.steps, 2000);
        assert_eq!(cfg.balance, BalanceMode::AuxFree);
        assert_eq!(cfg.optim.max_grad_norm, Some(1.0));
        assert_eq!(cfg.seq_len, TrainConfig::default().seq_len, "unset keys keep their defaults");
        let err = toml::from_str::<TrainConfig>("stepz = 3").unwrap_err().to_string();
        assert!(err.contains("stepz"), "{err}");
    }

    #[test]
    fn mtp_lambda_follows_the_paper_schedule() {
        let cfg = TrainConfig { steps: 148, ..Default::default() };
        assert_eq!(cfg.mtp_lambda_at(0), 0.3);
        assert_eq!(cfg.mtp_lambda_at(99), 0.3);
        assert_eq!(cfg.mtp_lambda_at(100), 0.1);
        let s = cfg.schedule();
        assert!((s.lr(cfg.warmup_steps) - cfg.lr).abs() < 1e-12);
        assert_eq!(s.lr(147), 7.3e-6);
    }

    #[test]
    fn resuming_takes_the_run_settings_and_keeps_the_recipe() {
        let saved = TrainConfig { steps: 10, lr: 1e-3, eval_every: 5, ..Default::default() };
        let asked = TrainConfig {
            steps: 20,
            lr: 5.0,
            eval_every: 7,
            on_nonfinite: NonFinitePolicy::Skip,
            ..Default::default()
        };
        let merged = saved.clone().with_run_settings(asked.run_settings());
        assert_eq!(
            (merged.steps, merged.eval_every, merged.on_nonfinite),
            (20, 7, NonFinitePolicy::Skip)
        );
        assert_eq!(merged.lr, saved.lr, "the recipe stays the checkpoint's");
        assert_eq!(merged.with_run_settings(saved.run_settings()), saved);
    }
}
