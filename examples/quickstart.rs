//! Quickstart: pretrain a small DeepSeek-V3 (MLA, DeepSeekMoE with auxiliary-loss-free load
//! balancing, one MTP module) from scratch on the built-in corpus, on the CPU, in a few
//! minutes; then compare its validation loss with the corpus entropy (the best any model can
//! do), look at the expert load balance, and sample from it.
//!
//! ```sh
//! cargo run --release -p deepseek-examples --example quickstart
//! cargo run --release -p deepseek-examples --example quickstart --features wgpu -- --device wgpu
//! ```
//!
//! Options: `--steps N` (default 700), `--out DIR` (default `runs/quickstart`), `--device
//! flex|wgpu|cuda`, `--seed S`. Everything lands in the output directory: `metrics.jsonl`,
//! `loss.png`, `checkpoints/`, and `hf/` (a Hugging Face-layout model that `deepseek generate`
//! and transformers load).

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use burn::backend::Flex;
use deepseek_core::{load_model, LoadOptions};
use deepseek_infer::generate::{generate, Decoding, GenerateConfig};
use deepseek_infer::tokenizer::TextTokenizer;
use deepseek_train::pretrain::{pretrain, DeviceKind, PretrainArgs};

fn main() -> Result<()> {
    deepseek_train::alloc::keep_freed_memory();
    let mut steps = 700;
    let mut out = PathBuf::from("runs/quickstart");
    let mut device = DeviceKind::Flex;
    let mut seed = 0;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--steps" => steps = value()?.parse()?,
            "--out" => out = value()?.into(),
            "--device" => device = value()?.parse().map_err(anyhow::Error::msg)?,
            "--seed" => seed = value()?.parse()?,
            other => bail!("unknown option `{other}` (use --steps N, --out DIR, --device flex|wgpu|cuda, --seed S)"),
        }
    }
    if out.join("checkpoints").exists() {
        // A quickstart always starts fresh.
        println!("== Clearing the previous quickstart run in {}", out.display());
        std::fs::remove_dir_all(&out).with_context(|| format!("cannot clear {}", out.display()))?;
    }
    let model = deepseek_examples::quickstart_model();
    let params = model.param_count();
    println!("== Pretraining a small DeepSeek-V3 on the built-in corpus ({device:?})");
    println!(
        "   {} blocks ({} MoE: {} routed experts top-{} + {} shared, auxiliary-loss-free balancing), MLA, {} MTP module; {:.1}M parameters (+{:.1}M MTP)",
        model.num_hidden_layers,
        model.num_hidden_layers - model.first_k_dense_replace,
        model.n_routed_experts,
        model.num_experts_per_tok,
        model.n_shared_experts,
        model.num_nextn_predict_layers,
        params.total as f64 / 1e6,
        params.mtp as f64 / 1e6
    );
    println!(
        "   {steps} steps of 8 × 128 byte tokens; progress below, metrics in {}",
        out.join("metrics.jsonl").display()
    );
    let mut run =
        PretrainArgs::new("small", &out, deepseek_examples::quickstart_train(steps, seed));
    run.model = Some(model);
    run.device = device;
    run.progress = true;
    let summary = pretrain(&run)?;

    println!(
        "\n== Result after {} steps ({} tokens) in {:.0} s",
        summary.steps, summary.tokens, summary.wall_s
    );
    let eval = summary.last_eval.as_ref().context("the run ends with an evaluation")?;
    let entropy = summary.entropy.context("the built-in corpus has a known entropy")?;
    println!("   validation loss   {:.3} nats/token", eval.val_loss);
    println!("   corpus entropy    {entropy:.3} nats/token (the best possible loss)");
    println!(
        "   gap               {:.3} nats/token (from {:.3} at the start: ln 256 = {:.3})",
        eval.val_loss - entropy,
        (256f64).ln() - entropy,
        (256f64).ln()
    );
    if let Some(m) = eval.val_mtp_loss {
        println!("   MTP module loss   {m:.3} nats/token (predicting the token after next)");
    }
    println!("   expert load: MaxVio over the validation set {:.3} (0 = perfectly balanced; max over MoE layers)", eval.max_vio_global);

    println!("\n== Samples (greedy, from the exported model in {})", summary.hf_dir.display());
    let device = Default::default();
    let model = load_model::<Flex>(&summary.hf_dir, &device, LoadOptions::default())?;
    let tokenizer = TextTokenizer::from_file(&summary.hf_dir.join("tokenizer.json"))?;
    let newline = tokenizer.encode("\n")?[0] as i64;
    let (mut right, mut asked) = (0, 0);
    for prompt in
        ["the ", "a happy ", "the robot ", "12 + 7 = ", "13 + 19 = ", "4 + 15 = ", "8 + 16 = "]
    {
        // Sentences in the corpus follow a newline: start the prompt at a sentence boundary.
        let ids: Vec<i64> =
            tokenizer.encode(&format!(".\n{prompt}"))?.into_iter().map(i64::from).collect();
        let cfg = GenerateConfig {
            max_new_tokens: 48,
            decoding: Decoding::Greedy,
            eos_token_id: Some(newline),
            stop_sequences: vec![],
        };
        let tokens = generate(&model, &[ids], &cfg, &device)?.remove(0);
        let text: Vec<u32> = tokens.iter().map(|&t| t as u32).collect();
        let completion = tokenizer.decode(&text)?;
        let line = format!("{prompt}{}", completion.trim_end());
        let mut verdict = String::new();
        if let Some((lhs, rhs)) = prompt.trim_end().trim_end_matches('=').split_once('+') {
            asked += 1;
            let expected: u32 = lhs.trim().parse::<u32>()? + rhs.trim().parse::<u32>()?;
            let ok = completion.trim() == expected.to_string();
            right += ok as usize;
            verdict = if ok { "  (correct)".into() } else { format!("  (expected {expected})") };
        }
        println!("   {line}{verdict}");
    }
    println!("   additions right: {right}/{asked}");
    println!("\n== Files");
    println!("   metrics   {}", summary.metrics.display());
    println!("   plot      {}", summary.plot.display());
    println!("   model     {} (try: cargo run -p deepseek-infer --bin deepseek -- generate --model {} --prompt \"the \")", summary.hf_dir.display(), summary.hf_dir.display());
    println!("             or chat with it (its template continues your line): cargo run -p deepseek-infer --bin deepseek -- chat --model {}", summary.hf_dir.display());
    Ok(())
}
