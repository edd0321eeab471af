//! The training loop (DeepSeek-V3 §4.2 recipe, scaled down): AdamW with global-norm clipping,
//! the warmup–constant–cosine–constant schedule, gradient accumulation, the MTP loss with its λ
//! schedule, and load balancing: after every optimizer step each MoE block's selection bias
//! moves by `±γ` toward balance (aux-free), or the classic auxiliary loss (aux-loss), or nothing.
//!
//! One step is three parts: [`Trainer::accumulate`] runs the micro-batches and keeps the
//! statistics on the device, [`Trainer::reduce`] sums gradients and statistics over the ranks
//! and reads the statistics back once, and [`Trainer::apply`] checks them against the
//! non-finite policy and updates the weights and the balancing biases.
//!
//! Model code stays single-device: the bias update, the optimizer and the data position live
//! here.

use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::module::AutodiffModule;
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{ElementConversion, Int, Tensor};
use deepseek_core::fp8::{self, GemmPrecision};
use deepseek_core::{DeepSeekConfig, DeepSeekModel};

use crate::balance::{max_vio, update_model_biases};
use crate::checkpoint::{self, TrainState};
use crate::config::{NonFinitePolicy, TrainConfig};
use crate::data::DataConfig;
use crate::distributed::{self, RankContext};
use crate::error::{Result, TrainError};
use crate::loss::{batch_objective, BalanceMode, LossWeights};
use crate::metrics::{EvalRecord, MetricsWriter, StepRecord};
use crate::optim::AdamW;
use crate::precision::{widen_gradients, LossScale};
use crate::recompute::checkpointed_gradients;
use crate::source::{BatchReader, HostBatch, TrainingData};

/// A fresh model whose weights are a function of `seed` alone. Burn draws initial weights from
/// one process-wide generator per backend; a lock keeps other initializations in this crate
/// (another run on another thread, parallel tests) from interleaving with this one.
pub fn init_model<B: burn::tensor::backend::Backend>(
    config: &DeepSeekConfig,
    seed: u64,
    device: &B::Device,
) -> DeepSeekModel<B> {
    let _guard = seeded::<B>(device, seed);
    let model = config.init::<B>(device);
    model.materialize();
    model
}

/// Seeds `B`'s process-wide generator and holds it (a lock) until the guard drops, so that what
/// is drawn meanwhile is a function of `seed` alone.
pub fn seeded<B: burn::tensor::backend::Backend>(
    device: &B::Device,
    seed: u64,
) -> std::sync::MutexGuard<'static, ()> {
    static INIT: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let guard = INIT.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    B::seed(device, seed);
    guard
}

/// The model under the recipe's execution policy (GEMM precision, node limit), after installing
/// this backend's custom autodiff operations.
fn with_recipe<AB: AutodiffBackend>(
    model: DeepSeekModel<AB>,
    config: &TrainConfig,
) -> Result<DeepSeekModel<AB>> {
    // The device MoE dispatch/combine (GPU backends), the expert-parallel all-to-all and the FP8
    // GEMM need their autodiff nodes.
    deepseek_core::register_autodiff::<AB::InnerBackend>();
    let gemm = match config.fp8 {
        false => GemmPrecision::Full,
        true if fp8::training::has_autodiff_node::<AB>() => GemmPrecision::Fp8,
        true => {
            return Err(TrainError::config(
                "fp8",
                "FP8 training needs the plain Autodiff backend (no gradient checkpointing)",
            ))
        }
    };
    let policy = model.policy().clone().with_gemm(gemm).with_node_limit(config.node_limit);
    Ok(model.with_policy(policy)?)
}

/// Where a run stands: what a checkpoint restores besides weights and optimizer state.
#[derive(Debug, Clone, Copy, Default)]
struct Position {
    step: usize,
    position: u64,
    tokens: u64,
    elapsed_s: f64,
    /// An f16 run's loss scale.
    loss_scale: Option<LossScale>,
}

/// What [`Trainer::accumulate`] leaves for the rest of the step.
struct Accumulated<AB: AutodiffBackend> {
    grads: GradientsParams,
    /// `[4 + Σ E]` on the device: the sums over micro-batches of the main, MTP and balance
    /// losses, the input tokens (padding excluded), then every MoE block's expert token counts.
    stats: Tensor<AB::InnerBackend, 1>,
    has_mtp: bool,
    has_balance: bool,
}

/// A step's statistics on the host, averaged over micro-batches and ranks (counts summed).
struct StepStats {
    loss: f64,
    mtp_loss: Option<f64>,
    balance_loss: Option<f64>,
    /// Input tokens of the global batch, padding excluded.
    tokens: u64,
    /// Tokens per expert of every MoE block, over the global batch.
    counts: Vec<Vec<u64>>,
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
    pub(crate) metrics: Option<MetricsWriter>,
    /// This trainer's rank in a parallel run.
    pub rank: Option<RankContext>,
    pub(crate) elapsed_before: f64,
    consecutive_skips: usize,
    /// The loss scale of an f16 run ([`crate::precision`]); `None` otherwise.
    pub(crate) loss_scale: Option<LossScale>,
    /// Show a progress bar on stderr.
    pub progress: bool,
}

/// What one rank's thread returns: its trainer and last records, or its error.
pub(crate) type RankOutcome<AB> = Result<(Trainer<AB>, Option<StepRecord>, Option<EvalRecord>)>;

/// What a parallel run calls on rank 0 with each record (and the last ones seen).
pub(crate) type Observer<'a> =
    dyn Fn(&mut Option<StepRecord>, &mut Option<EvalRecord>, Event) + Sync + 'a;

/// What [`Trainer::run`] reports as it goes.
pub enum Event<'a> {
    Step(&'a StepRecord),
    Eval(&'a EvalRecord),
    Checkpoint(&'a Path),
}

impl<AB: AutodiffBackend> Trainer<AB> {
    /// The one place a trainer is put together.
    #[allow(clippy::too_many_arguments)]
    fn assemble(
        model: DeepSeekModel<AB>,
        optim: AdamW<AB::InnerBackend>,
        config: TrainConfig,
        data_config: DataConfig,
        at: Position,
        out: &Path,
        device: &AB::Device,
        metrics: Option<MetricsWriter>,
        rank: Option<RankContext>,
    ) -> Self {
        let loss_scale = match config.dtype {
            deepseek_core::WeightDtype::F16 => {
                Some(at.loss_scale.unwrap_or_else(|| LossScale::new(&config.loss_scaling)))
            }
            _ => None,
        };
        Self {
            model,
            optim,
            config,
            data_config,
            step: at.step,
            position: at.position,
            tokens: at.tokens,
            out: out.to_path_buf(),
            device: device.clone(),
            metrics,
            rank,
            elapsed_before: at.elapsed_s,
            consecutive_skips: 0,
            loss_scale,
            progress: false,
        }
    }

    /// A fresh run of `model` (already seeded and initialized) writing into `out`.
    pub fn new(
        model: DeepSeekModel<AB>,
        config: TrainConfig,
        data_config: DataConfig,
        out: &Path,
        device: &AB::Device,
    ) -> Result<Self> {
        config.validate(&model.config)?;
        config.dtype.check_supported::<AB>(device)?;
        std::fs::create_dir_all(out).map_err(|e| TrainError::io(out, e))?;
        // Draw every lazy parameter now, in a fixed order, so the run is a function of the seed.
        model.materialize();
        // Mixed precision: the weights train in `dtype`, their f32 masters live in the
        // optimizer. A LoRA base keeps the dtype it was loaded in (the adapters are f32).
        let lora = config.finetune.as_ref().is_some_and(|f| f.lora.is_some());
        let model = match config.dtype {
            dtype if lora || dtype == model.dtype() => model,
            dtype => model.cast(dtype),
        };
        let optim = AdamW::new(config.optim);
        let model = with_recipe(model, &config)?;
        let metrics = MetricsWriter::open(out, None)?;
        Ok(Self::assemble(
            model,
            optim,
            config,
            data_config,
            Position::default(),
            out,
            device,
            Some(metrics),
            None,
        ))
    }

    /// Continues from the newest checkpoint in `out`. `model_config` must equal the saved one;
    /// `config` may change the [`crate::config::RunSettings`] (the new total of `steps`, the
    /// logging and checkpoint cadence), not the recipe.
    pub fn resume(
        out: &Path,
        model_config: &DeepSeekConfig,
        config: TrainConfig,
        device: &AB::Device,
    ) -> Result<Self> {
        let Some((_, dir)) = checkpoint::latest(out) else {
            return Err(TrainError::checkpoint(
                out,
                "no checkpoint to resume from (run without --resume to start)",
            ));
        };
        let loaded = checkpoint::load::<AB>(&dir, model_config, device)?;
        let state = loaded.state;
        let merged = state.train.clone().with_run_settings(config.run_settings());
        merged.validate(model_config)?;
        let metrics = MetricsWriter::open(out, Some(state.step))?;
        let at = Position {
            step: state.step,
            position: state.position,
            tokens: state.tokens,
            elapsed_s: state.elapsed_s,
            loss_scale: state.loss_scale,
        };
        let model = with_recipe(loaded.model, &merged)?;
        Ok(Self::assemble(
            model,
            loaded.optim,
            merged,
            state.data,
            at,
            out,
            device,
            Some(metrics),
            None,
        ))
    }

    /// A copy of this trainer for another rank of a parallel run on `device`: the same weights
    /// (a fresh autodiff graph), optimizer state and position, no metrics of its own.
    pub fn replica(&self, device: &AB::Device, rank: RankContext) -> Self {
        let at = Position {
            step: self.step,
            position: self.position,
            tokens: self.tokens,
            elapsed_s: self.elapsed_before,
            loss_scale: self.loss_scale,
        };
        let model = distributed::replica(&self.model, device);
        let optim = match rank.zero1 {
            true => {
                self.optim.shard(distributed::zero1_owned(&model, rank.rank, rank.world), device)
            }
            false => self.optim.to_device(device),
        };
        Self::assemble(
            model,
            optim,
            self.config.clone(),
            self.data_config.clone(),
            at,
            &self.out,
            device,
            None,
            Some(rank),
        )
    }

    /// Under ZeRO-1, keeps only this rank's share of the optimizer state.
    pub(crate) fn shard_optimizer(&mut self) {
        if let Some(rank) = self.rank.as_ref().filter(|r| r.zero1) {
            let owned = distributed::zero1_owned(&self.model, rank.rank, rank.world);
            self.optim = self.optim.shard(owned, &self.device);
        }
    }

    /// Whether this trainer evaluates and checkpoints (rank 0, or a single run).
    pub fn is_primary(&self) -> bool {
        self.rank.as_ref().is_none_or(RankContext::is_primary)
    }

    /// This rank's place (a parallel run's trainers all have one).
    fn rank(&self) -> &RankContext {
        self.rank.as_ref().expect("a rank of a parallel run")
    }

    /// Ranks sharing each step's global batch.
    fn world(&self) -> usize {
        self.rank.as_ref().map_or(1, |r| r.world)
    }

    /// This rank's share of the global micro-batch at `position`: sequences
    /// `position + rank·b/R ..` of `b/R`.
    fn batch(
        &self,
        reader: &mut dyn BatchReader,
        seed: u64,
        position: u64,
        batch: usize,
    ) -> HostBatch {
        let per_rank = batch / self.world();
        let first = position + (self.rank.as_ref().map_or(0, |r| r.rank) * per_rank) as u64;
        reader.rows(seed, first, per_rank)
    }

    /// One optimizer step over `grad_accum` micro-batches. A run of one rank takes the step on
    /// the CPU pool's threads (`deepseek_core::pool`); the ranks of a parallel run, which wait
    /// for each other in collectives, stay on their own threads.
    pub fn train_step(&mut self, reader: &mut dyn BatchReader) -> Result<StepRecord> {
        if self.rank.is_some() {
            return self.step_here(reader);
        }
        deepseek_core::pool::on_pool::<AB, _>(|| self.step_here(reader))
    }

    /// [`Trainer::train_step`] on the calling thread.
    fn step_here(&mut self, reader: &mut dyn BatchReader) -> Result<StepRecord> {
        let start = Instant::now();
        let accumulated = self.accumulate(reader)?;
        let (grads, stats) = self.reduce(accumulated)?;
        let lr = self.config.schedule().lr(self.step);
        let grad_norm = AdamW::<AB::InnerBackend>::global_norm::<AB, _>(&self.model, &grads);
        let skipped = !self.apply(lr, grads, grad_norm, &stats)?;
        self.step += 1;
        let step_tokens = stats.tokens;
        self.tokens += step_tokens;
        let record = StepRecord {
            step: self.step,
            loss: stats.loss as f32,
            mtp_loss: stats.mtp_loss.map(|v| v as f32),
            balance_loss: stats.balance_loss.map(|v| v as f32),
            lr,
            grad_norm,
            tokens_per_s: step_tokens as f64 / start.elapsed().as_secs_f64(),
            max_vio_batch: stats.counts.iter().map(|c| max_vio(c)).fold(0.0, f64::max),
            tokens: self.tokens,
            skipped,
            loss_scale: self.loss_scale.map(|s| s.scale),
        };
        if let Some(metrics) = &mut self.metrics {
            metrics.write(&record)?;
        }
        Ok(record)
    }

    /// Forward and backward over this rank's share of `grad_accum` micro-batches: the summed
    /// gradients, and the loss sums and expert counts as one device tensor (no host read).
    fn accumulate(&mut self, reader: &mut dyn BatchReader) -> Result<Accumulated<AB>> {
        let cfg = &self.config;
        let weights = cfg.loss_weights(self.step);
        let mut accumulator = GradientsAccumulator::<DeepSeekModel<AB>>::new();
        let mut stats: Option<Tensor<AB::InnerBackend, 1>> = None;
        let (mut has_mtp, mut has_balance) = (false, false);
        let scale = self.loss_scale.map_or(1.0, |s| s.scale);
        for _ in 0..cfg.grad_accum {
            let host = self.batch(reader, cfg.seed, self.position, cfg.batch_size);
            if cfg.finetune.as_ref().and_then(|f| f.lora.as_ref()).is_some_and(|l| l.dropout > 0.0)
            {
                // LoRA dropout draws from the backend's generator: seeding it from the data
                // position makes the masks, and so a resumed run, a function of the seed (one
                // rank; ranks share the generator).
                AB::seed(
                    &self.device,
                    cfg.seed ^ self.position.wrapping_mul(0x9E37_79B9_7F4A_7C15),
                );
            }
            self.position += cfg.batch_size as u64;
            let batch = host.to_device(&self.device);
            // Each rank's loss is a mean over its share: the global mean is their average. An
            // f16 run's loss is multiplied by its scale here.
            let divisor = (cfg.grad_accum * self.world()) as f64 / scale;
            let (loss, mut grads) = if cfg.checkpoint_activations {
                checkpointed_gradients(&self.model, batch, weights, divisor)?
            } else {
                let loss = batch_objective(&self.model, batch, weights);
                let backward = loss.total.clone().div_scalar(divisor).backward();
                (loss, GradientsParams::from_grads(backward, &self.model))
            };
            // Summed over micro-batches and ranks in f32, unscaled.
            grads = widen_gradients(&self.model, grads, 1.0 / scale);
            accumulator.accumulate(&self.model, grads);
            (has_mtp, has_balance) = (loss.mtp.is_some(), loss.balance.is_some());
            let zero = || loss.main.zeros_like();
            let mut parts = vec![
                loss.main.clone(),
                loss.mtp.clone().unwrap_or_else(zero),
                loss.balance.clone().unwrap_or_else(zero),
                zero().add_scalar(host.tokens as f64),
            ];
            parts.extend(loss.counts.iter().map(|c| c.clone().float()));
            let micro = Tensor::cat(parts, 0).inner(); // [4 + Σ E]
            stats = Some(match stats {
                Some(sum) => sum + micro,
                None => micro,
            });
        }
        let stats = stats.expect("grad_accum ≥ 1 (validated)");
        Ok(Accumulated { grads: accumulator.grads(), stats, has_mtp, has_balance })
    }

    /// Sums the gradients and statistics over the ranks (one all-reduce; nothing on a single
    /// rank) and reads the statistics back: the step's one host read.
    fn reduce(&self, acc: Accumulated<AB>) -> Result<(GradientsParams, StepStats)> {
        let (grads, stats, world) = match &self.rank {
            Some(rank) => {
                let (grads, stats) =
                    distributed::all_reduce(&self.model, acc.grads, acc.stats, rank)?;
                (grads, stats, rank.world as f64)
            }
            None => (acc.grads, acc.stats, 1.0),
        };
        let values: Vec<f32> =
            stats.into_data().convert::<f32>().into_vec().expect("f32 statistics");
        let n = self.config.grad_accum as f64 * world;
        let experts = self.model.config.n_routed_experts.max(1);
        let counts = values[4..]
            .chunks(experts)
            .map(|c| c.iter().map(|&v| v.round() as u64).collect())
            .collect();
        let stats = StepStats {
            loss: values[0] as f64 / n,
            mtp_loss: acc.has_mtp.then(|| values[1] as f64 / n),
            balance_loss: acc.has_balance.then(|| values[2] as f64 / n),
            tokens: values[3].round() as u64,
            counts,
        };
        Ok((grads, stats))
    }

    /// The update: AdamW on the weights and the bias step of aux-free balancing, unless the loss
    /// or the gradient norm is not finite, where the non-finite policy stops the run or skips
    /// the update (at most 10 in a row). Returns whether the update was applied.
    fn apply(
        &mut self,
        lr: f64,
        grads: GradientsParams,
        grad_norm: f64,
        stats: &StepStats,
    ) -> Result<bool> {
        let total = stats.loss + stats.mtp_loss.unwrap_or(0.0) + stats.balance_loss.unwrap_or(0.0);
        let applies = update_applies(
            &self.config,
            self.loss_scale.as_mut(),
            &mut self.consecutive_skips,
            self.step,
            total,
            grad_norm,
        )?;
        if !applies {
            return Ok(false);
        }
        let (mut model, _) =
            self.optim.step_with_norm::<AB, _>(lr, self.model.clone(), grads, grad_norm);
        if let (Some(owned), Some(rank)) = (self.optim.owned(), &self.rank) {
            // ZeRO-1: each rank updated its share; every rank takes the others'.
            model = distributed::gather_params(model, owned, rank)?;
        }
        self.model = model;
        if updates_biases(&self.config, self.step) {
            update_model_biases(&mut self.model, &stats.counts, self.config.bias_gamma as f32);
        }
        Ok(true)
    }

    /// Loss and global MaxVio over the validation split (its first `eval_batches` batches, in
    /// file order), with the inference model (no autodiff graph).
    pub fn evaluate(&mut self, data: &dyn TrainingData) -> Result<EvalRecord> {
        // Every expert is on every rank: evaluation runs here alone, without the exchange.
        let model = self.model.valid();
        let policy = model.policy().clone().with_expert_parallel(None);
        let model = model.with_policy(policy)?;
        let record = evaluate(&model, data, &self.config, self.step)?;
        if let Some(metrics) = &mut self.metrics {
            metrics.write(&record)?;
        }
        Ok(record)
    }

    /// Writes a checkpoint of the current state.
    pub fn save_checkpoint(&self, elapsed_s: f64) -> Result<PathBuf> {
        let state = self.state(elapsed_s);
        let gathered = match &self.rank {
            Some(rank) if self.optim.owned().is_some() => {
                distributed::gather_optimizer(&self.model, &self.optim, rank)?
            }
            _ => None,
        };
        let optim = gathered.as_ref().unwrap_or(&self.optim);
        checkpoint::save(&self.out, &self.model, optim, &state, self.config.keep_checkpoints)
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
            loss_scale: self.loss_scale,
        }
    }

    /// Trains up to `config.steps`, evaluating and checkpointing on schedule, and always
    /// checkpointing (and evaluating) at the last step.
    pub fn run(&mut self, data: &dyn TrainingData, mut observer: impl FnMut(Event)) -> Result<()> {
        let start = Instant::now();
        let mut reader = data.reader(self.config.seq_len)?;
        data.validation(self.config.seq_len, 1, 1)?; // fail now, not at the first evaluation
        let bar = step_bar(self.progress, self.config.steps, self.step);
        let mut last_eval: Option<EvalRecord> = None;
        while self.step < self.config.steps {
            let record = self.train_step(reader.as_mut())?;
            observer(Event::Step(&record));
            let last = self.step == self.config.steps;
            let checkpoint = last
                || (self.config.checkpoint_every > 0
                    && self.step.is_multiple_of(self.config.checkpoint_every));
            if !self.is_primary() {
                if checkpoint && self.optim.owned().is_some() {
                    // ZeRO-1: the checkpoint gathers every rank's share of the optimizer state.
                    distributed::gather_optimizer(&self.model, &self.optim, self.rank())?;
                }
                continue;
            }
            if last
                || (self.config.eval_every > 0 && self.step.is_multiple_of(self.config.eval_every))
            {
                let eval = self.evaluate(data)?;
                observer(Event::Eval(&eval));
                last_eval = Some(eval);
            }
            bar.set_position(self.step as u64);
            bar.set_message(format!(
                "loss {:.3}{} val {} lr {:.1e} MaxVio {:.2} {:.0} tok/s",
                record.loss,
                record.mtp_loss.map(|m| format!(" mtp {m:.3}")).unwrap_or_default(),
                last_eval
                    .as_ref()
                    .map(|e| format!("{:.3}", e.val_loss))
                    .unwrap_or_else(|| "-".into()),
                record.lr,
                record.max_vio_batch,
                record.tokens_per_s,
            ));
            if checkpoint {
                let dir =
                    self.save_checkpoint(self.elapsed_before + start.elapsed().as_secs_f64())?;
                observer(Event::Checkpoint(&dir));
            }
        }
        bar.finish();
        Ok(())
    }
}

/// The non-finite policy for the update of step `step + 1`: `Ok(true)` when the total loss and
/// the gradient norm are finite (the skip streak resets), `Ok(false)` to skip the update, an
/// error to stop (policy `stop`, or more than 10 skips in a row).
pub(crate) fn finite_or_skip(
    config: &TrainConfig,
    consecutive_skips: &mut usize,
    step: usize,
    total: f64,
    grad_norm: f64,
) -> Result<bool> {
    let Some((what, value)) =
        [("loss", total), ("gradient norm", grad_norm)].into_iter().find(|(_, v)| !v.is_finite())
    else {
        *consecutive_skips = 0;
        return Ok(true);
    };
    *consecutive_skips += 1;
    if config.on_nonfinite == NonFinitePolicy::Stop || *consecutive_skips > 10 {
        return Err(TrainError::NonFinite { step: step + 1, what, value });
    }
    Ok(false)
}

/// Whether the update of step `step + 1` is applied. An f16 run whose gradients overflowed at
/// its loss scale (a finite loss, a non-finite gradient norm) skips it and halves the scale;
/// otherwise the non-finite policy decides ([`finite_or_skip`]), and an applied update is a
/// clean step of the scale.
pub(crate) fn update_applies(
    config: &TrainConfig,
    loss_scale: Option<&mut LossScale>,
    consecutive_skips: &mut usize,
    step: usize,
    total: f64,
    grad_norm: f64,
) -> Result<bool> {
    let Some(scale) = loss_scale else {
        return finite_or_skip(config, consecutive_skips, step, total, grad_norm);
    };
    if total.is_finite() && !grad_norm.is_finite() {
        scale.back_off(step + 1)?;
        return Ok(false);
    }
    let applies = finite_or_skip(config, consecutive_skips, step, total, grad_norm)?;
    if applies {
        scale.grow(&config.loss_scaling);
    }
    Ok(applies)
}

/// Whether the aux-free bias update follows the update of step `step + 1`.
pub(crate) fn updates_biases(config: &TrainConfig, step: usize) -> bool {
    config.balance == BalanceMode::AuxFree
        && config.bias_update_until.is_none_or(|until| step < until)
        && config.bias_gamma > 0.0
}

/// The steps' progress bar on stderr, at `step` of `steps` (hidden unless `show`).
pub(crate) fn step_bar(show: bool, steps: usize, step: usize) -> indicatif::ProgressBar {
    if !show {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(steps as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:30} {pos}/{len} steps [{elapsed_precise}<{eta_precise}] {msg}",
        )
        .expect("valid template"),
    );
    bar.set_position(step as u64);
    bar
}

/// The message of a panic payload (a rank thread's), for the run's error.
pub(crate) fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "panicked".into())
}

/// Adds each MoE block's `[E]` token counts to the running per-block totals (one host read per
/// block).
fn add_counts<B: burn::tensor::backend::Backend>(
    totals: &mut Vec<Vec<u64>>,
    counts: Vec<Tensor<B, 1, Int>>,
) {
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

/// Mean losses and global MaxVio of `model` over the validation split (weighted by targets,
/// so a short last batch counts for what it holds).
pub fn evaluate<B: burn::tensor::backend::Backend>(
    model: &DeepSeekModel<B>,
    data: &dyn TrainingData,
    config: &TrainConfig,
    step: usize,
) -> Result<EvalRecord> {
    let device = model.embed_tokens.weight.device();
    let batches = data.validation(config.seq_len, config.batch_size, config.eval_batches)?;
    let weights = LossWeights { mtp_lambda: 0.0, balance: BalanceMode::None, alpha: 0.0 };
    let (mut main, mut mtp, mut tokens, mut total_weight) = (0f64, None::<f64>, 0u64, 0f64);
    let mut counts: Vec<Vec<u64>> = Vec::new();
    for host in batches {
        let weight = host.target_weight();
        let loss = batch_objective(model, host.to_device(&device), weights);
        main += loss.main.into_scalar().elem::<f64>() * weight;
        if let Some(m) = loss.mtp {
            *mtp.get_or_insert(0.0) += m.into_scalar().elem::<f64>() * weight;
        }
        add_counts(&mut counts, loss.counts);
        total_weight += weight;
        tokens += host.tokens as u64;
    }
    Ok(EvalRecord {
        step,
        val_loss: main / total_weight.max(1.0),
        val_mtp_loss: mtp.map(|m| m / total_weight.max(1.0)),
        max_vio_global: counts.iter().map(|c| max_vio(c)).fold(0.0, f64::max),
        val_tokens: tokens,
    })
}
