//! One pretraining run end to end, as `deepseek-train pretrain` and the examples run it: resolve
//! the model, prepare the data, start (or resume), train, plot, export.

use std::fmt;
use std::path::PathBuf;
use std::time::Instant;

use burn::module::AutodiffModule;
use burn::tensor::backend::{AutodiffBackend, Backend};
use deepseek_core::config::YarnConfig;
use deepseek_core::device::BackendTask;
use deepseek_core::{DeepSeekConfig, LoadOptions};

use crate::checkpoint;
use crate::config::TrainConfig;
use crate::data::{prepare, CorpusSource, DataConfig, Dataset, TokenizerSource};
use crate::distributed::{self, Layout, RankContext, Reducer};
use crate::error::{Result, TrainError};
use crate::export::export_hf;
use crate::metrics::{plot, EvalRecord, StepRecord, METRICS_FILE};
use crate::source::TrainingData;
use crate::trainer::{Event, Observer, RankOutcome, Trainer};

pub use deepseek_core::device::DeviceKind;

/// Everything a run needs besides the hyperparameters in `train`.
#[derive(Debug, Clone)]
pub struct PretrainArgs {
    pub preset: String,
    pub out: PathBuf,
    /// `["builtin"]` or text files.
    pub corpus: Vec<String>,
    pub tokenizer: Option<PathBuf>,
    pub mtp_depth: Option<usize>,
    pub resume: bool,
    pub init_from: Option<PathBuf>,
    pub yarn_factor: Option<f64>,
    pub device: DeviceKind,
    pub builtin_bytes: Option<usize>,
    pub val_fraction: Option<f64>,
    pub train: TrainConfig,
    /// A model configuration to use instead of `preset` (examples build their own).
    pub model: Option<DeepSeekConfig>,
    /// Progress bar and per-evaluation lines on stderr.
    pub progress: bool,
    /// Device indices of `device` the ranks are placed on, round-robin (empty: the default
    /// device).
    pub device_ids: Vec<usize>,
    /// Ranks, expert parallelism and nodes (default: one rank).
    pub layout: Layout,
}

impl PretrainArgs {
    /// Defaults for a run of `preset` on the built-in corpus into `out`.
    pub fn new(preset: &str, out: impl Into<PathBuf>, train: TrainConfig) -> Self {
        Self {
            preset: preset.into(),
            out: out.into(),
            corpus: vec!["builtin".into()],
            tokenizer: None,
            mtp_depth: None,
            resume: false,
            init_from: None,
            yarn_factor: None,
            device: DeviceKind::Flex,
            builtin_bytes: None,
            val_fraction: None,
            train,
            model: None,
            progress: false,
            device_ids: Vec::new(),
            layout: Layout::default(),
        }
    }
}

/// What a finished run reports.
#[derive(Debug, Clone)]
pub struct Summary {
    pub out: PathBuf,
    pub steps: usize,
    pub tokens: u64,
    pub wall_s: f64,
    pub last_step: Option<StepRecord>,
    pub last_eval: Option<EvalRecord>,
    /// Best possible loss of the built-in corpus (nats per token).
    pub entropy: Option<f64>,
    pub hf_dir: PathBuf,
    pub plot: PathBuf,
    pub metrics: PathBuf,
    /// The configuration of the trained model.
    pub model_config: DeepSeekConfig,
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "steps: {}", self.steps)?;
        writeln!(f, "tokens: {}", self.tokens)?;
        writeln!(f, "wall_time_s: {:.1}", self.wall_s)?;
        if let Some(s) = &self.last_step {
            writeln!(f, "train_loss: {:.4}", s.loss)?;
            if let Some(m) = s.mtp_loss {
                writeln!(f, "train_mtp_loss: {m:.4}")?;
            }
        }
        if let Some(e) = &self.last_eval {
            writeln!(f, "val_loss: {:.4}", e.val_loss)?;
            if let Some(m) = e.val_mtp_loss {
                writeln!(f, "val_mtp_loss: {m:.4}")?;
            }
            writeln!(f, "max_vio_global: {:.4}", e.max_vio_global)?;
        }
        if let Some(h) = self.entropy {
            writeln!(f, "corpus_entropy: {h:.4} (the best possible loss, nats per token)")?;
        }
        writeln!(f, "metrics: {}", self.metrics.display())?;
        writeln!(f, "plot: {}", self.plot.display())?;
        write!(f, "model: {}", self.hf_dir.display())
    }
}

/// Runs `args` to completion on the chosen backend (through the one backend switch,
/// [`deepseek_core::device::run_on`], which also installs the custom autodiff operations).
pub fn pretrain(args: &PretrainArgs) -> Result<Summary> {
    struct Run<'a>(&'a PretrainArgs);
    impl BackendTask for Run<'_> {
        type Output = Result<Summary>;
        fn run<B: Backend>(self, devices: Vec<B::Device>) -> Result<Summary> {
            run::<burn::backend::Autodiff<B>>(self.0, &devices)
        }
    }
    deepseek_core::device::run_on(args.device, &args.device_ids, Run(args))?
}

/// The model configuration a run trains: the preset or the `--init-from` config, with the MTP
/// depth and YaRN factor applied.
pub fn model_config(args: &PretrainArgs) -> Result<DeepSeekConfig> {
    let mut cfg = match (&args.init_from, &args.model) {
        (Some(dir), _) => DeepSeekConfig::from_hf_file(dir)?,
        (None, Some(model)) => model.clone(),
        (None, None) => DeepSeekConfig::preset(&args.preset)?,
    };
    if let Some(d) = args.mtp_depth {
        if args.init_from.is_some() && d != cfg.num_nextn_predict_layers {
            return Err(TrainError::config(
                "mtp_depth",
                format!(
                    "--init-from model has {} MTP modules; it cannot be changed when continuing",
                    cfg.num_nextn_predict_layers
                ),
            ));
        }
        cfg.num_nextn_predict_layers = d;
    }
    if let Some(factor) = args.yarn_factor {
        if args.init_from.is_none() {
            return Err(TrainError::config(
                "yarn_factor",
                "context extension applies to a trained model: use it with --init-from",
            ));
        }
        if factor.is_nan() || factor < 1.0 {
            return Err(TrainError::config(
                "yarn_factor",
                format!("must be at least 1, got {factor}"),
            ));
        }
        // Extend from the context the model was trained with (its original one if it already
        // has YaRN), as DeepSeek-V3 §4.3 extends 4K → 32K → 128K.
        let original = cfg
            .rope
            .yarn
            .map(|y| y.original_max_position_embeddings)
            .unwrap_or(cfg.max_position_embeddings);
        let base = cfg.rope.yarn.unwrap_or(YarnConfig {
            factor: 1.0,
            original_max_position_embeddings: original,
            beta_fast: 32.0,
            beta_slow: 1.0,
            mscale_all_dim: 1.0,
            attention_factor: 1.0,
            truncate: true,
        });
        cfg.rope.yarn =
            Some(YarnConfig { factor, original_max_position_embeddings: original, ..base });
        cfg.max_position_embeddings = (original as f64 * factor).round() as usize;
    }
    cfg.validate()?;
    Ok(cfg)
}

fn data_config(args: &PretrainArgs, model: &DeepSeekConfig) -> Result<DataConfig> {
    let mut data = DataConfig { seed: args.train.seed, ..Default::default() };
    if let Some(b) = args.builtin_bytes {
        data.builtin_bytes = b;
    }
    if let Some(f) = args.val_fraction {
        if !(0.0..1.0).contains(&f) {
            return Err(TrainError::config("val_fraction", format!("must be in [0, 1), got {f}")));
        }
        data.val_fraction = f;
    }
    match args.corpus.as_slice() {
        [] => {
            return Err(TrainError::Data(
                "no corpus given: pass `--corpus builtin` or text files".into(),
            ))
        }
        [one] if one == "builtin" => {
            if args.tokenizer.is_some() {
                return Err(TrainError::config(
                    "tokenizer",
                    "the built-in corpus uses byte tokens; --tokenizer applies to --corpus files",
                ));
            }
        }
        files => {
            data.corpus = CorpusSource::Files(files.iter().map(PathBuf::from).collect());
            data.tokenizer = match &args.tokenizer {
                Some(path) => TokenizerSource::File(path.clone()),
                None => match &args.init_from {
                    // Continuing a model: keep its tokenizer.
                    Some(dir) if dir.join(crate::data::TOKENIZER_FILE).is_file() => {
                        TokenizerSource::File(dir.join(crate::data::TOKENIZER_FILE))
                    }
                    _ => TokenizerSource::TrainBpe(model.vocab_size),
                },
            };
        }
    }
    Ok(data)
}

/// The trainer of rank 0 (or of a single-rank run): fresh, resumed, or from `--init-from`.
fn start<AB: AutodiffBackend>(
    args: &PretrainArgs,
    model_cfg: &DeepSeekConfig,
    device: &AB::Device,
) -> Result<Trainer<AB>> {
    let out = &args.out;
    let existing = checkpoint::latest(out);
    let mut trainer = if args.resume {
        Trainer::<AB>::resume(out, model_cfg, args.train.clone(), device)?
    } else {
        if let Some((step, dir)) = existing {
            return Err(TrainError::checkpoint(&dir, format!("{} already holds a run (checkpoint at step {step}): pass --resume to continue it, or choose another --out", out.display())));
        }
        let data_cfg = data_config(args, model_cfg)?;
        let model = match &args.init_from {
            Some(dir) => {
                // FP8 weights are frozen: a model that trains holds them dequantized.
                let options =
                    LoadOptions::default().with_dequantize_fp8(true).with_dtype(args.train.dtype);
                let mut m = deepseek_core::load_model::<AB>(dir, device, options)?;
                // A new YaRN factor changes the rotary tables and the softmax scale only.
                if m.config != *model_cfg {
                    m.rope = deepseek_core::rope::RotaryEmbedding::new(
                        &model_cfg.rope,
                        model_cfg.qk_rope_head_dim,
                    );
                    m = with_config(m, model_cfg);
                }
                m
            }
            None => crate::trainer::init_model::<AB>(model_cfg, args.train.seed, device),
        };
        Trainer::new(model, args.train.clone(), data_cfg, out, device)?
    };
    trainer.progress = args.progress;
    Ok(trainer)
}

fn run<AB: AutodiffBackend>(args: &PretrainArgs, devices: &[AB::Device]) -> Result<Summary> {
    let start_time = Instant::now();
    let out = &args.out;
    let model_cfg = model_config(args)?;
    args.layout.validate(&model_cfg, args.train.batch_size)?;
    crate::pipeline::run::check(&args.layout, &model_cfg, &args.train)?;
    let trainer = start::<AB>(args, &model_cfg, &devices[0])?;
    let data = prepare(&out.join("data"), &trainer.data_config)?;
    check_vocab(&data, &model_cfg)?;
    let entropy = data.meta.entropy_per_token;
    let progress = args.progress;
    let observe = |last_step: &mut Option<StepRecord>,
                   last_eval: &mut Option<EvalRecord>,
                   event: Event| match event {
        Event::Step(s) => *last_step = Some(s.clone()),
        Event::Eval(e) => {
            if progress {
                let floor =
                    entropy.map(|h| format!(" (corpus entropy {h:.3})")).unwrap_or_default();
                eprintln!(
                    "step {}: val_loss {:.4}{floor}, max_vio_global {:.3}",
                    e.step, e.val_loss, e.max_vio_global
                );
            }
            *last_eval = Some(e.clone());
        }
        Event::Checkpoint(_) => {}
    };
    let (trainer, last_step, last_eval) = if args.layout.pipeline.is_some() {
        crate::pipeline::run::run(trainer, &args.layout, devices, &data, &observe)?
    } else if args.layout.is_parallel() {
        run_ranks(
            trainer,
            &args.layout,
            devices,
            args.device_ids.first().copied().unwrap_or(0),
            &data,
            &observe,
        )?
    } else {
        let mut trainer = trainer;
        let (mut last_step, mut last_eval) = (None, None);
        trainer.run(&data, |event| observe(&mut last_step, &mut last_eval, event))?;
        (trainer, last_step, last_eval)
    };
    let model = trainer.model.valid();
    let policy = model.policy().clone().with_expert_parallel(None);
    let model = model.with_policy(policy)?;
    let hf_dir = export_hf(&model, &data, out)?;
    let metrics = out.join(METRICS_FILE);
    let plot_path = out.join("loss.png");
    plot(&metrics, &plot_path, entropy)?;
    Ok(Summary {
        out: out.clone(),
        steps: trainer.step,
        tokens: trainer.tokens,
        wall_s: start_time.elapsed().as_secs_f64(),
        last_step,
        last_eval,
        entropy,
        hf_dir,
        plot: plot_path,
        metrics,
        model_config: model_cfg,
    })
}

/// Runs this process's ranks of a parallel run, one thread each, and returns rank 0's trainer
/// and last records. Any rank's error (or panic) is the run's error.
pub(crate) fn run_ranks<AB: AutodiffBackend>(
    primary: Trainer<AB>,
    layout: &Layout,
    devices: &[AB::Device],
    device_ordinal: usize,
    data: &dyn TrainingData,
    observe: &Observer,
) -> RankOutcome<AB> {
    let _turn = distributed::collective_lock();
    let (node, world_exchange) = match &layout.nodes {
        Some(nodes) => {
            (nodes.node, Some(distributed::connect(nodes, layout.timeout, device_ordinal)?))
        }
        None => (0, None),
    };
    let exchanges = match &world_exchange {
        Some(world) => vec![distributed::expert_group(world, layout.expert_parallel)?],
        None => distributed::expert_exchanges(layout),
    };
    // Each context owns its rank's barrier endpoint: when a rank's thread ends, its endpoint goes
    // with it, and the others see it gone instead of waiting.
    let mut contexts: Vec<RankContext> = distributed::barriers(layout)
        .into_iter()
        .enumerate()
        .map(|(r, barrier)| {
            let reducer = match &world_exchange {
                Some(world) => Reducer::Exchange(world.clone()),
                None => Reducer::Collective { peer: (r as u32).into(), barrier },
            };
            RankContext {
                rank: node * layout.ranks + r,
                world: layout.world(),
                reducer,
                zero1: layout.zero1,
                gradient_bucket: layout.gradient_bucket.max(1),
            }
        })
        .collect();
    let config = distributed::collective_config(layout);
    burn_collective::reset_collective::<AB::InnerBackend>();
    let others = contexts.split_off(1);
    let mut trainers: Vec<Trainer<AB>> = others
        .into_iter()
        .enumerate()
        .map(|(i, ctx)| primary.replica(&devices[(i + 1) % devices.len()], ctx))
        .collect();
    let mut primary = primary;
    primary.rank = contexts.pop();
    primary.shard_optimizer();
    trainers.insert(0, primary);
    for (t, exchange) in trainers.iter_mut().zip(exchanges) {
        t.model = distributed::with_experts(t.model.clone(), exchange)?;
    }
    let results: Vec<std::thread::Result<RankOutcome<AB>>> = std::thread::scope(|scope| {
        let handles: Vec<_> = trainers
            .into_iter()
            .enumerate()
            .map(|(r, mut trainer)| {
                let device = devices[r % devices.len()].clone();
                let config = config.clone();
                std::thread::Builder::new()
                    .name(format!("rank-{}", node * layout.ranks + r))
                    .spawn_scoped(scope, move || {
                        let peer = match &trainer.rank.as_ref().expect("set above").reducer {
                            Reducer::Collective { peer, .. } => Some(*peer),
                            Reducer::Exchange(_) => None,
                        };
                        if let Some(peer) = peer {
                            distributed::register::<AB::InnerBackend>(peer, &device, config)?;
                        }
                        let (mut last_step, mut last_eval) = (None, None);
                        let outcome = trainer
                            .run(data, |event| observe(&mut last_step, &mut last_eval, event));
                        if let Some(peer) = peer {
                            distributed::finish::<AB::InnerBackend>(peer);
                        }
                        outcome.map(|_| (trainer, last_step, last_eval))
                    })
                    .expect("spawn a rank thread")
            })
            .collect();
        handles.into_iter().map(|h| h.join()).collect()
    });
    let mut first = None;
    let mut failure: Option<TrainError> = None;
    for (r, result) in results.into_iter().enumerate() {
        let rank = node * layout.ranks + r;
        match result {
            Ok(Ok(done)) => {
                if r == 0 {
                    first = Some(done);
                }
            }
            // The first failing rank is the cause; the others usually report losing it.
            Ok(Err(e)) => {
                failure.get_or_insert(match e {
                    TrainError::Rank { .. } => e,
                    other => TrainError::Rank { rank, problem: other.to_string() },
                });
            }
            Err(panic) => {
                let problem = crate::trainer::panic_message(panic.as_ref());
                failure.get_or_insert(TrainError::Rank { rank, problem });
            }
        }
    }
    match (failure, first) {
        (Some(e), _) => Err(e),
        (None, Some(done)) => Ok(done),
        (None, None) => unreachable!("rank 0 either finished or failed"),
    }
}

/// Applies a configuration that differs only in RoPE settings (YaRN context extension): the
/// attention softmax scale follows the new `mscale`.
fn with_config<B: Backend>(
    mut model: deepseek_core::DeepSeekModel<B>,
    cfg: &DeepSeekConfig,
) -> deepseek_core::DeepSeekModel<B> {
    let scale = cfg.softmax_scale();
    for layer in model.blocks_mut() {
        layer.self_attn.softmax_scale = scale;
    }
    model.config = cfg.clone();
    model
}

fn check_vocab(data: &Dataset, cfg: &DeepSeekConfig) -> Result<()> {
    if data.meta.vocab_used as usize > cfg.vocab_size {
        return Err(TrainError::Data(format!(
            "the tokenized corpus uses ids up to {}, beyond the model's vocabulary of {} (vocab_size): use a smaller tokenizer or a larger model",
            data.meta.vocab_used - 1,
            cfg.vocab_size
        )));
    }
    Ok(())
}
