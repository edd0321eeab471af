//! One supervised fine-tuning run end to end, as `deepseek-train sft` runs it: read and render
//! the conversations, load the model, attach LoRA adapters on a frozen base (or train every
//! weight), train with the pretraining loop ([`Trainer`]), and write the adapter in PEFT's layout
//! (`DIR/adapter/`) or the whole model in Hugging Face layout (`DIR/hf/`), each with the
//! tokenizer and the chat template used.

use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::module::AutodiffModule;
use burn::tensor::backend::{AutodiffBackend, Backend};
use deepseek_core::adapter::{save_adapter, save_router_biases, AdapterConfig, ROUTER_BIAS_FILE};
use deepseek_core::device::{BackendTask, DeviceKind};
use deepseek_core::{DeepSeekConfig, DeepSeekModel, LoadOptions};
use tokenizers::Tokenizer;

use crate::checkpoint;
use crate::config::{Finetune, RouterMode, TrainConfig};
use crate::data::DataConfig;
use crate::distributed::Layout;
use crate::error::{Result, TrainError};
use crate::loss::BalanceMode;
use crate::metrics::{plot, EvalRecord, StepRecord, METRICS_FILE};
use crate::sft_data::{model_template, read_examples, ReadStats, SftData, SftDataConfig};
use crate::trainer::{Event, Trainer};

/// Everything an SFT run needs besides the hyperparameters in `train` (whose `finetune` names
/// the base model, LoRA or full, and the router).
#[derive(Debug, Clone)]
pub struct SftArgs {
    /// Training JSONL files.
    pub data: Vec<PathBuf>,
    /// Validation JSONL files (default: the last 5% of the training conversations, at least 1).
    pub val_data: Vec<PathBuf>,
    pub out: PathBuf,
    pub max_len: usize,
    pub strict_length: bool,
    pub pack: bool,
    pub train_on_prompt: bool,
    /// Passes over the training rows; sets `train.steps` when given.
    pub epochs: Option<f64>,
    pub resume: bool,
    pub device: DeviceKind,
    pub device_ids: Vec<usize>,
    pub layout: Layout,
    pub progress: bool,
    pub train: TrainConfig,
}

/// What a finished run reports.
#[derive(Debug, Clone)]
pub struct SftSummary {
    pub steps: usize,
    pub tokens: u64,
    pub wall_s: f64,
    pub last_step: Option<StepRecord>,
    pub last_eval: Option<EvalRecord>,
    /// Conversations read, and those skipped as too long.
    pub read: ReadStats,
    /// Parameters that trained, and all parameters.
    pub trainable_params: usize,
    pub total_params: usize,
    /// `DIR/adapter` (LoRA) or `DIR/hf` (full).
    pub output: PathBuf,
    pub metrics: PathBuf,
    pub plot: PathBuf,
}

impl std::fmt::Display for SftSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "steps: {}", self.steps)?;
        writeln!(f, "tokens: {}", self.tokens)?;
        writeln!(f, "wall_time_s: {:.1}", self.wall_s)?;
        writeln!(
            f,
            "conversations: {} ({} skipped: longer than --max-len)",
            self.read.conversations, self.read.too_long
        )?;
        writeln!(f, "trainable_params: {} of {}", self.trainable_params, self.total_params)?;
        if let Some(s) = &self.last_step {
            writeln!(f, "train_loss: {:.4}", s.loss)?;
            writeln!(f, "tokens_per_s: {:.0}", s.tokens_per_s)?;
        }
        if let Some(e) = &self.last_eval {
            writeln!(f, "val_loss: {:.4}", e.val_loss)?;
            writeln!(f, "max_vio_global: {:.4}", e.max_vio_global)?;
        }
        writeln!(f, "metrics: {}", self.metrics.display())?;
        writeln!(f, "plot: {}", self.plot.display())?;
        write!(f, "output: {}", self.output.display())
    }
}

/// The fine-tuning defaults on top of the pretraining ones: learning rate 1e-4 for LoRA and
/// 1e-5 for full fine-tuning, 3% linear warmup, then cosine to a tenth over the rest, no weight
/// decay on adapters (PEFT/TRL practice), balancing by the router mode.
pub fn sft_defaults(lora: bool, router: RouterMode) -> TrainConfig {
    let mut c = TrainConfig {
        lr: if lora { 1e-4 } else { 1e-5 },
        decay_start: 0.03,
        decay_end: 1.0,
        final_lr: None,
        eval_every: 50,
        checkpoint_every: 100,
        ..TrainConfig::default()
    };
    c.min_lr = c.lr * 0.1;
    if lora {
        c.optim.weight_decay = 0.0;
    }
    if router == RouterMode::Frozen {
        c.balance = BalanceMode::None;
    }
    c
}

/// The warmup of `steps` steps: 3%, at least one.
pub fn warmup_for(steps: usize) -> usize {
    ((steps as f64 * 0.03).ceil() as usize).max(1)
}

fn finetune(args: &SftArgs) -> Result<&Finetune> {
    args.train.finetune.as_ref().ok_or_else(|| {
        TrainError::config("finetune", "an SFT run needs the base model (TrainConfig::finetune)")
    })
}

/// The data of a run: every file read and checked before anything is written.
pub fn load_data(args: &SftArgs) -> Result<(SftData, ReadStats)> {
    let base = &finetune(args)?.base_model;
    let tokenizer = base_tokenizer(base)?;
    let (template, _) = model_template(base)?;
    let config = SftDataConfig {
        max_len: args.max_len,
        strict_length: args.strict_length,
        train_on_prompt: args.train_on_prompt,
        pack: args.pack,
        seed: args.train.seed,
    };
    if args.data.is_empty() {
        return Err(TrainError::Data("no training data: pass --data FILE.jsonl".into()));
    }
    let (mut train, mut stats) = read_examples(&args.data, &template, &tokenizer, &config)?;
    let val = if args.val_data.is_empty() {
        if train.len() < 2 {
            return Err(TrainError::Data(
                "one conversation cannot be split into training and validation: add conversations or pass --val-data".into(),
            ));
        }
        let held = (train.len() / 20).max(1);
        train.split_off(train.len() - held)
    } else {
        let (val, val_stats) = read_examples(&args.val_data, &template, &tokenizer, &config)?;
        stats.conversations += val_stats.conversations;
        stats.too_long += val_stats.too_long;
        val
    };
    Ok((SftData::new(train, val, config)?, stats))
}

fn base_tokenizer(base: &Path) -> Result<Tokenizer> {
    let file = base.join(crate::data::TOKENIZER_FILE);
    Tokenizer::from_file(&file)
        .map_err(|e| TrainError::Data(format!("cannot load the tokenizer {}: {e}", file.display())))
}

/// Runs `args` to completion on the chosen backend.
pub fn sft(args: &SftArgs) -> Result<SftSummary> {
    struct Run<'a>(&'a SftArgs);
    impl BackendTask for Run<'_> {
        type Output = Result<SftSummary>;
        fn run<B: Backend>(self, devices: Vec<B::Device>) -> Result<SftSummary> {
            run::<burn::backend::Autodiff<B>>(self.0, &devices)
        }
    }
    deepseek_core::device::run_on(args.device, &args.device_ids, Run(args))?
}

/// The base model prepared for training: adapters on a frozen base (their initial `A` a
/// function of `seed` alone), or every weight but a frozen router.
pub fn prepare_model<AB: AutodiffBackend>(
    finetune: &Finetune,
    seed: u64,
    device: &AB::Device,
) -> Result<DeepSeekModel<AB>> {
    let model =
        deepseek_core::load_model::<AB>(&finetune.base_model, device, LoadOptions::default())?;
    Ok(match &finetune.lora {
        Some(lora) => {
            let _guard = crate::trainer::seeded::<AB>(device, seed);
            let model = model.with_lora(&lora.targets(), &lora.settings())?;
            model.materialize();
            model
        }
        None if finetune.router == RouterMode::Frozen => model.freeze_routers(),
        None => model,
    })
}

/// Trainable and total parameter counts.
pub fn count_params<B: Backend>(model: &DeepSeekModel<B>) -> (usize, usize) {
    struct Count(usize, usize);
    impl<B: Backend> burn::module::ModuleVisitor<B> for Count {
        fn visit_float<const D: usize>(
            &mut self,
            param: &burn::module::Param<burn::tensor::Tensor<B, D>>,
        ) {
            let n = param.shape().num_elements();
            self.1 += n;
            if param.val().is_require_grad() {
                self.0 += n;
            }
        }
    }
    let mut c = Count(0, 0);
    burn::module::Module::visit(model, &mut c);
    (c.0, c.1)
}

fn run<AB: AutodiffBackend>(args: &SftArgs, devices: &[AB::Device]) -> Result<SftSummary> {
    let start_time = Instant::now();
    let finetune = finetune(args)?.clone();
    let model_cfg = DeepSeekConfig::from_hf_file(&finetune.base_model)?;
    if args.max_len < 2 {
        return Err(TrainError::config("max_len", "must be at least 2"));
    }
    let (data, read) = load_data(args)?;
    let mut config = args.train.clone();
    config.seq_len = args.max_len;
    if let Some(epochs) = args.epochs {
        if !(epochs.is_finite() && epochs > 0.0) {
            return Err(TrainError::config("epochs", format!("must be positive, got {epochs}")));
        }
        let per_step = config.batch_size * config.grad_accum;
        config.steps =
            ((epochs * data.train_rows() as f64) / per_step as f64).ceil().max(1.0) as usize;
        config.warmup_steps = warmup_for(config.steps);
    }
    args.layout.validate(&model_cfg, config.batch_size)?;
    let out = &args.out;
    let device = &devices[0];
    let mut trainer = if args.resume {
        Trainer::<AB>::resume(out, &model_cfg, config.clone(), device)?
    } else {
        if let Some((step, dir)) = checkpoint::latest(out) {
            return Err(TrainError::checkpoint(&dir, format!("{} already holds a run (checkpoint at step {step}): pass --resume to continue it, or choose another --out", out.display())));
        }
        let model = prepare_model::<AB>(&finetune, config.seed, device)?;
        Trainer::new(model, config.clone(), DataConfig::default(), out, device)?
    };
    trainer.progress = args.progress;
    let (trainable_params, total_params) = count_params(&trainer.model);
    let progress = args.progress;
    let observe = |last_step: &mut Option<StepRecord>,
                   last_eval: &mut Option<EvalRecord>,
                   event: Event| match event {
        Event::Step(s) => *last_step = Some(s.clone()),
        Event::Eval(e) => {
            if progress {
                eprintln!(
                    "step {}: val_loss {:.4}, max_vio_global {:.3}",
                    e.step, e.val_loss, e.max_vio_global
                );
            }
            *last_eval = Some(e.clone());
        }
        Event::Checkpoint(_) => {}
    };
    let (trainer, last_step, last_eval) = if args.layout.is_parallel() {
        crate::pretrain::run_ranks(
            trainer,
            &args.layout,
            devices,
            args.device_ids.first().copied().unwrap_or(0),
            &data,
            &observe,
        )?
    } else {
        let (mut last_step, mut last_eval) = (None, None);
        trainer.run(&data, |event| observe(&mut last_step, &mut last_eval, event))?;
        (trainer, last_step, last_eval)
    };
    let model = trainer.model.valid();
    let model = model.clone().with_policy(model.policy().clone().with_expert_parallel(None))?;
    let output = export(&model, &finetune, out)?;
    let metrics = out.join(METRICS_FILE);
    let plot_path = out.join("loss.png");
    plot(&metrics, &plot_path, None)?;
    Ok(SftSummary {
        steps: trainer.step,
        tokens: trainer.tokens,
        wall_s: start_time.elapsed().as_secs_f64(),
        last_step,
        last_eval,
        read,
        trainable_params,
        total_params,
        output,
        metrics,
        plot: plot_path,
    })
}

/// Writes the result: `out/adapter/` (the adapter in PEFT's layout, the routers' biases when they
/// moved, and the tokenizer files) or `out/hf/` (the whole model); both with a
/// `tokenizer_config.json` holding the chat template the run trained with.
fn export<B: Backend>(
    model: &DeepSeekModel<B>,
    finetune: &Finetune,
    out: &Path,
) -> Result<PathBuf> {
    let base = &finetune.base_model;
    let dir = match &finetune.lora {
        Some(lora) => {
            let dir = out.join("adapter");
            let config = AdapterConfig::new(
                &lora.settings(),
                &lora.targets(),
                Some(base.display().to_string()),
            );
            save_adapter(model, &dir, &config)?;
            if finetune.router == RouterMode::BiasUpdate {
                save_router_biases(model, &dir.join(ROUTER_BIAS_FILE))?;
            }
            dir
        }
        None => {
            let dir = out.join("hf");
            deepseek_core::save_model(model, &dir)?;
            dir
        }
    };
    let tokenizer = base.join(crate::data::TOKENIZER_FILE);
    let copy = dir.join(crate::data::TOKENIZER_FILE);
    std::fs::copy(&tokenizer, &copy).map_err(|e| TrainError::io(&copy, e))?;
    let (_, template) = model_template(base)?;
    let config_path = base.join("tokenizer_config.json");
    let mut config: serde_json::Value = std::fs::read_to_string(&config_path)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_else(|| serde_json::json!({}));
    if config.get("chat_template").is_none() {
        // The default template (DeepSeek-V3's format) with its special tokens.
        config["bos_token"] = "<｜begin▁of▁sentence｜>".into();
        config["eos_token"] = "<｜end▁of▁sentence｜>".into();
    }
    config["chat_template"] = serde_json::Value::String(template);
    let text = serde_json::to_string_pretty(&config).expect("JSON serializes");
    deepseek_core::checkpoint::write_atomic(&dir.join("tokenizer_config.json"), text.as_bytes())?;
    Ok(dir)
}
