//! Routed-expert throughput on one device: the device dispatch/combine kernels (`per-expert` on
//! wgpu and CUDA) against the host plan (`host-per-expert`: indices read back, gather and
//! scatter-add) and the padded grouped GEMM (`grouped`), forward only, tokens per second.
//!
//! ```sh
//! cargo bench -p deepseek-core --features wgpu --bench moe -- --device wgpu
//! cargo bench -p deepseek-core --bench moe                     # Flex: host paths only
//! ```
//! `--tokens 256,1024`, `--experts 64 --top-k 8 --d-model 512 --d-expert 128`, `--iters 5`.

use std::time::Instant;

use anyhow::{bail, Context, Result};
use burn::tensor::backend::Backend;
use burn::tensor::{Distribution, Tensor};
use deepseek_core::device::{run_on, BackendTask, DeviceKind};
use deepseek_core::moe::{ExpertPath, RoutedExperts, RoutedExpertsConfig};
use deepseek_core::ExecutionPolicy;

struct Args {
    device: DeviceKind,
    tokens: Vec<usize>,
    experts: usize,
    top_k: usize,
    d_model: usize,
    d_expert: usize,
    iters: usize,
}

fn parse() -> Result<Args> {
    let mut a = Args {
        device: DeviceKind::Flex,
        tokens: vec![256, 1024],
        experts: 64,
        top_k: 8,
        d_model: 512,
        d_expert: 128,
        iters: 5,
    };
    let mut it = std::env::args().skip(1).filter(|s| s != "--bench");
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--device" => a.device = value()?.parse().map_err(anyhow::Error::msg)?,
            "--tokens" => {
                a.tokens = value()?.split(',').map(str::parse).collect::<Result<_, _>>()?
            }
            "--experts" => a.experts = value()?.parse()?,
            "--top-k" => a.top_k = value()?.parse()?,
            "--d-model" => a.d_model = value()?.parse()?,
            "--d-expert" => a.d_expert = value()?.parse()?,
            "--iters" => a.iters = value()?.parse()?,
            other => bail!("unknown option `{other}`"),
        }
    }
    Ok(a)
}

fn bench<B: Backend>(a: &Args, device: &B::Device) {
    let experts: RoutedExperts<B> =
        RoutedExpertsConfig::new(a.d_model, a.d_expert, a.experts).init(device);
    println!(
        "## Routed experts on {:?}: E = {}, K = {}, D = {}, I = {} ({} iterations, median)",
        a.device, a.experts, a.top_k, a.d_model, a.d_expert, a.iters
    );
    println!("| tokens | path | time | tokens/s |");
    println!("|---|---|---|---|");
    for &t in &a.tokens {
        let x = Tensor::<B, 2>::random([t, a.d_model], Distribution::Normal(0.0, 1.0), device);
        // Top-K of random scores: distinct experts per token, roughly balanced.
        let scores = Tensor::<B, 2>::random([t, a.experts], Distribution::Default, device);
        let (weights, indices) = scores.topk_with_indices(a.top_k, 1);
        for (name, path) in [
            ("per-expert (device kernels on GPUs)", ExpertPath::PerExpert),
            ("host-per-expert", ExpertPath::HostPerExpert),
            ("grouped", ExpertPath::Grouped),
        ] {
            let run = || {
                let policy = ExecutionPolicy::default().with_expert_path(path);
                let y = experts.forward(x.clone(), indices.clone(), weights.clone(), &policy);
                B::sync(device).expect("sync");
                drop(y);
            };
            run();
            let mut times: Vec<f64> = (0..a.iters)
                .map(|_| {
                    let start = Instant::now();
                    run();
                    start.elapsed().as_secs_f64()
                })
                .collect();
            times.sort_by(f64::total_cmp);
            let median = times[times.len() / 2];
            println!("| {t} | {name} | {:.2} ms | {:.0} |", median * 1e3, t as f64 / median);
        }
    }
}

struct Bench(Args);

impl BackendTask for Bench {
    type Output = ();
    fn run<B: Backend>(self, devices: Vec<B::Device>) {
        bench::<B>(&self.0, &devices[0])
    }
}

fn main() -> Result<()> {
    let a = parse()?;
    run_on(a.device, &[], Bench(a))?;
    println!("device dispatches: {}", deepseek_core::moe::device_dispatches());
    Ok(())
}
