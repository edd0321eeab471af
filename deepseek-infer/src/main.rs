//! The `deepseek` command: check a model's logits, describe a configuration.

#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::PathBuf;

use anyhow::{Context, Result};
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use clap::{Parser, Subcommand};
use deepseek_core::{load_model, DeepSeekConfig, ForwardOptions, LoadOptions};
use deepseek_infer::backend::DeviceKind;
use deepseek_infer::{io, with_backend};

#[derive(Parser)]
#[command(name = "deepseek", version, about = "DeepSeek-V3 models in Burn")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Runs the model on `input_ids` from a safetensors file and writes the `logits`.
    Logits {
        /// Hugging Face-layout model directory (config.json + safetensors).
        #[arg(long)]
        model: PathBuf,
        /// safetensors file with `input_ids`, I64 [batch, seq].
        #[arg(long)]
        input: PathBuf,
        /// safetensors file to write `logits`, F32 [batch, seq, vocab], to.
        #[arg(long)]
        output: PathBuf,
        /// Backend: flex (CPU), wgpu or cuda.
        #[arg(long, default_value = "flex")]
        device: DeviceKind,
        /// Ignore checkpoint tensors the model does not use.
        #[arg(long)]
        allow_unused: bool,
    },
    /// Prints parameter counts and memory needs of a model or preset as `key: value` lines.
    Info {
        /// Hugging Face-layout model directory.
        #[arg(long, conflicts_with = "preset", required_unless_present = "preset")]
        model: Option<PathBuf>,
        /// A named preset: v3-671b, v2-lite-16b, tiny, small.
        #[arg(long)]
        preset: Option<String>,
    },
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Logits { model, input, output, device, allow_unused } => {
            with_backend!(device, |B, dev| logits::<B>(&model, &input, &output, &dev, allow_unused))
        }
        Command::Info { model, preset } => {
            let cfg = match (model, preset) {
                (Some(dir), _) => DeepSeekConfig::from_hf_file(&dir).with_context(|| format!("loading {}", dir.display()))?,
                (None, Some(name)) => DeepSeekConfig::preset(&name)?,
                (None, None) => unreachable!("clap requires one"),
            };
            print!("{}", info(&cfg));
            Ok(())
        }
    }
}

fn logits<B: Backend>(model_dir: &PathBuf, input: &PathBuf, output: &PathBuf, device: &B::Device, allow_unused: bool) -> Result<()> {
    let model = load_model::<B>(model_dir, device, LoadOptions { allow_unused })
        .with_context(|| format!("loading model from {}", model_dir.display()))?;
    let (ids, [batch, seq]) = io::read_ids(input, "input_ids")?;
    let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [batch, seq]), device);
    let logits = model.try_forward(ids, ForwardOptions::default())?.logits;
    let shape = logits.dims().to_vec();
    let values: Vec<f32> = logits.into_data().convert::<f32>().into_vec().map_err(|e| anyhow::anyhow!("{e:?}"))?;
    io::write_f32(output, &[("logits", &values, shape)])
}

fn info(cfg: &DeepSeekConfig) -> String {
    let p = cfg.param_count();
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    let lines = [
        ("layers", cfg.num_hidden_layers.to_string()),
        ("hidden_size", cfg.hidden_size.to_string()),
        ("attention_heads", cfg.num_attention_heads.to_string()),
        ("routed_experts", format!("{} (top-{}, {} groups keep {})", cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.n_group, cfg.topk_group)),
        ("shared_experts", cfg.n_shared_experts.to_string()),
        ("mtp_modules", cfg.num_nextn_predict_layers.to_string()),
        ("total_params", format!("{} ({:.1}B)", p.total, p.total as f64 / 1e9)),
        ("active_params", format!("{} ({:.1}B)", p.active, p.active as f64 / 1e9)),
        ("mtp_params", format!("{} ({:.1}B)", p.mtp, p.mtp as f64 / 1e9)),
        ("kv_cache_bytes_per_token", format!("{} (latent cache, bf16, all layers)", cfg.kv_cache_bytes_per_token(2))),
        ("mha_cache_bytes_per_token", format!("{} (plain multi-head cache, bf16, for comparison)", cfg.mha_cache_bytes_per_token(2))),
        ("weights_bytes_bf16", format!("{} ({:.1} GiB)", cfg.weight_bytes_bf16(), gib(cfg.weight_bytes_bf16()))),
        ("weights_bytes_fp8", format!("{} ({:.1} GiB, E4M3 + 128x128 f32 scales)", cfg.weight_bytes_fp8(), gib(cfg.weight_bytes_fp8()))),
    ];
    lines.iter().map(|(k, v)| format!("{k}: {v}\n")).collect()
}
