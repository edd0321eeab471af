//! Runnable examples; see `cargo run -p deepseek-examples --example NAME`. What several
//! examples share lives here.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
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

/// Empties `out` (a previous run of the example) and creates it.
pub fn fresh_dir(out: &Path) -> Result<()> {
    if out.exists() {
        println!("== Clearing the previous run in {}", out.display());
        std::fs::remove_dir_all(out).with_context(|| format!("cannot clear {}", out.display()))?;
    }
    std::fs::create_dir_all(out)?;
    Ok(())
}

/// The pretrained model an example starts from: `base` when given, else the quickstart's
/// `runs/quickstart/hf` when it has run, else the quickstart's model pretrained here for `steps`
/// steps (in `out/pretrain`).
pub fn pretrained_base(
    base: Option<PathBuf>,
    out: &Path,
    steps: usize,
    seed: u64,
) -> Result<PathBuf> {
    Ok(match base {
        Some(dir) => dir,
        None if Path::new("runs/quickstart/hf/config.json").is_file() => {
            PathBuf::from("runs/quickstart/hf")
        }
        None => {
            println!("== No quickstart model: pretraining one for {steps} steps");
            let mut run = deepseek_train::pretrain::PretrainArgs::new(
                "small",
                out.join("pretrain"),
                quickstart_train(steps, seed),
            );
            run.model = Some(quickstart_model());
            run.progress = true;
            deepseek_train::pretrain::pretrain(&run)?.hf_dir
        }
    })
}

/// The fine-tuning examples' chat format for byte-level models: one turn per line, the newline
/// (the model's EOS) ends each, and the generation prompt `A:` leaves the answer on its line.
pub const QA_TEMPLATE: &str = "{% for message in messages %}{% if message['role'] == 'user' %}{{ 'Q: ' + message['content'] + '\\n' }}{% elif message['role'] == 'assistant' %}{{ 'A: ' + message['content'] + '\\n' }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'A:' }}{% endif %}";

/// A copy of the pretrained byte model in `pretrained` with [`QA_TEMPLATE`] as its chat
/// template, in `dir`.
pub fn qa_chat_dir(pretrained: &Path, dir: &Path) -> Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    for file in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(pretrained.join(file), dir.join(file))
            .with_context(|| format!("copying {}", pretrained.join(file).display()))?;
    }
    let config = serde_json::json!({
        "bos_token": null,
        "eos_token": "\n",
        "add_bos_token": false,
        "chat_template": QA_TEMPLATE,
    });
    std::fs::write(dir.join("tokenizer_config.json"), serde_json::to_string_pretty(&config)?)?;
    Ok(dir.to_path_buf())
}

/// Addition questions `(a, b)`.
pub type Questions = Vec<(u32, u32)>;

/// The addition questions `(a, b)` of the fine-tuning examples, a, b < 20, in a seeded shuffle:
/// 360 for training, the last 40 held out.
pub fn addition_questions(seed: u64) -> (Questions, Questions) {
    let mut all: Vec<(u32, u32)> = (0..20).flat_map(|a| (0..20).map(move |b| (a, b))).collect();
    let mut state = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
    for i in (1..all.len()).rev() {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        all.swap(i, (state % (i as u64 + 1)) as usize);
    }
    let test = all.split_off(all.len() - 40);
    (all, test)
}
