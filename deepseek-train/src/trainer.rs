//! The training loop (DeepSeek-V3 §4.2 recipe, scaled down): AdamW with global-norm clipping,
//! the warmup–constant–cosine–constant schedule, gradient accumulation, the MTP loss with its λ
//! schedule, and load balancing: after every optimizer step each MoE block's selection bias
//! moves by `±γ` toward balance (aux-free), or the classic auxiliary loss (aux-loss), or nothing.
//!
//! Model code stays stateless: the bias update, the optimizer and the data position live here.

use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{ElementConversion, Int, Tensor, TensorData};
use burn::module::AutodiffModule;
use burn::optim::{GradientsAccumulator, GradientsParams};
use deepseek_core::{DeepSeekConfig, DeepSeekModel};
use deepseek_core::fp8::{self, GemmPrecision};
use serde::{Deserialize, Serialize};

use crate::balance::{max_vio, update_model_biases};
use crate::checkpoint::{self, TrainState};
use crate::data::{DataConfig, Dataset, Windows};
use crate::distributed::{self, RankContext};
use crate::error::{Result, TrainError};
use crate::loss::{batch_loss, BalanceMode, LossWeights};
use crate::metrics::{EvalRecord, MetricsWriter, StepRecord};
use crate::optim::{AdamW, AdamWConfig};
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
            node_limit: None,
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

    fn loss_weights(&self, step: usize) -> LossWeights {
        let alpha = match self.balance {
            BalanceMode::AuxFree => self.seq_aux_alpha,
            BalanceMode::AuxLoss => self.aux_loss_alpha,
            BalanceMode::None => 0.0,
        };
        LossWeights { mtp_lambda: self.mtp_lambda_at(step), balance: self.balance, alpha }
    }

    /// Checks the settings against each other and against the model.
    pub fn validate(&self, model: &DeepSeekConfig) -> Result<()> {
        let positive = [("steps", self.steps), ("batch_size", self.batch_size), ("seq_len", self.seq_len), ("grad_accum", self.grad_accum)];
        for (field, v) in positive {
            if v == 0 {
                return Err(TrainError::config(field, "must be at least 1"));
            }
        }
        if self.seq_len > model.max_position_embeddings {
            return Err(TrainError::config(
                "seq_len",
                format!("{} exceeds the model's context of {} tokens (max_position_embeddings)", self.seq_len, model.max_position_embeddings),
            ));
        }
        if self.seq_len <= model.num_nextn_predict_layers + 1 {
            return Err(TrainError::config("seq_len", format!("must exceed the MTP depth + 1 ({})", model.num_nextn_predict_layers + 1)));
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return Err(TrainError::config("lr", format!("must be positive, got {}", self.lr)));
        }
        if !(0.0..=1.0).contains(&self.decay_start) || !(self.decay_start..=1.0).contains(&self.decay_end) {
            return Err(TrainError::config("decay_start/decay_end", "need 0 ≤ decay_start ≤ decay_end ≤ 1"));
        }
        if let Some(limit) = self.node_limit {
            limit.check(model.n_routed_experts, model.num_experts_per_tok).map_err(|problem| TrainError::config("node_limit", problem))?;
        }
        if self.balance == BalanceMode::AuxFree && !model.topk_method.has_bias() && model.n_routed_experts > 0 {
            return Err(TrainError::config("balance", "aux-free balancing needs a router with a selection bias (topk_method noaux_tc)"));
        }
        Ok(())
    }
}

/// A fresh model whose weights are a function of `seed` alone. Burn draws initial weights from
/// one process-wide generator per backend; a lock keeps other initializations in this crate
/// (another run on another thread, parallel tests) from interleaving with this one.
pub fn init_model<B: burn::tensor::backend::Backend>(config: &DeepSeekConfig, seed: u64, device: &B::Device) -> DeepSeekModel<B> {
    static INIT: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = INIT.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    B::seed(device, seed);
    let model = config.init::<B>(device);
    model.materialize();
    model
}

/// Sets the model's GEMM precision from the recipe, after installing this backend's custom
/// autodiff operations.
fn with_precision<AB: AutodiffBackend>(model: DeepSeekModel<AB>, config: &TrainConfig) -> Result<DeepSeekModel<AB>> {
    // The device MoE dispatch/combine (GPU backends), the expert-parallel all-to-all and the FP8
    // GEMM need their autodiff nodes.
    deepseek_core::register_autodiff::<AB::InnerBackend>();
    let model = model.with_node_limit(config.node_limit)?;
    if !config.fp8 {
        return Ok(model.with_gemm_precision(GemmPrecision::Full));
    }
    if !fp8::training::has_autodiff_node::<AB>() {
        return Err(TrainError::config("fp8", "FP8 training needs the plain Autodiff backend (no gradient checkpointing)"));
    }
    Ok(model.with_gemm_precision(GemmPrecision::Fp8))
}

/// A training run in progress.
pub struct Trainer<AB: AutodiffBackend> {
    pub model: DeepSeekModel<AB>,
    pub optim: AdamW<AB::InnerBackend>,
    pub config: TrainConfig,
    pub data_config: DataConfig,
    /// Optimizer steps completed.
    pub step: usize,
    /// Training windows consumed.
    pub position: u64,
    pub tokens: u64,
    pub out: PathBuf,
    device: AB::Device,
    /// `None` on the replicas a process makes for its ranks after the first.
    metrics: Option<MetricsWriter>,
    /// This trainer's rank in a parallel run.
    pub rank: Option<RankContext>,
    elapsed_before: f64,
    consecutive_skips: usize,
    /// Show a progress bar on stderr.
    pub progress: bool,
}

/// What [`Trainer::run`] reports as it goes.
pub enum Event<'a> {
    Step(&'a StepRecord),
    Eval(&'a EvalRecord),
    Checkpoint(&'a Path),
}

impl<AB: AutodiffBackend> Trainer<AB> {
    /// A fresh run of `model` (already seeded and initialized) writing into `out`.
    pub fn new(model: DeepSeekModel<AB>, config: TrainConfig, data_config: DataConfig, out: &Path, device: &AB::Device) -> Result<Self> {
        config.validate(&model.config)?;
        std::fs::create_dir_all(out).map_err(|e| TrainError::io(out, e))?;
        // Draw every lazy parameter now, in a fixed order, so the run is a function of the seed.
        model.materialize();
        let optim = AdamW::new(config.optim);
        let model = with_precision(model, &config)?;
        let metrics = MetricsWriter::open(out, None)?;
        Ok(Self {
            model,
            optim,
            config,
            data_config,
            step: 0,
            position: 0,
            tokens: 0,
            out: out.to_path_buf(),
            device: device.clone(),
            metrics: Some(metrics),
            rank: None,
            elapsed_before: 0.0,
            consecutive_skips: 0,
            progress: false,
        })
    }

    /// Continues from the newest checkpoint in `out`. `model_config` must equal the saved one;
    /// `config` may change `steps` (the new total) and the logging/checkpoint cadence, not the
    /// recipe.
    pub fn resume(out: &Path, model_config: &DeepSeekConfig, config: TrainConfig, device: &AB::Device) -> Result<Self> {
        let Some((_, dir)) = checkpoint::latest(out) else {
            return Err(TrainError::checkpoint(out, "no checkpoint to resume from (run without --resume to start)"));
        };
        let loaded = checkpoint::load::<AB>(&dir, model_config, device)?;
        let state = loaded.state;
        let mut merged = state.train.clone();
        merged.steps = config.steps;
        merged.eval_every = config.eval_every;
        merged.eval_batches = config.eval_batches;
        merged.checkpoint_every = config.checkpoint_every;
        merged.keep_checkpoints = config.keep_checkpoints;
        merged.on_nonfinite = config.on_nonfinite;
        merged.validate(model_config)?;
        let metrics = MetricsWriter::open(out, Some(state.step))?;
        Ok(Self {
            model: with_precision(loaded.model, &merged)?,
            optim: loaded.optim,
            config: merged,
            data_config: state.data,
            step: state.step,
            position: state.position,
            tokens: state.tokens,
            out: out.to_path_buf(),
            device: device.clone(),
            metrics: Some(metrics),
            rank: None,
            elapsed_before: state.elapsed_s,
            consecutive_skips: 0,
            progress: false,
        })
    }

    /// A copy of this trainer for another rank of a parallel run on `device`: the same weights
    /// (a fresh autodiff graph), optimizer state and position, no metrics of its own.
    pub fn replica(&self, device: &AB::Device, rank: RankContext) -> Self {
        Self {
            model: distributed::replica(&self.model, device),
            optim: self.optim.to_device(device),
            config: self.config.clone(),
            data_config: self.data_config.clone(),
            step: self.step,
            position: self.position,
            tokens: self.tokens,
            out: self.out.clone(),
            device: device.clone(),
            metrics: None,
            rank: Some(rank),
            elapsed_before: self.elapsed_before,
            consecutive_skips: 0,
            progress: false,
        }
    }

    /// Whether this trainer evaluates and checkpoints (rank 0, or a single run).
    pub fn is_primary(&self) -> bool {
        self.rank.as_ref().is_none_or(RankContext::is_primary)
    }

    /// Ranks sharing each step's global batch.
    fn world(&self) -> usize {
        self.rank.as_ref().map_or(1, |r| r.world)
    }

    /// This rank's share of the global micro-batch at `position`: sequences
    /// `position + rank·b/R ..` of `b/R`.
    fn batch(&self, windows: &mut Windows, seed: u64, position: u64, batch: usize) -> Tensor<AB, 2, Int> {
        let seq = self.config.seq_len;
        let per_rank = batch / self.world();
        let first = position + (self.rank.as_ref().map_or(0, |r| r.rank) * per_rank) as u64;
        let ids: Vec<i64> = (0..per_rank as u64).flat_map(|i| windows.shuffled(seed, first + i)).map(i64::from).collect();
        Tensor::from_data(TensorData::new(ids, [per_rank, seq + 1]), &self.device)
    }

    /// One optimizer step over `grad_accum` micro-batches.
    pub fn train_step(&mut self, windows: &mut Windows) -> Result<StepRecord> {
        let start = Instant::now();
        let cfg = self.config.clone();
        let weights = cfg.loss_weights(self.step);
        let mut accumulator = GradientsAccumulator::<DeepSeekModel<AB>>::new();
        let (mut main_sum, mut mtp_sum, mut bal_sum) = (0f64, None::<f64>, None::<f64>);
        let mut counts: Vec<Vec<u64>> = Vec::new();
        for _ in 0..cfg.grad_accum {
            let ids = self.batch(windows, cfg.seed, self.position, cfg.batch_size);
            self.position += cfg.batch_size as u64;
            let loss = batch_loss(&self.model, ids, weights);
            // Each rank's loss is a mean over its share: the global mean is their average.
            let scaled = loss.total.div_scalar((cfg.grad_accum * self.world()) as f64);
            let grads = GradientsParams::from_grads(scaled.backward(), &self.model);
            accumulator.accumulate(&self.model, grads);
            main_sum += loss.main.into_scalar().elem::<f64>();
            if let Some(m) = loss.mtp {
                *mtp_sum.get_or_insert(0.0) += m.into_scalar().elem::<f64>();
            }
            if let Some(b) = loss.balance {
                *bal_sum.get_or_insert(0.0) += b.into_scalar().elem::<f64>();
            }
            add_counts(&mut counts, loss.counts);
        }
        let mut grads = accumulator.grads();
        if let Some(rank) = &self.rank {
            // One all-reduce: gradients, loss sums and expert loads of every rank.
            let mut stats = vec![main_sum as f32, mtp_sum.unwrap_or(0.0) as f32, bal_sum.unwrap_or(0.0) as f32];
            stats.extend(counts.iter().flatten().map(|&c| c as f32));
            let (summed, stats) = distributed::all_reduce(&self.model, grads, stats, rank)?;
            grads = summed;
            let world = rank.world as f64;
            main_sum = stats[0] as f64 / world;
            mtp_sum = mtp_sum.map(|_| stats[1] as f64 / world);
            bal_sum = bal_sum.map(|_| stats[2] as f64 / world);
            let mut global = stats[3..].iter();
            for layer in counts.iter_mut() {
                for c in layer.iter_mut() {
                    *c = global.next().map_or(0, |&v| v.round() as u64);
                }
            }
        }
        let n = cfg.grad_accum as f64;
        let (loss, mtp_loss, balance_loss) = (main_sum / n, mtp_sum.map(|v| v / n), bal_sum.map(|v| v / n));
        let lr = cfg.schedule().lr(self.step);
        let grad_norm = AdamW::<AB::InnerBackend>::global_norm::<AB, _>(&self.model, &grads);
        let total = loss + mtp_loss.unwrap_or(0.0) + balance_loss.unwrap_or(0.0);
        let bad = [("loss", total), ("gradient norm", grad_norm)].into_iter().find(|(_, v)| !v.is_finite());
        let mut skipped = false;
        if let Some((what, value)) = bad {
            match cfg.on_nonfinite {
                NonFinitePolicy::Stop => return Err(TrainError::NonFinite { step: self.step + 1, what, value }),
                NonFinitePolicy::Skip => {
                    self.consecutive_skips += 1;
                    if self.consecutive_skips > 10 {
                        return Err(TrainError::NonFinite { step: self.step + 1, what, value });
                    }
                    skipped = true;
                }
            }
        }
        if !skipped {
            self.consecutive_skips = 0;
            let model = self.model.clone();
            let (model, _) = self.optim.step_with_norm::<AB, _>(lr, model, grads, grad_norm);
            self.model = model;
            let updating = cfg.balance == BalanceMode::AuxFree && cfg.bias_update_until.is_none_or(|until| self.step < until);
            if updating && cfg.bias_gamma > 0.0 {
                update_model_biases(&mut self.model, &counts, cfg.bias_gamma as f32);
            }
        }
        self.step += 1;
        let step_tokens = (cfg.grad_accum * cfg.batch_size * cfg.seq_len) as u64;
        self.tokens += step_tokens;
        let record = StepRecord {
            step: self.step,
            loss: loss as f32,
            mtp_loss: mtp_loss.map(|v| v as f32),
            balance_loss: balance_loss.map(|v| v as f32),
            lr,
            grad_norm,
            tokens_per_s: step_tokens as f64 / start.elapsed().as_secs_f64(),
            max_vio_batch: counts.iter().map(|c| max_vio(c)).fold(0.0, f64::max),
            tokens: self.tokens,
            skipped,
        };
        if let Some(metrics) = &mut self.metrics {
            metrics.write(&record)?;
        }
        Ok(record)
    }

    /// Loss and global MaxVio over the validation split (its first `eval_batches` batches, in
    /// file order), with the inference model (no autodiff graph).
    pub fn evaluate(&mut self, data: &Dataset) -> Result<EvalRecord> {
        // Every expert is on every rank: evaluation runs here alone, without the exchange.
        let model = self.model.valid().with_expert_parallel(None).map_err(|e| TrainError::config("expert_parallel", e.to_string()))?;
        let record = evaluate(&model, &data.val, &self.config, self.step)?;
        if let Some(metrics) = &mut self.metrics {
            metrics.write(&record)?;
        }
        Ok(record)
    }

    /// Writes a checkpoint of the current state.
    pub fn save_checkpoint(&self, elapsed_s: f64) -> Result<PathBuf> {
        let state = self.state(elapsed_s);
        checkpoint::save(&self.out, &self.model, &self.optim, &state, self.config.keep_checkpoints)
    }

    fn state(&self, elapsed_s: f64) -> TrainState {
        TrainState {
            step: self.step,
            adam_step: self.optim.step,
            position: self.position,
            tokens: self.tokens,
            seed: self.config.seed,
            elapsed_s,
            train: self.config.clone(),
            data: self.data_config.clone(),
        }
    }

    /// Trains up to `config.steps`, evaluating and checkpointing on schedule, and always
    /// checkpointing (and evaluating) at the last step.
    pub fn run(&mut self, data: &Dataset, mut observer: impl FnMut(Event)) -> Result<()> {
        let start = Instant::now();
        let mut windows = Windows::new(&data.train, self.config.seq_len)?;
        Windows::new(&data.val, self.config.seq_len)?; // fail now, not at the first evaluation
        let bar = if self.progress {
            let bar = indicatif::ProgressBar::new(self.config.steps as u64);
            bar.set_style(
                indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} steps [{elapsed_precise}<{eta_precise}] {msg}")
                    .expect("valid template"),
            );
            bar.set_position(self.step as u64);
            bar
        } else {
            indicatif::ProgressBar::hidden()
        };
        let mut last_eval: Option<EvalRecord> = None;
        while self.step < self.config.steps {
            let record = self.train_step(&mut windows)?;
            observer(Event::Step(&record));
            let last = self.step == self.config.steps;
            if !self.is_primary() {
                continue;
            }
            if last || (self.config.eval_every > 0 && self.step % self.config.eval_every == 0) {
                let eval = self.evaluate(data)?;
                observer(Event::Eval(&eval));
                last_eval = Some(eval);
            }
            bar.set_position(self.step as u64);
            bar.set_message(format!(
                "loss {:.3}{} val {} lr {:.1e} MaxVio {:.2} {:.0} tok/s",
                record.loss,
                record.mtp_loss.map(|m| format!(" mtp {m:.3}")).unwrap_or_default(),
                last_eval.as_ref().map(|e| format!("{:.3}", e.val_loss)).unwrap_or_else(|| "-".into()),
                record.lr,
                record.max_vio_batch,
                record.tokens_per_s,
            ));
            if last || (self.config.checkpoint_every > 0 && self.step % self.config.checkpoint_every == 0) {
                let dir = self.save_checkpoint(self.elapsed_before + start.elapsed().as_secs_f64())?;
                observer(Event::Checkpoint(&dir));
            }
        }
        bar.finish();
        Ok(())
    }
}

/// Adds each MoE block's `[E]` token counts to the running per-block totals (one host read per
/// block).
fn add_counts<B: burn::tensor::backend::Backend>(totals: &mut Vec<Vec<u64>>, counts: Vec<Tensor<B, 1, Int>>) {
    for (l, c) in counts.into_iter().enumerate() {
        let c: Vec<i64> = c.into_data().convert::<i64>().into_vec().expect("int counts");
        if totals.len() <= l {
            totals.push(vec![0; c.len()]);
        }
        for (acc, v) in totals[l].iter_mut().zip(c) {
            *acc += v as u64;
        }
    }
}

/// Mean losses and global MaxVio of `model` over the validation windows.
pub fn evaluate<B: burn::tensor::backend::Backend>(model: &DeepSeekModel<B>, val: &crate::data::TokenFile, config: &TrainConfig, step: usize) -> Result<EvalRecord> {
    let windows = Windows::new(val, config.seq_len)?;
    let device = model.embed_tokens.weight.device();
    let per_batch = config.batch_size;
    let available = windows.count().div_ceil(per_batch);
    let batches = if config.eval_batches == 0 { available } else { config.eval_batches.min(available) };
    let weights = LossWeights { mtp_lambda: 0.0, balance: BalanceMode::None, alpha: 0.0 };
    let (mut main, mut mtp, mut tokens, mut n_seq) = (0f64, None::<f64>, 0u64, 0usize);
    let mut counts: Vec<Vec<u64>> = Vec::new();
    for b in 0..batches {
        let first = b * per_batch;
        let size = per_batch.min(windows.count() - first);
        let ids: Vec<i64> = (first..first + size).flat_map(|i| windows.window(i)).map(i64::from).collect();
        let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [size, config.seq_len + 1]), &device);
        let loss = batch_loss(model, ids, weights);
        // Weighted by sequences so a short last batch counts for what it holds.
        main += loss.main.into_scalar().elem::<f64>() * size as f64;
        if let Some(m) = loss.mtp {
            *mtp.get_or_insert(0.0) += m.into_scalar().elem::<f64>() * size as f64;
        }
        add_counts(&mut counts, loss.counts);
        n_seq += size;
        tokens += (size * config.seq_len) as u64;
    }
    Ok(EvalRecord {
        step,
        val_loss: main / n_seq as f64,
        val_mtp_loss: mtp.map(|m| m / n_seq as f64),
        max_vio_global: counts.iter().map(|c| max_vio(c)).fold(0.0, f64::max),
        val_tokens: tokens,
    })
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
}
