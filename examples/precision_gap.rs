//! The precision check of DeepSeek-V3 (§3.3, Appendix B.1): the same model trained on the same
//! data with the same seed in f32 and in each reduced precision asked for:
//! - `fp8`: FP8 GEMMs (E4M3 operands with 1×128 activation / gradient tiles and 128×128 weight
//!   blocks, forward and backward, f32 accumulation and master weights);
//! - `bf16`, `f16`: mixed precision (weights and activations in bf16 / f16, f32 master weights
//!   and moments; f16 with dynamic loss scaling).
//!
//! Prints the relative difference of the final training and validation losses to f32 as a
//! Markdown table (the paper reports under 0.25% for FP8 against BF16) and draws the curves and
//! their relative differences into `<out>/precision_gap.png`.
//!
//! ```sh
//! cargo run --release -p deepseek-examples --example precision_gap [-- --with fp8,bf16,f16 --steps 700 --seed 0 --out runs/precision_gap]
//! ```

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use deepseek_core::WeightDtype;
use deepseek_train::metrics::{plot_comparison, read_metrics, smoothed_loss};
use deepseek_train::pretrain::{pretrain, PretrainArgs};
use deepseek_train::TrainConfig;

/// Steps averaged into the "final training loss" (one step's loss is mostly batch noise).
const TAIL: usize = 50;

fn main() -> Result<()> {
    deepseek_train::alloc::keep_freed_memory();
    let mut steps = 700;
    let mut seed = 0;
    let mut out = PathBuf::from("runs/precision_gap");
    let mut with = vec!["fp8".to_string(), "bf16".into(), "f16".into()];
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--steps" => steps = value()?.parse()?,
            "--seed" => seed = value()?.parse()?,
            "--out" => out = value()?.into(),
            "--with" => with = value()?.split(',').map(str::to_string).collect(),
            other => bail!(
                "unknown option `{other}` (use --with fp8,bf16,f16, --steps N, --seed S, --out DIR)"
            ),
        }
    }
    let model = deepseek_examples::quickstart_model();
    let mut rows = Vec::new();
    let mut metrics = Vec::new();
    let mut runs = vec![("f32".to_string(), false, WeightDtype::F32)];
    for name in with {
        let (fp8, dtype) = match name.as_str() {
            "fp8" => (true, WeightDtype::F32),
            other => (false, other.parse::<WeightDtype>()?),
        };
        if dtype == WeightDtype::F32 && !fp8 {
            bail!("--with lists the precisions compared with f32: fp8, bf16, f16");
        }
        runs.push((name, fp8, dtype));
    }
    for (name, fp8, dtype) in &runs {
        let (name, fp8, dtype) = (name.as_str(), *fp8, *dtype);
        let dir = out.join(name);
        if dir.exists() {
            std::fs::remove_dir_all(&dir)
                .with_context(|| format!("cannot clear {}", dir.display()))?;
        }
        let train = TrainConfig {
            fp8,
            dtype,
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
    let png = out.join("precision_gap.png");
    let runs: Vec<(&str, &std::path::Path)> =
        metrics.iter().map(|(n, p)| (*n, p.as_path())).collect();
    plot_comparison(&runs, &png, TAIL)?;

    let (_, base_train, base_val, _, _, _) = rows[0];
    println!(
        "\n{steps} steps of 8 × 128 byte tokens, quickstart model (`small`, MTP 1), seed {seed}"
    );
    println!("| precision | training loss (mean of last {TAIL} steps) | validation loss | validation MTP loss | tokens/s | wall time |");
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
