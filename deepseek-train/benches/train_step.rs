//! Training-step throughput: forward + backward + AdamW (global-norm clipping, bias update) in
//! tokens per second, median over timed steps.
//!
//! `cargo bench -p deepseek-train --bench train_step -- [--preset small] [--batch 8] [--seq 128]
//! [--steps 20] [--warmup 3] [--device flex|wgpu|cuda] [--mtp-depth D] [--fp8] [--lora R]
//! [--checkpoint-activations] [--dtype f32|bf16|f16] [--config CONFIG.json]`
//!
//! `--dtype bf16|f16` trains in mixed precision: weights and activations in that dtype, f32
//! master weights and moments in AdamW, dynamic loss scaling for f16.
//!
//! `--config` takes the model's shape from a Hugging Face `config.json` instead of a preset
//! (random weights), e.g. the 296M V3-shaped model `examples/random_model` writes.
//!
//! `--lora R` times the fine-tuning step: LoRA adapters of rank R (alpha 2R) on the five MLA
//! projections of a frozen model, no weight decay (`python tests/golden/bench_train_hf.py
//! --lora R` is the same step with PEFT). `--base-dtype bf16|f16` holds the frozen base in that
//! dtype (the adapters stay f32).
//!
//! Compare with `python tests/golden/bench_train_hf.py` (PyTorch eager, same model, no MTP):
//! pass `--mtp-depth 0` for the like-for-like figure.

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::time::Instant;

use anyhow::{bail, Context, Result};
use burn::backend::Autodiff;
use burn::tensor::backend::{AutodiffBackend, Backend};
use deepseek_core::device::{run_on, BackendTask};
use deepseek_core::moe::ExpertPath;
use deepseek_core::DeepSeekConfig;
use deepseek_train::data::{prepare, DataConfig};
use deepseek_train::pretrain::DeviceKind;
use deepseek_train::source::TrainingData;
use deepseek_train::trainer::init_model;
use deepseek_train::{TrainConfig, Trainer};

struct Args {
    preset: String,
    config: Option<std::path::PathBuf>,
    batch: usize,
    seq: usize,
    steps: usize,
    warmup: usize,
    device: DeviceKind,
    mtp_depth: Option<usize>,
    expert_path: Option<ExpertPath>,
    fp8: bool,
    checkpoint_activations: bool,
    lora: Option<usize>,
    base_dtype: deepseek_core::WeightDtype,
    dtype: deepseek_core::WeightDtype,
}

fn main() -> Result<()> {
    deepseek_train::alloc::keep_freed_memory();
    let mut a = Args {
        preset: "small".into(),
        config: None,
        batch: 8,
        seq: 128,
        steps: 20,
        warmup: 3,
        device: DeviceKind::Flex,
        mtp_depth: None,
        expert_path: None,
        fp8: false,
        checkpoint_activations: false,
        lora: None,
        base_dtype: Default::default(),
        dtype: Default::default(),
    };
    let mut it = std::env::args().skip(1).filter(|s| s != "--bench");
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--preset" => a.preset = value()?,
            "--config" => a.config = Some(value()?.into()),
            "--batch" => a.batch = value()?.parse()?,
            "--seq" => a.seq = value()?.parse()?,
            "--steps" => a.steps = value()?.parse()?,
            "--warmup" => a.warmup = value()?.parse()?,
            "--device" => a.device = value()?.parse().map_err(anyhow::Error::msg)?,
            "--mtp-depth" => a.mtp_depth = Some(value()?.parse()?),
            "--fp8" => a.fp8 = true,
            "--checkpoint-activations" => a.checkpoint_activations = true,
            "--lora" => a.lora = Some(value()?.parse()?),
            "--base-dtype" => a.base_dtype = value()?.parse()?,
            "--dtype" => a.dtype = value()?.parse()?,
            "--expert-path" => {
                a.expert_path = Some(match value()?.as_str() {
                    "per-expert" => ExpertPath::PerExpert,
                    "grouped" => ExpertPath::Grouped,
                    "auto" => ExpertPath::Auto,
                    "host-per-expert" => ExpertPath::HostPerExpert,
                    other => bail!(
                    "unknown expert path `{other}`: per-expert, host-per-expert, grouped or auto"
                ),
                })
            }
            other => bail!("unknown option `{other}`"),
        }
    }
    run_on(a.device, &[], Bench(a))?
}

struct Bench(Args);

impl BackendTask for Bench {
    type Output = Result<()>;
    fn run<B: Backend>(self, devices: Vec<B::Device>) -> Result<()> {
        bench::<Autodiff<B>>(&self.0, &devices[0])
    }
}

fn bench<AB: AutodiffBackend>(a: &Args, device: &AB::Device) -> Result<()> {
    let mut model_cfg = match &a.config {
        Some(path) => DeepSeekConfig::from_hf_file(path)?,
        None => DeepSeekConfig::preset(&a.preset)?,
    };
    if let Some(d) = a.mtp_depth {
        model_cfg.num_nextn_predict_layers = d;
    }
    let dir = tempfile::tempdir()?;
    let data_cfg = DataConfig {
        builtin_bytes: (a.steps + a.warmup + 2) * a.batch * (a.seq + 1) * 2,
        ..Default::default()
    };
    let data = prepare(&dir.path().join("data"), &data_cfg)?;
    let train = TrainConfig {
        steps: a.steps + a.warmup,
        batch_size: a.batch,
        seq_len: a.seq,
        lr: 1e-3,
        eval_every: 0,
        checkpoint_every: 0,
        fp8: a.fp8,
        checkpoint_activations: a.checkpoint_activations,
        dtype: a.dtype,
        ..Default::default()
    };
    let mut model = init_model::<AB>(&model_cfg, 0, device);
    let mut train = train;
    if a.base_dtype != deepseek_core::WeightDtype::F32 && a.lora.is_none() {
        bail!("--base-dtype holds a frozen base: use it with --lora R");
    }
    if let Some(rank) = a.lora {
        model.materialize();
        model = model.cast(a.base_dtype);
        let settings =
            deepseek_core::LoraSettings { rank, alpha: 2.0 * rank as f64, ..Default::default() };
        model = model.with_lora(&deepseek_core::LoraTargets::parse("attn")?, &settings)?;
        model.materialize();
        train.optim.weight_decay = 0.0;
    }
    if let Some(path) = a.expert_path {
        let policy = model.policy().clone().with_expert_path(path);
        model = model.with_policy(policy)?;
    }
    let mut trainer = Trainer::new(model, train, data_cfg, dir.path(), device)?;
    let mut reader = data.reader(a.seq)?;
    let mut times = Vec::new();
    for i in 0..a.warmup + a.steps {
        let t = Instant::now();
        let record = trainer.train_step(reader.as_mut())?;
        let secs = t.elapsed().as_secs_f64();
        eprintln!("step {i}: {:.1} ms, loss {:.3}", secs * 1e3, record.loss);
        if i >= a.warmup {
            times.push(secs);
        }
    }
    times.sort_by(|x, y| x.total_cmp(y));
    let median = times[times.len() / 2];
    let tokens = (a.batch * a.seq) as f64;
    let name = a.config.as_ref().map_or(a.preset.clone(), |p| p.display().to_string());
    println!("preset: {name} (MTP depth {})", model_cfg.num_nextn_predict_layers);
    println!("device: {:?}", a.device);
    println!("batch: {} x {}", a.batch, a.seq);
    println!("expert_path: {:?}", a.expert_path.unwrap_or(ExpertPath::PerExpert));
    println!("gemms: {}", if a.fp8 { "fp8" } else { "f32" });
    println!(
        "lora: {}",
        a.lora.map_or("none (every weight trains)".into(), |r| format!("rank {r}"))
    );
    println!("base_dtype: {}", a.base_dtype);
    println!("dtype: {}", a.dtype);
    println!("checkpoint_activations: {}", a.checkpoint_activations);
    println!("median_step_ms: {:.1}", median * 1e3);
    println!("train_tokens_per_s: {:.0}", tokens / median);
    Ok(())
}
