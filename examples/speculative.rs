//! MTP speculative decoding on a trained model: trains a preset (`small` by default) for a few hundred steps
//! on sequences with a learnable structure (arithmetic progressions modulo the vocabulary, so
//! both the next token and the one after are predictable from context), with the main loss plus
//! the MTP loss, then compares plain greedy decoding with MTP speculative decoding: acceptance
//! rate, main-model steps, tokens/s, and that both outputs are identical.
//!
//! `cargo run --release -p deepseek-examples --example speculative [-- STEPS [PRESET]]`
//!
//! This is a benchmark of the decoding machinery, not the training recipe (which comes with
//! `deepseek-train`): plain Adam, no balancing-bias updates.

use std::time::Instant;

use anyhow::Result;
use burn::backend::{Autodiff, Flex};
use burn::module::AutodiffModule;
use burn::optim::{AdamConfig, GradientsParams, Optimizer};
use burn::tensor::activation::log_softmax;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use deepseek_core::{DeepSeekConfig, ForwardOptions};
use deepseek_infer::generate::{generate, Decoding, GenerateConfig};
use deepseek_infer::speculative::speculative_greedy;

type Train = Autodiff<Flex>;

/// Deterministic pseudo-random numbers (64-bit LCG).
struct Lcg(u64);
impl Lcg {
    fn next(&mut self, n: u64) -> u64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

/// `x_t = (x_0 + k·t) mod V` with a random start and a random stride `k` in 1..=4.
fn sequence(rng: &mut Lcg, len: usize, vocab: u64) -> Vec<i64> {
    let (start, stride) = (rng.next(vocab), 1 + rng.next(4));
    (0..len as u64).map(|t| ((start + stride * t) % vocab) as i64).collect()
}

/// Mean cross-entropy of `logits` `[b, s, V]` against `targets` `[b, s]`.
fn cross_entropy<B: Backend>(logits: Tensor<B, 3>, targets: Tensor<B, 2, Int>) -> Tensor<B, 1> {
    let [b, s, v] = logits.dims();
    let logp = log_softmax(logits.reshape([b * s, v]), 1);
    let picked = logp.gather(1, targets.reshape([b * s, 1]));
    picked.mean().neg()
}

fn main() -> Result<()> {
    let steps: usize = std::env::args().nth(1).map(|s| s.parse()).transpose()?.unwrap_or(500);
    let preset = std::env::args().nth(2).unwrap_or_else(|| "small".into());
    let device = Default::default();
    let cfg = DeepSeekConfig::preset(&preset)?;
    println!("training the `{preset}` preset for {steps} steps");
    let vocab = cfg.vocab_size as u64;
    // A hand-written training loop installs the custom autodiff operations itself (the trainer
    // and the backend switch do it for theirs).
    deepseek_core::register_autodiff::<Flex>();
    let mut model = cfg.init::<Train>(&device);
    let mut optim = AdamConfig::new().init();
    let mut rng = Lcg(7);
    let (batch, len) = (16, 33);
    let start = Instant::now();
    for step in 0..steps {
        let data: Vec<i64> = (0..batch).flat_map(|_| sequence(&mut rng, len, vocab)).collect();
        let ids = Tensor::<Train, 2, Int>::from_data(TensorData::new(data, [batch, len]), &device);
        let inputs = ids.clone().narrow(1, 0, len - 1);
        let out = model.forward_with(inputs, ForwardOptions { hidden_states: false, mtp: true });
        let main_loss = cross_entropy(out.logits, ids.clone().narrow(1, 1, len - 1));
        // MTP module 1 at position i predicts token i + 2.
        let mtp_loss = cross_entropy(out.mtp_logits[0].clone(), ids.narrow(1, 2, len - 2));
        let loss = main_loss.clone() + mtp_loss.clone().mul_scalar(0.3);
        if step % 50 == 0 || step + 1 == steps {
            println!(
                "step {step:>4}: loss {:.3} (main {:.3}, mtp {:.3})",
                loss.clone().into_scalar(),
                main_loss.into_scalar(),
                mtp_loss.into_scalar()
            );
        }
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optim.step(2e-3, model, grads);
    }
    println!("trained {steps} steps in {:.1} s", start.elapsed().as_secs_f64());

    let model = model.valid();
    let mut rng = Lcg(12345);
    // Stay within the trained length (32 positions): RoPE positions never seen in training
    // degrade both the main model and the MTP module.
    let new_tokens = 24;
    let (mut plain_time, mut spec_time, mut accepted, mut drafted, mut main_steps, mut produced) =
        (0.0, 0.0, 0, 0, 0, 0);
    for _ in 0..16 {
        let prompt = sequence(&mut rng, 8, vocab);
        let cfg = GenerateConfig {
            max_new_tokens: new_tokens,
            decoding: Decoding::Greedy,
            eos_token_id: None,
            stop_sequences: vec![],
        };
        let t = Instant::now();
        let plain = generate(&model, std::slice::from_ref(&prompt), &cfg, &device)?.remove(0);
        plain_time += t.elapsed().as_secs_f64();
        let t = Instant::now();
        let spec = speculative_greedy(&model, &prompt, new_tokens, None, &device)?;
        spec_time += t.elapsed().as_secs_f64();
        assert_eq!(spec.tokens, plain, "speculative output must equal greedy output");
        accepted += spec.accepted;
        drafted += spec.drafted;
        main_steps += spec.main_steps;
        produced += spec.tokens.len();
    }
    println!("speculative_acceptance: {:.1}%", 100.0 * accepted as f64 / drafted as f64);
    println!(
        "main_model_steps: {main_steps} for {produced} tokens ({:.2} tokens per step)",
        produced as f64 / main_steps as f64
    );
    println!("plain_greedy_tokens_per_s: {:.1}", produced as f64 / plain_time);
    println!("speculative_tokens_per_s: {:.1}", produced as f64 / spec_time);
    println!("speedup: {:.2}x", plain_time / spec_time);
    Ok(())
}
