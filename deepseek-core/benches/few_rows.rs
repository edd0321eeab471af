//! The few-row kernel (`deepseek_core::few_rows::matmul`, decoding's GEMV on Flex) against Flex's
//! own `matmul`, in bytes of weight read per second, on the weight shapes of decoding: a
//! 1024 × 1024 projection, a 1024 × 512 expert and the 1024 × 32000 output head, with one and two
//! input rows, at f32, bf16 and f16. The weights cycle through a set of at least 512 MiB, so
//! they come from memory, not from the cache, as in decoding a real checkpoint.
//!
//! ```sh
//! cargo bench -p deepseek-core --bench few_rows            # --iters 3
//! ```

use std::time::Instant;

use anyhow::{bail, Context, Result};
use burn::backend::Flex;
use burn::tensor::{DType, Distribution, Tensor};

/// Bytes of weights each measurement streams through (distinct matrices, so none is cached).
const WORKING_SET: usize = 512 << 20;

fn main() -> Result<()> {
    let mut iters = 3;
    let mut args = std::env::args().skip(1).filter(|a| a != "--bench");
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--iters" => iters = args.next().context("--iters needs a value")?.parse()?,
            other => bail!("unknown flag {other} (flags: --iters N)"),
        }
    }
    let device = Default::default();
    println!("| weight | dtype | rows | few-row kernel GB/s | Flex matmul GB/s |");
    println!("|---|---|---|---|---|");
    for (k, n) in [(1024, 1024), (1024, 512), (1024, 32000)] {
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let bytes = k * n * dtype.size();
            let count = WORKING_SET.div_ceil(bytes).max(2);
            let weights: Vec<Tensor<Flex, 2>> = (0..count)
                .map(|_| {
                    Tensor::<Flex, 2>::random([k, n], Distribution::Default, &device).cast(dtype)
                })
                .collect();
            for rows in [1, 2] {
                let x = Tensor::<Flex, 2>::random([rows, k], Distribution::Default, &device)
                    .cast(dtype);
                let rate = |f: &dyn Fn(&Tensor<Flex, 2>) -> Tensor<Flex, 2>| {
                    let mut best = f64::MAX;
                    for _ in 0..=iters {
                        let start = Instant::now();
                        for w in &weights {
                            std::hint::black_box(f(w).into_data());
                        }
                        best = best.min(start.elapsed().as_secs_f64());
                    }
                    (bytes * count) as f64 / best / 1e9
                };
                let ours = rate(&|w| {
                    deepseek_core::few_rows::matmul(&x, w).expect("the kernel takes this product")
                });
                let flex = rate(&|w| x.clone().matmul(w.clone()));
                println!("| {k} × {n} | {dtype:?} | {rows} | {ours:.1} | {flex:.1} |");
            }
        }
    }
    Ok(())
}
