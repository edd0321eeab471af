//! Expert parallelism on one machine: the routed experts of one MoE layer spread over `N`
//! in-process ranks (threads, Flex), a training step (forward and backward) per iteration. Prints
//! the throughput and the bytes each rank sent through the all-to-alls next to the analytic
//! count from the routing: every row `(t, k)` whose expert lives on another rank crosses twice in
//! forward (dispatch and return) and twice in backward, `4·D·4` bytes, plus the `E/N` counts of
//! each peer once per forward; for uniform routing that is `T·K·(N−1)/N` remote rows per rank.
//!
//! ```sh
//! cargo bench -p deepseek-core --bench expert_parallel
//! ```
//! `--ranks 1,2,4`, `--tokens 512` (per rank), `--experts 64 --top-k 8 --d-model 512
//! --d-expert 128`, `--iters 3`.

use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use burn::backend::{Autodiff, Flex};
use burn::module::Module;
use burn::tensor::{Distribution, Tensor};
use deepseek_core::moe::{RoutedExperts, RoutedExpertsConfig};
use deepseek_core::parallel::{Exchange, ExpertParallel, LocalExchange};
use deepseek_core::ExecutionPolicy;

type AB = Autodiff<Flex>;

struct Args {
    ranks: Vec<usize>,
    tokens: usize,
    experts: usize,
    top_k: usize,
    d_model: usize,
    d_expert: usize,
    iters: usize,
}

fn parse() -> Result<Args> {
    let mut a = Args {
        ranks: vec![1, 2, 4],
        tokens: 512,
        experts: 64,
        top_k: 8,
        d_model: 512,
        d_expert: 128,
        iters: 3,
    };
    let mut it = std::env::args().skip(1).filter(|s| s != "--bench");
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--ranks" => a.ranks = value()?.split(',').map(str::parse).collect::<Result<_, _>>()?,
            "--tokens" => a.tokens = value()?.parse()?,
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

/// What one rank measured.
struct RankResult {
    seconds: Vec<f64>,
    bytes: u64,
    analytic: u64,
}

fn rank(
    a: &Args,
    experts: RoutedExperts<AB>,
    exchange: Option<LocalExchange>,
    barrier: &Barrier,
) -> RankResult {
    let device = Default::default();
    let experts = experts.fork(&device);
    let n = exchange.as_ref().map_or(1, |e| e.size());
    let me = exchange.as_ref().map_or(0, |e| e.rank());
    let exchange: Option<Arc<dyn Exchange>> = exchange.map(|e| Arc::new(e) as Arc<dyn Exchange>);
    let parallel = exchange
        .as_ref()
        .map(|e| ExpertParallel::new(e.clone(), a.experts).expect("experts divide over the ranks"));
    let policy = ExecutionPolicy::default().with_expert_parallel(parallel);
    let (mut seconds, mut analytic) = (Vec::new(), 0u64);
    let before = exchange.as_ref().map_or(0, |e| e.bytes_sent());
    for _ in 0..a.iters {
        let x =
            Tensor::<AB, 2>::random([a.tokens, a.d_model], Distribution::Normal(0.0, 1.0), &device)
                .require_grad();
        let scores = Tensor::<AB, 2>::random([a.tokens, a.experts], Distribution::Default, &device);
        let (weights, indices) = scores.topk_with_indices(a.top_k, 1);
        let ids: Vec<i64> = indices.clone().into_data().convert::<i64>().into_vec().unwrap();
        let per_rank = a.experts / n;
        let remote = ids.iter().filter(|&&e| e as usize / per_rank != me).count() as u64;
        analytic += remote * 4 * a.d_model as u64 * 4
            + if n > 1 { (n as u64 - 1) * per_rank as u64 * 8 } else { 0 };
        barrier.wait();
        let start = Instant::now();
        let y = experts.forward(x.clone(), indices, weights, &policy);
        let grads = y.sum().backward();
        let _ = x.grad(&grads).expect("dx").into_data();
        seconds.push(start.elapsed().as_secs_f64());
    }
    let bytes = exchange.as_ref().map_or(0, |e| e.bytes_sent()) - before;
    RankResult { seconds, bytes, analytic }
}

fn main() -> Result<()> {
    let a = parse()?;
    deepseek_core::register_autodiff::<Flex>();
    let device = Default::default();
    let experts: RoutedExperts<AB> =
        RoutedExpertsConfig::new(a.d_model, a.d_expert, a.experts).init(&device);
    // Draw the lazy weights once, so that every rank's clone holds the same experts.
    let _ = (experts.gate_up.weight(), experts.down.weight());
    println!(
        "## Expert parallelism on Flex (threads sharing the CPU): E = {}, K = {}, D = {}, I = {}, {} tokens per rank, forward + backward ({} iterations, median of the slowest rank)",
        a.experts, a.top_k, a.d_model, a.d_expert, a.tokens, a.iters
    );
    println!("| ranks | step time | tokens/s (all ranks) | bytes sent per rank per step | analytic (this routing) | uniform routing |");
    println!("|---|---|---|---|---|---|");
    for &n in &a.ranks {
        if a.experts % n != 0 {
            bail!("{} experts do not split over {n} ranks", a.experts);
        }
        let barrier = Barrier::new(n);
        let exchanges: Vec<Option<LocalExchange>> = if n == 1 {
            vec![None]
        } else {
            LocalExchange::group(n, Duration::from_secs(600)).into_iter().map(Some).collect()
        };
        let results: Vec<RankResult> = std::thread::scope(|s| {
            let handles: Vec<_> = exchanges
                .into_iter()
                .map(|e| {
                    let experts = experts.clone();
                    let (a, barrier) = (&a, &barrier);
                    s.spawn(move || rank(a, experts, e, barrier))
                })
                .collect();
            handles.into_iter().map(|h| h.join().expect("rank")).collect()
        });
        let mut step: Vec<f64> = (0..a.iters)
            .map(|i| results.iter().map(|r| r.seconds[i]).fold(0.0, f64::max))
            .collect();
        step.sort_by(|x, y| x.partial_cmp(y).unwrap());
        let median = step[step.len() / 2];
        let bytes = results.iter().map(|r| r.bytes).sum::<u64>() as f64 / (n * a.iters) as f64;
        let analytic =
            results.iter().map(|r| r.analytic).sum::<u64>() as f64 / (n * a.iters) as f64;
        let uniform =
            (a.tokens * a.top_k) as f64 * (n - 1) as f64 / n as f64 * 4.0 * a.d_model as f64 * 4.0
                + ((n - 1) * (a.experts / n) * 8) as f64;
        println!(
            "| {n} | {:.1} ms | {:.0} | {:.2} MB | {:.2} MB | {:.2} MB |",
            median * 1e3,
            (n * a.tokens) as f64 / median,
            bytes / 1e6,
            analytic / 1e6,
            uniform / 1e6
        );
    }
    Ok(())
}
