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
use crate::config::{Finetune, RouterMode, SftDataSettings, TrainConfig};
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
    /// Warmup steps when `epochs` sets the steps (default: 3% of them).
    pub warmup_steps: Option<usize>,
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
/// decay on adapters (PEFT/TRL practice), balancing by the router mode. The MTP loss stays on
/// for full fine-tuning (the MTP modules train and stay useful as speculative drafters) and is
/// off under LoRA, where the MTP modules are frozen and their loss would only steer the
/// main model's adapters.
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
        c.mtp_lambda = 0.0;
        c.mtp_lambda_late = 0.0;
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

/// The data settings of `args`, with the fingerprint of its files.
pub fn data_settings(args: &SftArgs) -> Result<SftDataSettings> {
    if args.data.is_empty() {
        return Err(TrainError::Data("no training data: pass --data FILE.jsonl".into()));
    }
    if args.max_len < 2 {
        return Err(TrainError::config("max_len", "must be at least 2"));
    }
    Ok(SftDataSettings {
        data: args.data.clone(),
        val_data: args.val_data.clone(),
        max_len: args.max_len,
        pack: args.pack,
        train_on_prompt: args.train_on_prompt,
        strict_length: args.strict_length,
        fingerprint: fingerprint(args.data.iter().chain(&args.val_data))?,
    })
}

/// FNV-1a (64 bit) over the bytes of `files`, in order, each followed by its length.
fn fingerprint<'a>(files: impl Iterator<Item = &'a PathBuf>) -> Result<u64> {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for file in files {
        let bytes = std::fs::read(file).map_err(|e| TrainError::io(file, e))?;
        for b in bytes.iter().copied().chain((bytes.len() as u64).to_le_bytes()) {
            h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
        }
    }
    Ok(h)
}

/// The data of a run from the model directory `base`: every file read and checked before
/// anything is written; packed (when the settings say so) in an order drawn from `seed`.
pub fn load_data(
    base: &Path,
    settings: &SftDataSettings,
    seed: u64,
) -> Result<(SftData, ReadStats)> {
    let tokenizer = base_tokenizer(base)?;
    let (template, _) = model_template(base)?;
    let config = SftDataConfig {
        max_len: settings.max_len,
        strict_length: settings.strict_length,
        train_on_prompt: settings.train_on_prompt,
        pack: settings.pack,
        seed,
    };
    let (mut train, mut stats) = read_examples(&settings.data, &template, &tokenizer, &config)?;
    let val = if settings.val_data.is_empty() {
        if train.len() < 2 {
            return Err(TrainError::Data(
                "one conversation cannot be split into training and validation: add conversations or pass --val-data".into(),
            ));
        }
        let held = (train.len() / 20).max(1);
        train.split_off(train.len() - held)
    } else {
        let (val, val_stats) = read_examples(&settings.val_data, &template, &tokenizer, &config)?;
        stats.conversations += val_stats.conversations;
        stats.too_long += val_stats.too_long;
        val
    };
    Ok((SftData::new(train, val, config)?, stats))
}

/// The recipe a run trains with: the command line's for a new run; for `--resume`, the
/// checkpoint's (with the command line's run settings), after checking that the base model,
/// the adapters, the router and the data (files, content and settings) are the ones the run
/// started with.
fn recipe(args: &SftArgs, config: TrainConfig) -> Result<TrainConfig> {
    let given = config.finetune.clone().expect("set by the caller");
    if !args.resume {
        return Ok(config);
    }
    let Some((_, dir)) = checkpoint::latest(&args.out) else {
        return Err(TrainError::checkpoint(
            &args.out,
            "no checkpoint to resume from (run without --resume to start)",
        ));
    };
    let state = checkpoint::read_state(&dir)?;
    let Some(saved) = state.train.finetune.clone() else {
        return Err(TrainError::checkpoint(&dir, "it holds a pretraining run, not a fine-tune"));
    };
    let differs = |what: &str, saved: String, given: String| {
        TrainError::checkpoint(
            &dir,
            format!("--resume continues the run as it started, but {what} differs (the run: {saved}; given: {given}): repeat the run's flags, or start a new --out"),
        )
    };
    if saved.base_model != given.base_model {
        return Err(differs(
            "--model",
            saved.base_model.display().to_string(),
            given.base_model.display().to_string(),
        ));
    }
    if saved.lora != given.lora {
        return Err(differs(
            "the adapters (--full, --lora-*)",
            format!("{:?}", saved.lora),
            format!("{:?}", given.lora),
        ));
    }
    if saved.base_dtype != given.base_dtype {
        return Err(differs("--dtype", saved.base_dtype.to_string(), given.base_dtype.to_string()));
    }
    if saved.router != given.router {
        return Err(differs(
            "--router",
            format!("{:?}", saved.router),
            format!("{:?}", given.router),
        ));
    }
    match (&saved.data, &given.data) {
        (Some(s), Some(g))
            if s.fingerprint != g.fingerprint && s.data == g.data && s.val_data == g.val_data =>
        {
            return Err(differs(
                "the data files' content",
                "as at the start".into(),
                "changed since".into(),
            ));
        }
        (Some(s), Some(g)) if s != g => {
            return Err(differs("the data or its settings (--data, --val-data, --max-len, --pack, --train-on-prompt, --strict-length)", format!("{s:?}"), format!("{g:?}")));
        }
        _ => {}
    }
    Ok(state.train.with_run_settings(config.run_settings()))
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

/// The base model prepared for training: adapters on a frozen base (the given `adapter`, or
/// fresh ones whose initial `A` is a function of `seed` alone), or every weight but a frozen
/// router.
pub fn prepare_model<AB: AutodiffBackend>(
    finetune: &Finetune,
    dtype: deepseek_core::WeightDtype,
    seed: u64,
    device: &AB::Device,
) -> Result<DeepSeekModel<AB>> {
    if finetune.lora.is_none() && finetune.adapter.is_none() && finetune.base_dtype != dtype {
        return Err(TrainError::config(
            "base_dtype",
            format!(
                "full fine-tuning holds the weights it trains in the run's dtype ({dtype}), not \
                 in the base's {}",
                finetune.base_dtype
            ),
        ));
    }
    // FP8 weights are frozen: under LoRA an FP8 base stays resident (a byte per weight, the
    // adapters in f32 beside it); a full fine-tune dequantizes it into the base dtype.
    let options = LoadOptions::default()
        .with_dtype(finetune.base_dtype)
        .with_dequantize_fp8(finetune.lora.is_none() && finetune.adapter.is_none());
    let model = deepseek_core::load_model::<AB>(&finetune.base_model, device, options)?;
    if let Some(adapter) = &finetune.adapter {
        return Ok(deepseek_core::adapter::load_adapter(model, adapter)?.freeze());
    }
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
    let mut config = args.train.clone();
    config.seq_len = args.max_len;
    let mut given = finetune(args)?.clone();
    given.data = Some(data_settings(args)?);
    config.finetune = Some(given);
    let mut config = recipe(args, config)?;
    let finetune = config.finetune.clone().expect("a fine-tuning recipe");
    let settings = finetune.data.clone().expect("the recipe names its data");
    if finetune.router == RouterMode::Frozen && config.balance == BalanceMode::AuxFree {
        return Err(TrainError::config(
            "balance",
            "aux-free balancing moves the routers' biases: use --router bias-update (or balance none)",
        ));
    }
    let model_cfg = DeepSeekConfig::from_hf_file(&finetune.base_model)?;
    let (data, read) = load_data(&finetune.base_model, &settings, config.seed)?;
    if let Some(epochs) = args.epochs {
        if !(epochs.is_finite() && epochs > 0.0) {
            return Err(TrainError::config("epochs", format!("must be positive, got {epochs}")));
        }
        let per_step = config.batch_size * config.grad_accum;
        config.steps =
            ((epochs * data.train_rows() as f64) / per_step as f64).ceil().max(1.0) as usize;
        // The warmup is part of the recipe: a resumed run keeps its own.
        if !args.resume {
            config.warmup_steps = args.warmup_steps.unwrap_or_else(|| warmup_for(config.steps));
        }
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
        let model = prepare_model::<AB>(&finetune, config.dtype, config.seed, device)?;
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
pub(crate) fn export<B: Backend>(
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
    // `model_template` read this file (or found none) the same way.
    let mut config: serde_json::Value = match std::fs::read_to_string(&config_path) {
        Ok(text) => serde_json::from_str(&text)
            .map_err(|e| TrainError::Data(format!("{}: {e}", config_path.display())))?,
        // No file: training used the default template with DeepSeek-V3's special tokens.
        Err(_) => serde_json::json!({
            "bos_token": "<｜begin▁of▁sentence｜>",
            "eos_token": "<｜end▁of▁sentence｜>",
        }),
    };
    config["chat_template"] = serde_json::Value::String(template);
    let text = serde_json::to_string_pretty(&config).expect("JSON serializes");
    deepseek_core::checkpoint::write_atomic(&dir.join("tokenizer_config.json"), text.as_bytes())?;
    Ok(dir)
}
