//! Forward-pass throughput: tokens per second of a full forward (logits for every position) on a
//! preset with random weights, median of several timed runs after warm-up.
//!
//! `cargo bench -p deepseek-infer --bench forward -- [--preset small] [--batch 8] [--seq 128]
//! [--runs 10] [--device flex|wgpu|cuda]`. `tests/golden/bench_hf.py` times transformers on the
//! same configuration for comparison.

#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::time::Instant;

use anyhow::Result;
use burn::tensor::backend::Backend;
use burn::tensor::{Distribution, Int, Tensor};
use clap::Parser;
use deepseek_core::device::{run_on, BackendTask, DeviceKind};
use deepseek_core::moe::ExpertPath;
use deepseek_core::{DeepSeekConfig, ExecutionPolicy};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "small")]
    preset: String,
    #[arg(long, default_value_t = 8)]
    batch: usize,
    #[arg(long, default_value_t = 128)]
    seq: usize,
    #[arg(long, default_value_t = 10)]
    runs: usize,
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    #[arg(long, default_value = "flex")]
    device: DeviceKind,
    /// How MoE blocks run their experts: per-expert, host-per-expert, grouped or auto.
    #[arg(long, default_value = "per-expert")]
    expert_path: String,
    /// Ignored: cargo bench passes it.
    #[arg(long, hide = true)]
    bench: bool,
}

fn run<B: Backend>(args: &Args, device: &B::Device) -> Result<()> {
    let cfg = DeepSeekConfig::preset(&args.preset)?;
    let path = match args.expert_path.as_str() {
        "per-expert" => ExpertPath::PerExpert,
        "grouped" => ExpertPath::Grouped,
        "auto" => ExpertPath::Auto,
        "host-per-expert" => ExpertPath::HostPerExpert,
        other => anyhow::bail!(
            "unknown --expert-path `{other}`: per-expert, host-per-expert, grouped or auto"
        ),
    };
    let model =
        cfg.init::<B>(device).with_policy(ExecutionPolicy::default().with_expert_path(path))?;
    let ids = Tensor::<B, 2>::random(
        [args.batch, args.seq],
        Distribution::Uniform(0.0, cfg.vocab_size as f64),
        device,
    )
    .int();
    let step = |ids: Tensor<B, 2, Int>| {
        // On the CPU pool's threads, as the CLI runs it (`deepseek_core::pool`).
        let logits = deepseek_core::pool::on_pool::<B, _>(|| model.forward(ids));
        // Reading one value back waits for asynchronous backends to finish.
        let _ = logits.slice([0..1, 0..1, 0..1]).into_data();
    };
    // Progress on stderr: GPU backends compile and autotune kernels during the first runs, which
    // can take minutes; a run cut short by a timeout still shows how far it got.
    for i in 0..args.warmup {
        let start = Instant::now();
        step(ids.clone());
        eprintln!("warmup {i}: {:.1} ms", start.elapsed().as_secs_f64() * 1e3);
    }
    let mut times = Vec::with_capacity(args.runs);
    for i in 0..args.runs {
        let start = Instant::now();
        step(ids.clone());
        times.push(start.elapsed().as_secs_f64());
        eprintln!("run {i}: {:.1} ms", times[i] * 1e3);
    }
    times.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let median = times[times.len() / 2];
    let tokens = (args.batch * args.seq) as f64;
    println!("preset: {}", args.preset);
    println!("device: {}", args.device);
    println!("expert_path: {}", args.expert_path);
    println!("batch_x_seq: {}x{}", args.batch, args.seq);
    println!("params: {}", cfg.param_count().total + cfg.param_count().mtp);
    println!("forward_median_ms: {:.2}", median * 1e3);
    println!("forward_min_ms: {:.2}", times[0] * 1e3);
    println!("forward_tokens_per_s: {:.0}", tokens / median);
    Ok(())
}

struct Bench(Args);

impl BackendTask for Bench {
    type Output = Result<()>;
    fn run<B: Backend>(self, devices: Vec<B::Device>) -> Result<()> {
        run::<B>(&self.0, &devices[0])
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    run_on(args.device, &[], Bench(args))?
}
