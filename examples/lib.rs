//! Runnable examples; see `cargo run -p deepseek-examples --example NAME`. What several
//! examples share lives here.

use deepseek_train::{BalanceMode, TrainConfig};

/// The short-run recipe of the quickstart and the load-balance experiment: the paper's AdamW
/// settings and schedule shape, with a learning rate sized for hundreds of steps (2e-3 after 30
/// warmup steps, cosine to 2e-4 over the last 40%), batches of 8 × 128 tokens.
pub fn short_run(steps: usize, seed: u64, balance: BalanceMode) -> TrainConfig {
    TrainConfig {
        steps,
        batch_size: 8,
        seq_len: 128,
        seed,
        lr: 2e-3,
        warmup_steps: 30,
        decay_start: 0.6,
        decay_end: 1.0,
        min_lr: 2e-4,
        final_lr: None,
        balance,
        ..Default::default()
    }
}
