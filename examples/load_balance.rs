//! The auxiliary-loss-free balancing experiment (Wang et al. 2024, Table 1; DeepSeek-V3
//! §2.1.2): the same small model trained three times on the same data with the same seed,
//! balanced by (1) the per-expert selection bias updated by ±γ after every step, plus the tiny
//! sequence-wise loss (aux-free), (2) the classic auxiliary loss with α = 0.001 (aux-loss), and
//! (3) nothing (none). Prints validation loss and MaxVio_global (expert-load imbalance over the
//! whole validation set) for each, as a Markdown table.
//!
//! ```sh
//! cargo run --release -p deepseek-examples --example load_balance [-- --steps 1000 --gamma 0.001 --seed 0 --modes aux-free,aux-loss,none]
//! ```

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use deepseek_core::DeepSeekConfig;
use deepseek_train::metrics::read_metrics;
use deepseek_train::pretrain::{pretrain, PretrainArgs};
use deepseek_train::{BalanceMode, TrainConfig};

fn main() -> Result<()> {
    deepseek_train::alloc::keep_freed_memory();
    let mut steps = 1000;
    let mut gamma = 0.001;
    let mut out = PathBuf::from("runs/load_balance");
    let mut seed = 0;
    let mut only: Option<Vec<String>> = None;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--steps" => steps = value()?.parse()?,
            "--gamma" => gamma = value()?.parse()?,
            "--out" => out = value()?.into(),
            "--seed" => seed = value()?.parse()?,
            "--modes" => only = Some(value()?.split(',').map(str::to_string).collect()),
            other => bail!("unknown option `{other}` (use --steps N, --gamma G, --out DIR, --seed S, --modes aux-free,aux-loss,none)"),
        }
    }
    // The `small` model with byte tokens and no MTP: MaxVio is about the routers alone.
    let model =
        DeepSeekConfig { vocab_size: 256, num_nextn_predict_layers: 0, ..DeepSeekConfig::small() };
    let runs = [
        (BalanceMode::AuxFree, "aux-free"),
        (BalanceMode::AuxLoss, "aux-loss"),
        (BalanceMode::None, "none"),
    ];
    let mut rows = Vec::new();
    for (mode, name) in runs {
        if only.as_ref().is_some_and(|o| !o.iter().any(|m| m == name)) {
            continue;
        }
        let dir = out.join(name);
        if dir.exists() {
            std::fs::remove_dir_all(&dir)
                .with_context(|| format!("cannot clear {}", dir.display()))?;
        }
        let train = TrainConfig {
            bias_gamma: gamma,
            aux_loss_alpha: 0.001,
            seq_aux_alpha: 1e-4,
            eval_every: 0,
            // The whole validation split.
            eval_batches: 0,
            checkpoint_every: 0,
            keep_checkpoints: 1,
            ..deepseek_examples::short_run(steps, seed, mode)
        };
        let mut run = PretrainArgs::new("small", &dir, train);
        run.model = Some(model.clone());
        run.progress = true;
        eprintln!("== {name}");
        let start = Instant::now();
        let summary = pretrain(&run)?;
        let eval = summary.last_eval.context("the run ends with an evaluation")?;
        let (steps_log, _) = read_metrics(&summary.metrics)?;
        // MaxVio_batch averaged over the second half of training.
        let tail = &steps_log[steps_log.len() / 2..];
        let vio_batch = tail.iter().map(|s| s.max_vio_batch).sum::<f64>() / tail.len() as f64;
        rows.push((
            name,
            eval.val_loss,
            eval.max_vio_global,
            vio_batch,
            start.elapsed().as_secs_f64(),
        ));
    }
    println!("\n{steps} steps of 8 × 128 byte tokens, `small` model (3 MoE layers, 16 experts top-4), seed {seed}, γ = {gamma}");
    println!("| balancing | validation loss | MaxVio_global | mean MaxVio_batch (2nd half) | wall time |");
    println!("|---|---|---|---|---|");
    for (name, loss, global, batch, secs) in &rows {
        println!("| {name} | {loss:.4} | {global:.3} | {batch:.3} | {secs:.0} s |");
    }
    Ok(())
}
