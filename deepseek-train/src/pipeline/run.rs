//! Training with pipeline stages as threads: `--pipeline-parallel P` over `--ranks R`.
//!
//! Rank `r` is pipeline position `p = r mod P` of column `d = ⌊r/P⌋`; the `R/P` columns split
//! the global batch (data parallel), and the ranks of one position in groups of `E` columns
//! split its routed experts (expert parallel). Every rank runs its position's operation list
//! from [`Schedule`] (the list `deepseek-train schedule` simulates) over the step's
//! `grad_accum` micro-batches:
//! - a forward receives the previous stage's output (or embeds the tokens), runs the stage's
//!   blocks and sends the output on; the last stage computes the loss (main, MTP) there;
//! - a backward receives the gradient of the stage's output, differentiates
//!   `Σ output·grad + balance terms of the stage's blocks` (the last stage: its loss), keeps
//!   the parameter gradients and sends the input's gradient back;
//! - a weight-gradient operation does nothing: Burn's autodiff computes input and weight
//!   gradients in one pass, so the split backward runs whole (the order of the schedule is kept,
//!   its zero-bubble saving is not; the simulator shows what a split backward would save);
//! - an overlapped `F&B` pair runs its forward, then its backward: on the CPU nothing overlaps.
//!
//! With activation checkpointing a forward runs its stage without an autodiff graph and keeps
//! only the input and the batch; the backward runs the stage again with its graph, then
//! differentiates it. The statistics (losses, expert loads) are the first forward's.
//!
//! Under expert parallelism the ranks of an expert-parallel group meet at a barrier before each
//! backward. Burn's autodiff holds a graph's lock for the whole backward (the all-to-alls
//! included), and a thread that ends a backward locks every graph of the process to clean up;
//! without the barrier, a rank could wait in a backward all-to-all for a peer that is still
//! waiting for its output gradient, from a rank stuck in that clean-up: a deadlock across the
//! pipeline (seen, with a debugger, before the barrier existed).
//!
//! After the last operation each gradient goes to the other ranks holding its parameter
//! (data-parallel replicas, DualPipe's mirror copy of a stage, the embedding of the first and
//! the last stage) in one all-to-all and is summed there in rank order, so every copy stays
//! bit-identical; a rank sends nothing for parameters no one else holds. A small all-reduce
//! then carries the squared gradient norm of the parameters each rank owns (their first holder)
//! with the loss sums and every MoE block's expert loads. Every rank thus computes the same
//! global gradient norm, takes the same AdamW step on its stages, and moves the biases of its
//! blocks from the global loads. Rank 0 writes the metrics. For evaluation and checkpoints the
//! stages are merged into the whole model on rank 0, so checkpoints are those of a single rank.

use std::collections::{HashMap, HashSet};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use burn::module::{AutodiffModule, Module, ModuleVisitor, Param, ParamId};
use burn::nn::EmbeddingConfig;
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Tensor, TensorData};
use deepseek_core::parallel::{Exchange, LocalExchange};
use deepseek_core::projection::Projection;
use deepseek_core::DeepSeekModel;

use super::link::{Failure, Kind, Links, Message, Tag};
pub use super::schedule::PipelineLayout;
use super::schedule::{Chunk, Op, Schedule};
use super::stage::{self, Stage};
use crate::balance::{max_vio, update_block_biases};
use crate::config::TrainConfig;
use crate::distributed::Layout;
use crate::error::{Result, TrainError};
use crate::loss::{objective_total, prediction_terms, routing_terms, BalanceMode, LossWeights};
use crate::metrics::{EvalRecord, StepRecord};
use crate::optim::AdamW;
use crate::precision::LossScale;
use crate::source::{Batch, BatchReader, TrainingData};
use crate::trainer::{Event, Observer, RankOutcome, Trainer};

/// Checks a pipeline layout against the model and the recipe before anything is written.
pub fn check(
    layout: &Layout,
    model: &deepseek_core::DeepSeekConfig,
    train: &TrainConfig,
) -> Result<()> {
    let Some(pipe) = &layout.pipeline else { return Ok(()) };
    Schedule::new(pipe.schedule, pipe.stages, train.grad_accum).map_err(|e| {
        TrainError::config("micro_batches", format!("{e} (micro-batches are --grad-accum)"))
    })?;
    stage::partition::<burn::backend::Flex>(
        model,
        pipe.stages,
        pipe.stage_layers.as_deref(),
        &Default::default(),
    )?;
    if train.fp8 {
        return Err(TrainError::config(
            "fp8",
            "FP8 training under pipeline parallelism is not supported yet",
        ));
    }
    Ok(())
}

/// A trainable parameter of the whole model: its place in visiting order and its shape.
#[derive(Debug, Clone)]
struct Slot {
    order: usize,
    shape: Vec<usize>,
}

impl Slot {
    fn len(&self) -> usize {
        self.shape.iter().product()
    }
}

/// The trainable parameters of the whole model, in visiting order.
fn trainable<B: Backend>(model: &DeepSeekModel<B>) -> HashMap<ParamId, Slot> {
    struct Visit(HashMap<ParamId, Slot>);
    impl<B: Backend> ModuleVisitor<B> for Visit {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            if param.is_require_grad() {
                let order = self.0.len();
                self.0.insert(param.id, Slot { order, shape: param.shape().dims::<D>().to_vec() });
            }
        }
    }
    let mut v = Visit(HashMap::new());
    model.visit(&mut v);
    v.0
}

/// Who holds which parameter, for the step-end exchange of gradients.
#[derive(Debug)]
struct Holders {
    slots: HashMap<ParamId, Slot>,
    /// `held[r]`: the trainable parameters rank `r` holds, in visiting order.
    held: Vec<Vec<ParamId>>,
}

impl Holders {
    /// What `rank` exchanges at every step: for each rank, the parameters both hold (in visiting
    /// order), and the parameters `rank` holds first of all ranks (it counts them in the norm).
    fn of_rank(&self, rank: usize) -> (Vec<Vec<ParamId>>, Vec<ParamId>) {
        let sets: Vec<HashSet<&ParamId>> = self.held.iter().map(|h| h.iter().collect()).collect();
        let mine = &self.held[rank];
        let shared =
            sets.iter().map(|other| mine.iter().filter(|id| other.contains(id)).copied().collect());
        let owned = mine
            .iter()
            .filter(|id| !sets[..rank].iter().any(|s| s.contains(id)))
            .copied()
            .collect();
        (shared.collect(), owned)
    }
}

/// Adds a stage's gradients into `local`, by parameter.
fn add_grads<AB: AutodiffBackend>(
    stage: &Stage<AB>,
    mut grads: GradientsParams,
    local: &mut HashMap<ParamId, Vec<f32>>,
) {
    struct Add<'a> {
        grads: &'a mut GradientsParams,
        local: &'a mut HashMap<ParamId, Vec<f32>>,
    }
    impl<AB: AutodiffBackend> ModuleVisitor<AB> for Add<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<AB, D>>) {
            let Some(g) = self.grads.remove::<AB::InnerBackend, D>(param.id) else { return };
            let values: Vec<f32> = g.into_data().convert::<f32>().into_vec().expect("f32 gradient");
            match self.local.get_mut(&param.id) {
                // The same parameter in both of a DualPipe rank's stages (the embedding).
                Some(acc) => acc.iter_mut().zip(values).for_each(|(a, v)| *a += v),
                None => {
                    self.local.insert(param.id, values);
                }
            }
        }
    }
    stage.visit(&mut Add::<'_> { grads: &mut grads, local });
}

/// A stage's gradients from the summed ones.
fn stage_grads<AB: AutodiffBackend>(
    stage: &Stage<AB>,
    summed: &HashMap<ParamId, Vec<f32>>,
    device: &AB::Device,
) -> GradientsParams {
    struct Take<'a, B: Backend> {
        out: GradientsParams,
        summed: &'a HashMap<ParamId, Vec<f32>>,
        device: B::Device,
    }
    impl<AB: AutodiffBackend> ModuleVisitor<AB> for Take<'_, AB::InnerBackend> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<AB, D>>) {
            let Some(values) = self.summed.get(&param.id) else { return };
            let t = Tensor::<AB::InnerBackend, D>::from_data(
                TensorData::new(values.clone(), param.shape().dims::<D>().to_vec()),
                &self.device,
            );
            self.out.register::<AB::InnerBackend, D>(param.id, t);
        }
    }
    let mut take =
        Take::<AB::InnerBackend> { out: GradientsParams::new(), summed, device: device.clone() };
    stage.visit(&mut take);
    take.out
}

/// A chunk between its forward and its backward.
struct InFlight<AB: AutodiffBackend> {
    /// The received input (a leaf whose gradient goes back), absent on the first stage.
    input: Option<Tensor<AB, 3>>,
    /// The output sent on, absent on the last stage.
    output: Option<Tensor<AB, 3>>,
    /// This stage's own terms of the objective, already scaled.
    objective: Option<Tensor<AB, 1>>,
    /// With activation checkpointing: the batch and the pass's shape to run the stage again in
    /// the backward (`output` and `objective` are then absent).
    recompute: Option<(Batch<AB>, PassShape)>,
}

/// What a stage pass needs to know besides the stage, the batch and the input.
#[derive(Debug, Clone, Copy)]
struct PassShape {
    /// Rows of this column's micro-batch and their tokens (padding excluded).
    rows: usize,
    tokens: usize,
    weights: LossWeights,
    /// The objective's factor: an f16 run's loss scale (else 1) over the micro-batches of the
    /// global step.
    scale: f64,
}

/// One stage's forward on a micro-batch: its output (except on the last stage), its own terms of
/// the objective scaled by `shape.scale` (the balance terms of its blocks; the last stage adds
/// the loss), and its statistics `[4 + E·blocks]` (main, MTP and balance loss, tokens, then the
/// expert loads of its MoE blocks).
fn stage_pass<B: Backend>(
    stage: &Stage<B>,
    batch: &Batch<B>,
    input: Option<Tensor<B, 3>>,
    shape: PassShape,
) -> (Option<Tensor<B, 3>>, Option<Tensor<B, 1>>, Tensor<B, 1>) {
    let [_, len] = batch.ids.dims();
    let inputs = batch.ids.clone().narrow(1, 0, len - 1);
    let packing = batch.segments.as_ref().map(|s| &s.inputs);
    let out = stage.forward(inputs, input, packing);
    let (balance, counts) =
        routing_terms(out.routing, shape.rows, batch.real.as_ref(), shape.weights);
    let device = batch.ids.device();
    let zero = || Tensor::<B, 1>::zeros([1], &device);
    let mut stats = vec![zero(), zero(), balance.clone().unwrap_or_else(zero), zero()];
    let mut objective = balance;
    if let Some(logits) = out.logits {
        let (main, mtp) = prediction_terms(
            logits,
            &out.mtp_logits,
            &batch.ids,
            batch.weights.as_ref(),
            batch.segments.as_ref(),
        );
        objective = Some(objective_total(&main, mtp.as_ref(), objective.as_ref(), shape.weights));
        stats[0] = main;
        stats[1] = mtp.unwrap_or_else(zero);
        stats[3] = zero().add_scalar(shape.tokens as f64);
    }
    stats.extend(counts.into_iter().map(|c| c.float()));
    let objective = objective.map(|o| o.mul_scalar(shape.scale));
    (out.hidden, objective, Tensor::cat(stats, 0))
}

/// One stage held by a rank: its weights, optimizer share and what the step accumulates.
struct Part<AB: AutodiffBackend> {
    stage: Stage<AB>,
    optim: AdamW<AB::InnerBackend>,
    grads: Option<GradientsAccumulator<Stage<AB>>>,
    /// `[4 + E·blocks]`: main, MTP and balance loss sums, tokens, then this stage's expert
    /// counts (summed over the step's chunks).
    stats: Option<Tensor<AB::InnerBackend, 1>>,
    /// Positions of this stage's MoE blocks among the model's.
    positions: Vec<usize>,
    inflight: HashMap<usize, InFlight<AB>>,
}

/// What a rank's thread returns: rank 0 its trainer and last records, the others nothing.
type Finished<AB> = Option<(Trainer<AB>, Option<StepRecord>, Option<EvalRecord>)>;

/// A stage's weights and optimizer share.
type Held<AB> = (Stage<AB>, AdamW<<AB as AutodiffBackend>::InnerBackend>);

/// What the ranks send rank 0 to put the model together: stage index, weights, optimizer.
type Piece<AB> = (usize, Stage<AB>, AdamW<<AB as AutodiffBackend>::InnerBackend>);

/// Everything a rank's thread owns.
struct RankRun<'a, AB: AutodiffBackend> {
    rank: usize,
    position: usize,
    column: usize,
    columns: usize,
    schedule: &'a Schedule,
    parts: Vec<Part<AB>>,
    links: Links,
    reduce: LocalExchange,
    /// This rank's expert-parallel group, for the barrier before each backward.
    experts_group: Option<Arc<dyn Exchange>>,
    holders: &'a Holders,
    /// `shared[j]`: the parameters this rank and rank `j` both hold, in visiting order.
    shared: Vec<Vec<ParamId>>,
    /// The parameters whose squared gradient this rank adds to the norm (their first holder).
    owned: Vec<ParamId>,
    experts: usize,
    moe_blocks: usize,
    has_mtp: bool,
    config: TrainConfig,
    device: AB::Device,
    /// Rank 0: the trainer (model and optimizer merged in when needed) and the pieces' inbox.
    primary: Option<(Trainer<AB>, Receiver<Piece<AB>>)>,
    pieces: Sender<Piece<AB>>,
    step: usize,
    data_position: u64,
    tokens: u64,
    consecutive_skips: usize,
    /// An f16 run's loss scale ([`crate::precision`]): every rank sees the same losses and
    /// gradient norm, so every rank moves it alike.
    loss_scale: Option<LossScale>,
    fail_at: Option<usize>,
}

/// Runs this process's ranks as pipeline stages and returns rank 0's trainer (holding the
/// merged final model) with its last records. Any rank's failure stops all of them and is the
/// run's error, naming the rank and its stage.
pub fn run<AB: AutodiffBackend>(
    primary: Trainer<AB>,
    layout: &Layout,
    devices: &[AB::Device],
    data: &dyn TrainingData,
    observe: &Observer,
) -> RankOutcome<AB> {
    let pipe = layout.pipeline.as_ref().expect("a pipeline layout");
    let stages = pipe.stages;
    let world = layout.ranks;
    let columns = world / stages;
    let config = primary.config.clone();
    let schedule = Schedule::new(pipe.schedule, stages, config.grad_accum)
        .map_err(|e| TrainError::config("micro_batches", e))?;
    let model = &primary.model;
    let ranges =
        stage::partition::<AB>(&model.config, stages, pipe.stage_layers.as_deref(), &devices[0])?;
    let whole = stage::split(model, &ranges);
    let slots = trainable(model);
    let held = (0..world)
        .map(|rank| {
            let mut ids: Vec<ParamId> = (0..schedule.directions())
                .flat_map(|dir| {
                    stage::param_ids::<AB, _>(&whole[schedule.stage(rank % stages, dir)])
                })
                .filter(|id| slots.contains_key(id))
                .collect();
            ids.sort_by_key(|id| slots[id].order);
            ids.dedup();
            ids
        })
        .collect();
    let holders = Holders { slots, held };
    let experts = model.config.n_routed_experts.max(1);
    let is_moe = |l: &deepseek_core::block::DecoderLayer<AB>| {
        matches!(l.mlp, deepseek_core::block::FeedForward::Moe(_))
    };
    let has_mtp = !model.mtp.is_empty();
    let main_moe_blocks = model.layers.iter().filter(|l| is_moe(l)).count();
    let moe_blocks = main_moe_blocks + model.mtp.iter().filter(|m| is_moe(&m.block)).count();
    // Expert-parallel groups: ranks of one position, `E` consecutive columns each.
    let ep = layout.expert_parallel;
    let mut ep_exchanges: HashMap<(usize, usize), Vec<Option<LocalExchange>>> = HashMap::new();
    let failure = Arc::new(Failure::default());
    let mut links = Links::group(world, layout.timeout, failure.clone());
    let mut reduces = LocalExchange::group(world, layout.timeout);
    let (pieces_tx, pieces_rx) = channel::<Piece<AB>>();
    let mut pieces_rx = Some(pieces_rx);
    let (step, data_position, tokens) = (primary.step, primary.position, primary.tokens);
    let loss_scale = primary.loss_scale;
    let mut primary = Some(primary);
    let mut runs = Vec::new();
    for rank in (0..world).rev() {
        let (position, column) = (rank % stages, rank / stages);
        let device = devices[rank % devices.len()].clone();
        let exchange: Option<Arc<dyn Exchange>> = (ep > 1).then(|| {
            let group = ep_exchanges.entry((position, column / ep)).or_insert_with(|| {
                LocalExchange::group(ep, layout.timeout).into_iter().map(Some).collect()
            });
            Arc::new(group[column % ep].take().expect("one endpoint per rank")) as Arc<dyn Exchange>
        });
        let template = primary.as_ref().expect("rank 0 comes last");
        let mut parts = Vec::new();
        for dir in 0..schedule.directions() {
            let s = schedule.stage(position, dir);
            let mut stage = Module::fork(whole[s].clone(), &device);
            if let Some(exchange) = &exchange {
                stage.policy = crate::distributed::expert_policy(
                    stage.policy.clone(),
                    exchange.clone(),
                    experts,
                )?;
            }
            let optim = stage::split_optimizer(&template.optim, &template.model, &stage, &device)?;
            let positions = stage.moe_positions(main_moe_blocks);
            parts.push(Part {
                stage,
                optim,
                grads: None,
                stats: None,
                positions,
                inflight: HashMap::new(),
            });
        }
        let (shared, owned) = holders.of_rank(rank);
        let primary = (rank == 0).then(|| {
            let mut trainer = primary.take().expect("rank 0's trainer");
            trainer.model = stripped(&trainer.model, &device);
            trainer.optim = AdamW::new(trainer.optim.config);
            (trainer, pieces_rx.take().expect("one inbox"))
        });
        runs.push(RankRun {
            rank,
            position,
            column,
            columns,
            schedule: &schedule,
            parts,
            links: links.pop().expect("one per rank"),
            reduce: reduces.pop().expect("one per rank"),
            experts_group: exchange.clone(),
            holders: &holders,
            shared,
            owned,
            experts,
            moe_blocks,
            has_mtp,
            config: config.clone(),
            device,
            primary,
            pieces: pieces_tx.clone(),
            step,
            data_position,
            tokens,
            consecutive_skips: 0,
            loss_scale,
            fail_at: pipe.fail_at.filter(|(r, _)| *r == rank).map(|(_, s)| s),
        });
    }
    drop(pieces_tx);
    let results: Vec<(usize, std::thread::Result<Result<Finished<AB>>>)> =
        std::thread::scope(|scope| {
            let handles: Vec<_> = runs
                .into_iter()
                .map(|mut run| {
                    let failure = failure.clone();
                    let rank = run.rank;
                    let handle = std::thread::Builder::new()
                        .name(format!("stage-rank-{rank}"))
                        .spawn_scoped(scope, move || {
                            // A panic becomes this rank's error, so that the others stop at
                            // once instead of waiting out the timeout for its messages.
                            let outcome =
                                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                                    run.train(data, observe)
                                }))
                                .unwrap_or_else(|panic| {
                                    Err(TrainError::Rank {
                                        rank,
                                        problem: format!(
                                            "panicked: {}",
                                            crate::trainer::panic_message(panic.as_ref())
                                        ),
                                    })
                                });
                            if let Err(e) = &outcome {
                                failure.set(
                                    rank,
                                    format!("pipeline stage {} of rank {rank}: {e}", run.position),
                                );
                            }
                            outcome
                        })
                        .expect("spawn a stage thread");
                    (rank, handle)
                })
                .collect();
            handles.into_iter().map(|(r, h)| (r, h.join())).collect()
        });
    let mut first = None;
    let mut panicked = None;
    for (rank, result) in results {
        match result {
            Ok(Ok(Some(done))) => first = Some(done),
            Ok(Ok(None)) | Ok(Err(_)) => {}
            Err(panic) => {
                let problem = crate::trainer::panic_message(panic.as_ref());
                panicked.get_or_insert(TrainError::Rank { rank, problem });
            }
        }
    }
    if let Some((rank, problem)) = failure.get() {
        return Err(TrainError::Rank { rank, problem });
    }
    if let Some(e) = panicked {
        return Err(e);
    }
    Ok(first.expect("rank 0 finished"))
}

/// `model` without its blocks and with placeholder tables: the frame the stages are merged into.
fn stripped<B: Backend>(model: &DeepSeekModel<B>, device: &B::Device) -> DeepSeekModel<B> {
    let mut frame = model.clone();
    frame.layers = Vec::new();
    frame.mtp = Vec::new();
    let d = model.config.hidden_size;
    frame.embed_tokens = EmbeddingConfig::new(1, d).init(device);
    frame.lm_head = Projection::new(d, 1, device);
    frame
}

impl<AB: AutodiffBackend> RankRun<'_, AB> {
    fn error(&self, problem: impl std::fmt::Display) -> TrainError {
        TrainError::Rank { rank: self.rank, problem: problem.to_string() }
    }

    /// Trains to `config.steps`; rank 0 returns its trainer and last records.
    fn train(&mut self, data: &dyn TrainingData, observe: &Observer) -> Result<Finished<AB>> {
        let start = Instant::now();
        let mut reader = data.reader(self.config.seq_len)?;
        data.validation(self.config.seq_len, 1, 1)?;
        let (mut last_step, mut last_eval) = (None, None);
        let show = self.primary.as_ref().is_some_and(|(t, _)| t.progress);
        let bar = crate::trainer::step_bar(show, self.config.steps, self.step);
        while self.step < self.config.steps {
            if self.fail_at == Some(self.step + 1) {
                return Err(self.error("injected failure"));
            }
            let record = self.train_step(reader.as_mut())?;
            let last = self.step == self.config.steps;
            let eval_now = last
                || (self.config.eval_every > 0 && self.step.is_multiple_of(self.config.eval_every));
            let save_now = last
                || (self.config.checkpoint_every > 0
                    && self.step.is_multiple_of(self.config.checkpoint_every));
            if let Some((trainer, _)) = &mut self.primary {
                if let Some(m) = &mut trainer.metrics {
                    m.write(&record)?;
                }
                observe(&mut last_step, &mut last_eval, Event::Step(&record));
                bar.set_position(self.step as u64);
                bar.set_message(format!(
                    "loss {:.3} {:.0} tok/s ({} stages)",
                    record.loss, record.tokens_per_s, self.schedule.ranks
                ));
            }
            if eval_now || save_now {
                self.gather()?;
                if let Some((trainer, _)) = &mut self.primary {
                    if eval_now {
                        let eval = trainer.evaluate(data)?;
                        observe(&mut last_step, &mut last_eval, Event::Eval(&eval));
                    }
                    if save_now {
                        let dir = trainer.save_checkpoint(
                            trainer.elapsed_before + start.elapsed().as_secs_f64(),
                        )?;
                        observe(&mut last_step, &mut last_eval, Event::Checkpoint(&dir));
                    }
                    if !last {
                        // Only the stages hold the weights between gathers.
                        trainer.model = stripped(&trainer.model, &self.device);
                        trainer.optim = AdamW::new(trainer.optim.config);
                    }
                }
            }
        }
        bar.finish();
        Ok(self.primary.take().map(|(t, _)| (t, last_step, last_eval)))
    }

    /// Sends this rank's direction-0 stage to rank 0 (column 0 only: one copy of each stage);
    /// rank 0 merges all of them into its trainer.
    fn gather(&mut self) -> Result<()> {
        if self.column == 0 {
            let part = &self.parts[0];
            let piece = (part.stage.index, part.stage.clone(), part.optim.to_device(&self.device));
            self.pieces.send(piece).map_err(|_| self.error("rank 0 has ended"))?;
        }
        let stages = self.schedule.ranks;
        let (step, position, tokens) = (self.step, self.data_position, self.tokens);
        let device = self.device.clone();
        let Some((trainer, inbox)) = &mut self.primary else { return Ok(()) };
        let mut got: Vec<Option<Held<AB>>> = (0..stages).map(|_| None).collect();
        for _ in 0..stages {
            let (s, stage, optim) =
                inbox.recv_timeout(Duration::from_secs(600)).map_err(|_| TrainError::Rank {
                    rank: 0,
                    problem: "a stage did not send its weights for the checkpoint".into(),
                })?;
            got[s] = Some((stage, optim));
        }
        let got: Vec<Held<AB>> = got.into_iter().map(|g| g.expect("every stage")).collect();
        let model = stage::merge(&trainer.model, got.iter().map(|(s, _)| s.clone()).collect());
        let pairs: Vec<(&Stage<AB>, &AdamW<AB::InnerBackend>)> =
            got.iter().map(|(s, o)| (s, o)).collect();
        trainer.optim = stage::merge_optimizer(&model, &pairs, &device)?;
        trainer.model = model;
        (trainer.step, trainer.position, trainer.tokens) = (step, position, tokens);
        trainer.loss_scale = self.loss_scale;
        Ok(())
    }

    /// One optimizer step over the schedule's micro-batches.
    fn train_step(&mut self, reader: &mut dyn BatchReader) -> Result<StepRecord> {
        let start = Instant::now();
        let weights = self.config.loss_weights(self.step);
        let ops = self.schedule.ops[self.position].clone();
        for op in ops {
            match op {
                Op::Forward(c) => self.forward(c, reader, weights)?,
                Op::Backward { chunk, .. } => self.backward(chunk)?,
                // Computed with the backward (Burn's autodiff does not split it).
                Op::Weight(_) => {}
                Op::ForwardBackward { forward, backward } => {
                    self.forward(forward, reader, weights)?;
                    self.backward(backward)?;
                }
            }
        }
        // Each gradient goes to the other ranks holding its parameter (data-parallel replicas,
        // DualPipe's mirror stage, the embedding of the first and the last stage) and is summed
        // there in rank order, so every holder gets the same bits.
        let mut local: HashMap<ParamId, Vec<f32>> = HashMap::new();
        let n_stats = 4 + self.moe_blocks * self.experts;
        let mut small = vec![0f64; 1 + n_stats]; // [Σ g² of the owned parameters, statistics]
        for part in &mut self.parts {
            if let Some(mut acc) = part.grads.take() {
                add_grads(&part.stage, acc.grads(), &mut local);
            }
            if let Some(stats) = part.stats.take() {
                let v: Vec<f32> =
                    stats.into_data().convert::<f32>().into_vec().expect("f32 statistics");
                let stats = &mut small[1..];
                for i in 0..4 {
                    stats[i] += v[i] as f64;
                }
                for (b, &pos) in part.positions.iter().enumerate() {
                    for e in 0..self.experts {
                        stats[4 + pos * self.experts + e] += v[4 + b * self.experts + e] as f64;
                    }
                }
            }
        }
        let send: Vec<Vec<f32>> = self
            .shared
            .iter()
            .map(|ids| {
                ids.iter()
                    .flat_map(|id| match local.get(id) {
                        Some(g) => g.clone(),
                        None => vec![0.0; self.holders.slots[id].len()],
                    })
                    .collect()
            })
            .collect();
        let lens: Vec<usize> = self
            .shared
            .iter()
            .map(|ids| ids.iter().map(|id| self.holders.slots[id].len()).sum())
            .collect();
        drop(local);
        let received = self
            .reduce
            .all_to_all(send, &lens)
            .map_err(|e| self.error(format!("gradient exchange failed: {e}")))?;
        let mut summed: HashMap<ParamId, Vec<f32>> = HashMap::new();
        for (ids, buffer) in self.shared.iter().zip(received) {
            let mut at = 0;
            for id in ids {
                let n = self.holders.slots[id].len();
                let part = &buffer[at..at + n];
                at += n;
                match summed.get_mut(id) {
                    Some(acc) => acc.iter_mut().zip(part).for_each(|(a, v)| *a += v),
                    None => {
                        summed.insert(*id, part.to_vec());
                    }
                }
            }
        }
        // In visiting order: the norm must not depend on a hash map's order.
        small[0] = self
            .owned
            .iter()
            .map(|id| summed[id].iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>())
            .sum();
        self.reduce
            .all_reduce_sum(&mut small)
            .map_err(|e| self.error(format!("statistics all-reduce failed: {e}")))?;
        let stats = &small[1..];
        let n = (self.config.grad_accum * self.columns) as f64;
        let (loss, mtp, balance, step_tokens) =
            (stats[0] / n, stats[1] / n, stats[2] / n, stats[3].round() as u64);
        let counts: Vec<Vec<u64>> = stats[4..]
            .chunks(self.experts)
            .map(|c| c.iter().map(|&v| v.round() as u64).collect())
            .collect();
        let grad_norm = small[0].sqrt();
        let lr = self.config.schedule().lr(self.step);
        let has_mtp = self.has_mtp;
        let has_balance =
            weights.alpha > 0.0 && weights.balance != BalanceMode::None && self.moe_blocks > 0;
        let total =
            loss + if has_mtp { mtp } else { 0.0 } + if has_balance { balance } else { 0.0 };
        let apply = crate::trainer::update_applies(
            &self.config,
            self.loss_scale.as_mut(),
            &mut self.consecutive_skips,
            self.step,
            total,
            grad_norm,
        )?;
        if apply {
            let updating = crate::trainer::updates_biases(&self.config, self.step);
            for part in &mut self.parts {
                let g = stage_grads(&part.stage, &summed, &self.device);
                let stage = part.stage.clone();
                let (stage, _) = part.optim.step_with_norm::<AB, _>(lr, stage, g, grad_norm);
                part.stage = stage;
                if updating {
                    let mine: Vec<Vec<u64>> =
                        part.positions.iter().map(|&p| counts[p].clone()).collect();
                    update_block_biases(
                        part.stage.blocks_mut(),
                        &mine,
                        self.config.bias_gamma as f32,
                    );
                }
            }
        }
        self.step += 1;
        self.data_position += (self.config.grad_accum * self.config.batch_size) as u64;
        self.tokens += step_tokens;
        Ok(StepRecord {
            step: self.step,
            loss: loss as f32,
            mtp_loss: has_mtp.then_some(mtp as f32),
            balance_loss: has_balance.then_some(balance as f32),
            lr,
            grad_norm,
            tokens_per_s: step_tokens as f64 / start.elapsed().as_secs_f64(),
            max_vio_batch: counts.iter().map(|c| max_vio(c)).fold(0.0, f64::max),
            tokens: self.tokens,
            skipped: !apply,
            loss_scale: self.loss_scale.map(|l| l.scale),
        })
    }

    /// The rank holding stage `stage` of direction `dir` in this rank's column.
    fn peer(&self, stage: usize, dir: usize) -> usize {
        self.column * self.schedule.ranks + self.schedule.rank_of(stage, dir)
    }

    fn forward(
        &mut self,
        chunk: Chunk,
        reader: &mut dyn BatchReader,
        weights: LossWeights,
    ) -> Result<()> {
        let cfg = &self.config;
        let per_column = cfg.batch_size / self.columns;
        let mb = self.schedule.micro_batch(chunk) as u64;
        let first =
            self.data_position + mb * cfg.batch_size as u64 + (self.column * per_column) as u64;
        let host = reader.rows(cfg.seed, first, per_column);
        let rows = host.rows;
        let host_tokens = host.tokens;
        let batch = host.to_device(&self.device);
        // An f16 run's loss scale multiplies the objective (not the statistics).
        let loss_scale = self.loss_scale.map_or(1.0, |l| l.scale);
        let scale = loss_scale / (cfg.grad_accum * self.columns) as f64;
        let s = self.schedule.stage(self.position, chunk.dir);
        let stages = self.schedule.ranks;
        let input = if s == 0 {
            None
        } else {
            let from = self.peer(s - 1, chunk.dir);
            let m = self.links.recv(from, Tag { kind: Kind::Activation, chunk })?;
            // In the weights' dtype, as sent (bf16 values are exact in f32).
            let dtype = self.config.dtype.dtype();
            Some(
                Tensor::<AB, 3>::from_data(
                    TensorData::new(m.values, m.dims),
                    (&self.device, dtype),
                )
                .require_grad(),
            )
        };
        let part = &mut self.parts[chunk.dir];
        let shape = PassShape { rows, tokens: host_tokens, weights, scale };
        // With activation checkpointing the forward runs without an autodiff graph: the chunk
        // keeps its input and batch, and its backward runs the stage again with one.
        let (output, objective, stats, recompute) = if self.config.checkpoint_activations {
            let inner = part.stage.valid();
            let batch_inner = host.to_device::<AB::InnerBackend>(&self.device);
            let input_inner = input.clone().map(|x| x.inner());
            let (hidden, _, stats) = stage_pass(&inner, &batch_inner, input_inner, shape);
            (hidden.map(Tensor::from_inner), None, stats, Some((batch, shape)))
        } else {
            let (hidden, objective, stats) = stage_pass(&part.stage, &batch, input.clone(), shape);
            (hidden, objective, stats.inner(), None)
        };
        part.stats = Some(match part.stats.take() {
            Some(sum) => sum + stats,
            None => stats,
        });
        if let Some(hidden) = &output {
            let dims = hidden.dims();
            let values: Vec<f32> = hidden
                .clone()
                .inner()
                .into_data()
                .convert::<f32>()
                .into_vec()
                .expect("f32 activations");
            let to = self.peer(s + 1, chunk.dir);
            self.links.send(to, Tag { kind: Kind::Activation, chunk }, Message { dims, values })?;
        }
        debug_assert!(s + 1 == stages || output.is_some());
        let output = output.filter(|_| recompute.is_none());
        let flight = InFlight { input, output, objective, recompute };
        self.parts[chunk.dir].inflight.insert(chunk.mb, flight);
        Ok(())
    }

    fn backward(&mut self, chunk: Chunk) -> Result<()> {
        let s = self.schedule.stage(self.position, chunk.dir);
        let flight =
            self.parts[chunk.dir].inflight.remove(&chunk.mb).ok_or_else(|| TrainError::Rank {
                rank: 0,
                problem: format!("backward of micro-batch {} before its forward", chunk.mb),
            })?;
        let is_last = s + 1 == self.schedule.ranks;
        // The gradient of this stage's output, from the next stage.
        let output_grad = match is_last {
            true => None,
            false => {
                let from = self.peer(s + 1, chunk.dir);
                Some(self.links.recv(from, Tag { kind: Kind::Gradient, chunk })?)
            }
        };
        if let Some(group) = &self.experts_group {
            group.all_reduce_sum(&mut [0.0]).map_err(|e| {
                self.error(format!("before the backward of micro-batch {}: {e}", chunk.mb))
            })?;
        }
        let (output, objective) = match flight.recompute {
            // Activation checkpointing: the stage again, with its graph (after the barrier: its
            // all-to-alls pair with the expert-parallel peers' recomputation). Its statistics
            // were taken by the forward, so the expert loads are not counted twice.
            Some((batch, shape)) => {
                let part = &self.parts[chunk.dir];
                let (output, objective, _) =
                    stage_pass(&part.stage, &batch, flight.input.clone(), shape);
                (output, objective)
            }
            None => (flight.output, flight.objective),
        };
        let target = match (output, output_grad) {
            (Some(output), Some(m)) => {
                let grad = Tensor::<AB, 3>::from_data(
                    TensorData::new(m.values, m.dims),
                    (&self.device, output.dtype()),
                );
                // The objective's own terms are f32; this one only carries the gradient.
                let sum = (output * grad).sum().cast(burn::tensor::FloatDType::F32);
                match objective {
                    Some(o) => sum + o,
                    None => sum,
                }
            }
            _ => objective.expect("the last stage has a loss"),
        };
        let grads = target.backward();
        if let Some(input) = &flight.input {
            let g =
                input.grad(&grads).ok_or_else(|| self.error("the stage input got no gradient"))?;
            let dims = g.dims();
            let values: Vec<f32> = g.into_data().convert::<f32>().into_vec().expect("f32 gradient");
            let to = self.peer(s - 1, chunk.dir);
            self.links.send(to, Tag { kind: Kind::Gradient, chunk }, Message { dims, values })?;
        }
        let part = &mut self.parts[chunk.dir];
        let mut params = GradientsParams::from_grads(grads, &part.stage);
        // Summed over micro-batches in f32 and unscaled ([`crate::precision`]).
        let unscale = 1.0 / self.loss_scale.map_or(1.0, |l| l.scale);
        params = crate::precision::widen_gradients(&part.stage, params, unscale);
        part.grads.get_or_insert_with(GradientsAccumulator::new).accumulate(&part.stage, params);
        Ok(())
    }
}
