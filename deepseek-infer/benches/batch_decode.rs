//! Batched decoding over the slot cache: milliseconds per engine step and generated tokens/s at
//! several batch sizes, on a preset with random weights (Flex). The gap between batch 1 and the
//! rest is what continuous batching buys the server.
//!
//! `cargo bench -p deepseek-infer --bench batch_decode -- [--preset small] [--batches 1,4,16,64]
//! [--prompt 32] [--steps 32] [--context 2048]`

#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::time::Instant;

use anyhow::Result;
use burn::backend::Flex;
use burn::tensor::backend::Backend;
use clap::Parser;
use deepseek_core::policy::ExpertPath;
use deepseek_core::{DeepSeekConfig, ExecutionPolicy};
use deepseek_infer::engine::{Engine, Request};
use deepseek_infer::generate::Decoding;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "small")]
    preset: String,
    #[arg(long, value_delimiter = ',', default_value = "1,4,16,64")]
    batches: Vec<usize>,
    #[arg(long, default_value_t = 32)]
    prompt: usize,
    #[arg(long, default_value_t = 32)]
    steps: usize,
    /// Tokens per sequence the cache holds (default: the preset's context).
    #[arg(long)]
    context: Option<usize>,
    /// How MoE blocks run their experts: per-expert, grouped or auto.
    #[arg(long, default_value = "per-expert")]
    expert_path: String,
    /// Ignored: cargo bench passes it.
    #[arg(long, hide = true)]
    bench: bool,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let device = Default::default();
    let cfg = DeepSeekConfig::preset(&args.preset)?;
    Flex::seed(&device, 0);
    let path = match args.expert_path.as_str() {
        "per-expert" => ExpertPath::PerExpert,
        "grouped" => ExpertPath::Grouped,
        "auto" => ExpertPath::Auto,
        other => anyhow::bail!("unknown --expert-path {other}"),
    };
    let model = cfg.init::<Flex>(&device);
    model.materialize();
    let model = model.with_policy(ExecutionPolicy::default().with_expert_path(path))?;
    let context = args.context.unwrap_or(cfg.max_position_embeddings);
    for &batch in &args.batches {
        let mut engine = Engine::new(&model, batch, context, &device)?;
        for i in 0..batch {
            let prompt =
                (0..args.prompt).map(|t| ((i * 31 + t * 7) % cfg.vocab_size) as i64).collect();
            engine.add(Request {
                prompt,
                max_new_tokens: args.steps + 2,
                decoding: Decoding::Greedy,
                stop_tokens: vec![],
                stop_sequences: vec![],
            })?;
        }
        engine.step()?; // warm-up
        let start = Instant::now();
        let mut tokens = 0;
        for _ in 0..args.steps {
            tokens += engine.step()?.len();
        }
        let secs = start.elapsed().as_secs_f64();
        println!(
            "batch {batch:>3}: {:>7.2} ms/step, {:>8.1} tokens/s (context {context})",
            1e3 * secs / args.steps as f64,
            tokens as f64 / secs
        );
    }
    Ok(())
}
