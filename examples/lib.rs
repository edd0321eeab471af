//! Runnable examples; see `cargo run -p deepseek-examples --example NAME`. What several
//! examples share lives here.

use deepseek_core::DeepSeekConfig;
use deepseek_train::{BalanceMode, TrainConfig};

/// The quickstart's model: the `small` benchmark model with a byte vocabulary: hidden 256, 4
/// blocks (1 dense + 3 MoE with 16 routed experts top-4 in 4 groups, 2 shared), MLA with q-LoRA
/// 64 / KV-LoRA 32, one MTP module. About 6.7M parameters.
pub fn quickstart_model() -> DeepSeekConfig {
    DeepSeekConfig {
        vocab_size: 256,
        max_position_embeddings: 1024,
        num_nextn_predict_layers: 1,
        ..DeepSeekConfig::small()
    }
}

/// The quickstart's recipe: [`short_run`] with aux-free balancing, evaluation every 100 steps.
pub fn quickstart_train(steps: usize, seed: u64) -> TrainConfig {
    TrainConfig {
        eval_every: 100,
        eval_batches: 16,
        checkpoint_every: 250,
        ..short_run(steps, seed, BalanceMode::AuxFree)
    }
}

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
