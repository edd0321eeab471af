//! The FP8 training check of DeepSeek-V3 (§3.3, Appendix B.1): the same model trained on the
//! same data with the same seed, once with f32 GEMMs and once with FP8 ones (E4M3 operands with
//! 1×128 activation / gradient tiles and 128×128 weight blocks, forward and backward, f32
//! accumulation and master weights). Prints the relative difference of the final training and
//! validation losses as a Markdown table (the paper reports under 0.25% against BF16) and draws
//! both curves and their relative difference into `<out>/fp8_gap.png`.
//!
//! ```sh
//! cargo run --release -p deepseek-examples --example fp8_gap [-- --steps 700 --seed 0 --out runs/fp8_gap]
//! ```

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use deepseek_train::metrics::{plot_comparison, read_metrics, smoothed_loss};
use deepseek_train::pretrain::{pretrain, PretrainArgs};
use deepseek_train::TrainConfig;

/// Steps averaged into the "final training loss" (one step's loss is mostly batch noise).
const TAIL: usize = 50;

fn main() -> Result<()> {
    deepseek_train::alloc::keep_freed_memory();
    let mut steps = 700;
    let mut seed = 0;
    let mut out = PathBuf::from("runs/fp8_gap");
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--steps" => steps = value()?.parse()?,
            "--seed" => seed = value()?.parse()?,
            "--out" => out = value()?.into(),
            other => bail!("unknown option `{other}` (use --steps N, --seed S, --out DIR)"),
        }
    }
    let model = deepseek_examples::quickstart_model();
    let mut rows = Vec::new();
    let mut metrics = Vec::new();
    for (name, fp8) in [("f32", false), ("fp8", true)] {
        let dir = out.join(name);
        if dir.exists() {
            std::fs::remove_dir_all(&dir)
                .with_context(|| format!("cannot clear {}", dir.display()))?;
        }
        let train = TrainConfig {
            fp8,
            eval_every: 100,
            eval_batches: 0,
            checkpoint_every: 0,
            keep_checkpoints: 1,
            ..deepseek_examples::quickstart_train(steps, seed)
        };
        let mut run = PretrainArgs::new("small", &dir, train);
        run.model = Some(model.clone());
        run.progress = true;
        eprintln!("== {name}");
        let start = Instant::now();
        let summary = pretrain(&run)?;
        let secs = start.elapsed().as_secs_f64();
        let eval = summary.last_eval.context("the run ends with an evaluation")?;
        let (log, _) = read_metrics(&summary.metrics)?;
        let train_tail =
            smoothed_loss(&log, TAIL).last().map(|p| p.1).context("the run logged steps")?;
        let tokens_per_s = log.iter().skip(5).map(|r| r.tokens_per_s).sum::<f64>()
            / log.len().saturating_sub(5).max(1) as f64;
        rows.push((name, train_tail, eval.val_loss, eval.val_mtp_loss, tokens_per_s, secs));
        metrics.push((name, summary.metrics.clone()));
    }
    let png = out.join("fp8_gap.png");
    let runs: Vec<(&str, &std::path::Path)> =
        metrics.iter().map(|(n, p)| (*n, p.as_path())).collect();
    plot_comparison(&runs, &png, TAIL)?;

    let (_, base_train, base_val, _, _, _) = rows[0];
    println!(
        "\n{steps} steps of 8 × 128 byte tokens, quickstart model (`small`, MTP 1), seed {seed}"
    );
    println!("| GEMMs | training loss (mean of last {TAIL} steps) | validation loss | validation MTP loss | tokens/s | wall time |");
    println!("|---|---|---|---|---|---|");
    for (name, train, val, mtp, tps, secs) in &rows {
        let rel = |v: f64, b: f64| {
            if *name == "f32" {
                String::new()
            } else {
                format!(" ({:+.3}%)", 100.0 * (v - b) / b)
            }
        };
        let mtp = mtp.map(|m| format!("{m:.4}")).unwrap_or_else(|| "–".into());
        println!(
            "| {name} | {train:.4}{} | {val:.4}{} | {mtp} | {tps:.0} | {secs:.0} s |",
            rel(*train, base_train),
            rel(*val, base_val)
        );
    }
    println!("\ncurves: {}", png.display());
    Ok(())
}
