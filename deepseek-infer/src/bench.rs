//! `deepseek bench`: prefill and decode throughput over the latent KV cache, for a preset with
//! random weights or a model directory, and the measured cache size per token.

use std::time::Instant;

use anyhow::Result;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use deepseek_core::pool::on_pool;
use deepseek_core::{AttentionPath, DeepSeekModel, LatentCache};

use crate::generate::argmax;

/// What one benchmark run measured.
#[derive(Debug, Clone)]
pub struct BenchReport {
    pub prompt_tokens: usize,
    pub new_tokens: usize,
    pub prefill_tokens_per_s: f64,
    pub decode_tokens_per_s: f64,
    pub kv_bytes_per_token: usize,
}

/// Prefills `prompt_tokens` pseudo-random tokens, then decodes `new_tokens` greedily on `path`,
/// timing both phases (the best of `repeats` runs, after one warm-up run).
pub fn run<B: Backend>(
    model: &DeepSeekModel<B>,
    prompt_tokens: usize,
    new_tokens: usize,
    path: AttentionPath,
    repeats: usize,
    device: &B::Device,
) -> Result<BenchReport> {
    let vocab = model.config.vocab_size as u64;
    // A fixed LCG: the same prompt on every backend and run.
    let mut state = 0x2545F4914F6CDD1Du64;
    let prompt: Vec<i64> = (0..prompt_tokens)
        .map(|_| {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((state >> 33) % vocab) as i64
        })
        .collect();
    let mut best = (f64::MAX, f64::MAX, 0);
    for _ in 0..repeats + 1 {
        let mut cache = LatentCache::new(&model.config, 1, prompt_tokens + new_tokens, device)?;
        let ids = Tensor::<B, 2, Int>::from_data(
            TensorData::new(prompt.clone(), [1, prompt_tokens]),
            device,
        );
        let start = Instant::now();
        // As `generate` runs them: each forward on the CPU pool's threads.
        let logits =
            on_pool::<B, _>(|| model.forward_cached(ids, &mut cache, AttentionPath::Naive))?.logits;
        let mut next = argmax(
            &logits
                .narrow(1, prompt_tokens - 1, 1)
                .into_data()
                .convert::<f32>()
                .into_vec::<f32>()
                .expect("f32"),
        );
        let prefill = start.elapsed().as_secs_f64();
        let start = Instant::now();
        for _ in 0..new_tokens {
            let step = Tensor::<B, 2, Int>::from_data(TensorData::new(vec![next], [1, 1]), device);
            let logits = on_pool::<B, _>(|| model.forward_cached(step, &mut cache, path))?.logits;
            next = argmax(&logits.into_data().convert::<f32>().into_vec::<f32>().expect("f32"));
        }
        let decode = start.elapsed().as_secs_f64();
        best = (best.0.min(prefill), best.1.min(decode), cache.bytes_per_token());
    }
    Ok(BenchReport {
        prompt_tokens,
        new_tokens,
        prefill_tokens_per_s: prompt_tokens as f64 / best.0,
        decode_tokens_per_s: new_tokens as f64 / best.1,
        kv_bytes_per_token: best.2,
    })
}

/// The memory's read bandwidth in bytes per second: the best of five sums over a 1 GiB buffer
/// on all of the thread pool's threads (as decoding reads weights), after one pass that faults
/// the pages in. What decoding at batch 1 can reach at most is this over the bytes each token
/// reads ([`deepseek_core::DeepSeekConfig::decode_read_params`]).
pub fn read_bandwidth() -> f64 {
    use rayon::prelude::*;
    const LEN: usize = 1 << 28; // f32 values: 1 GiB
    let data = vec![1f32; LEN];
    let sum = || {
        data.par_chunks(1 << 16)
            .map(|chunk| {
                // Sixteen independent sums, so the loop is bound by loads, not by one add chain.
                let mut acc = [0f32; 16];
                for block in chunk.chunks_exact(16) {
                    for (a, v) in acc.iter_mut().zip(block) {
                        *a += v;
                    }
                }
                acc.iter().sum::<f32>()
            })
            .sum::<f32>()
    };
    std::hint::black_box(sum());
    let mut best = f64::MAX;
    for _ in 0..5 {
        let start = Instant::now();
        std::hint::black_box(sum());
        best = best.min(start.elapsed().as_secs_f64());
    }
    (LEN * std::mem::size_of::<f32>()) as f64 / best
}
