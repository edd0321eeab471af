//! Fine-tuning: teach the quickstart's pretrained model to answer arithmetic questions in a chat
//! format it has never seen, with LoRA adapters on the frozen model and, for comparison, with
//! every weight trainable; measure exact-match accuracy on held-out questions before and after,
//! the trainable parameters and the peak memory of each.
//!
//! ```sh
//! cargo run --release -p deepseek-examples --example quickstart    # optional: the base model
//! cargo run --release -p deepseek-examples --example finetune
//! ```
//!
//! The base is `runs/quickstart/hf` when the quickstart has run, else a short pretraining run of
//! the same model (`--pretrain-steps`, default 300). It learned sums as `12 + 7 = 19` lines; the
//! fine-tuning data asks `Q: 12 plus 7` and answers `A: 19`, rendered with a Q/A chat template
//! (the newline ends a turn). 40 of the 400 questions `a plus b` (a, b < 20) are held out.
//! Options: `--base DIR`, `--out DIR` (default `runs/finetune`), `--steps N` (default 150),
//! `--seed S`, `--pretrain-steps N`.

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use burn::backend::Flex;
use deepseek_core::{load_model, LoadOptions};
use deepseek_examples::{addition_questions, qa_chat_dir, QA_TEMPLATE};
use deepseek_infer::chat::{ChatTemplate, Message};
use deepseek_infer::generate::{generate, Decoding, GenerateConfig};
use deepseek_infer::tokenizer::TextTokenizer;
use deepseek_train::config::{Finetune, LoraRecipe, RouterMode};
use deepseek_train::sft::{sft, sft_defaults, SftArgs};

fn main() -> Result<()> {
    deepseek_train::alloc::keep_freed_memory();
    let mut base: Option<PathBuf> = None;
    let mut out = PathBuf::from("runs/finetune");
    let mut steps = 150;
    let mut seed = 0;
    let mut pretrain_steps = 300;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--base" => base = Some(value()?.into()),
            "--out" => out = value()?.into(),
            "--steps" => steps = value()?.parse()?,
            "--seed" => seed = value()?.parse()?,
            "--pretrain-steps" => pretrain_steps = value()?.parse()?,
            other => bail!("unknown option `{other}` (use --base DIR, --out DIR, --steps N, --seed S, --pretrain-steps N)"),
        }
    }
    deepseek_examples::fresh_dir(&out)?;
    let pretrained = deepseek_examples::pretrained_base(base, &out, pretrain_steps, seed)?;
    println!("== Base model: {}", pretrained.display());
    let base = qa_chat_dir(&pretrained, &out.join("base"))?;

    let pair = |&(a, b): &(u32, u32)| (format!("{a} plus {b}"), format!("{}", a + b));
    let (train, test) = addition_questions(seed);
    let (train, test): (Pairs, Pairs) =
        (train.iter().map(pair).collect(), test.iter().map(pair).collect());
    write_jsonl(&out.join("train.jsonl"), &train)?;
    write_jsonl(&out.join("test.jsonl"), &test)?;
    println!(
        "   {} training conversations, {} held-out questions, e.g. `Q: {}` → `A: {}`",
        train.len(),
        test.len(),
        test[0].0,
        test[0].1
    );

    let before = accuracy(&base, None, &test)?;
    println!("\n== Exact match before fine-tuning: {}/{}", before, test.len());

    let mut results = Vec::new();
    for lora in [true, false] {
        let name = if lora { "lora" } else { "full" };
        let recipe = lora.then(|| LoraRecipe {
            rank: 16,
            alpha: 32.0,
            rslora: false,
            dropout: 0.0,
            expert_rank: 4,
            targets: deepseek_core::LoraTargets::parse("attn+mlp").expect("known targets").0,
        });
        let mut train_cfg = sft_defaults(lora, RouterMode::Frozen);
        train_cfg.steps = steps;
        train_cfg.batch_size = 8;
        train_cfg.seed = seed;
        // A tiny model and a few hundred steps want larger rates than the 1e-4 / 1e-5 defaults
        // sized for large pretrained models.
        train_cfg.lr = if lora { 3e-3 } else { 1e-3 };
        train_cfg.min_lr = train_cfg.lr * 0.1;
        train_cfg.warmup_steps = deepseek_train::sft::warmup_for(steps);
        train_cfg.eval_every = 50;
        train_cfg.checkpoint_every = 0;
        train_cfg.finetune = Some(Finetune {
            base_model: base.clone(),
            lora: recipe,
            router: RouterMode::Frozen,
            data: None,
            adapter: None,
            base_dtype: Default::default(),
        });
        let args = SftArgs {
            data: vec![out.join("train.jsonl")],
            val_data: vec![out.join("test.jsonl")],
            out: out.join(name),
            max_len: 128,
            strict_length: true,
            pack: true,
            train_on_prompt: false,
            epochs: None,
            warmup_steps: None,
            resume: false,
            device: deepseek_core::device::DeviceKind::Flex,
            device_ids: vec![],
            layout: Default::default(),
            progress: true,
            train: train_cfg,
        };
        println!(
            "\n== Fine-tuning with {} for {steps} steps",
            if lora { "LoRA (r 16, α 32, attention + MLPs)" } else { "every weight" }
        );
        reset_peak_memory();
        let summary = sft(&args)?;
        let peak = peak_memory_mib();
        let adapter = lora.then(|| summary.output.clone());
        let model_dir = if lora { base.clone() } else { summary.output.clone() };
        let right = accuracy(&model_dir, adapter.as_deref(), &test)?;
        println!("   exact match after: {right}/{}", test.len());
        results.push((name, right, summary, peak));
    }

    println!("\n== Summary ({} held-out questions)", test.len());
    println!("   | run  | exact match | trainable params | optimizer state | peak RSS | tokens/s | wall |");
    println!("   |------|-------------|------------------|-----------------|----------|----------|------|");
    println!("   | base | {before}/{} | - | - | - | - | - |", test.len());
    for (name, right, s, peak) in &results {
        println!(
            "   | {name} | {right}/{} | {} of {} ({:.2}%) | {:.1} MiB | {} | {:.0} | {:.0} s |",
            test.len(),
            s.trainable_params,
            s.total_params,
            100.0 * s.trainable_params as f64 / s.total_params as f64,
            // AdamW's two f32 moments per trainable parameter.
            (s.trainable_params * 8) as f64 / (1 << 20) as f64,
            peak.map_or("n/a".into(), |p| format!("{p:.0} MiB")),
            s.last_step.as_ref().map_or(0.0, |r| r.tokens_per_s),
            s.wall_s
        );
    }
    println!(
        "\n   adapter: {} (PEFT layout; try `deepseek chat --model {} --adapter {}`)",
        results[0].2.output.display(),
        base.display(),
        results[0].2.output.display()
    );
    Ok(())
}

/// `(question, answer)`.
type Pairs = Vec<(String, String)>;

fn write_jsonl(path: &Path, pairs: &[(String, String)]) -> Result<()> {
    let lines: Vec<String> = pairs
        .iter()
        .map(|(q, a)| {
            serde_json::json!({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
                .to_string()
        })
        .collect();
    std::fs::write(path, lines.join("\n") + "\n")?;
    Ok(())
}

/// Held-out questions answered exactly (greedy, the answer line trimmed).
fn accuracy(model_dir: &Path, adapter: Option<&Path>, test: &[(String, String)]) -> Result<usize> {
    let device = Default::default();
    let mut model = load_model::<Flex>(model_dir, &device, LoadOptions::default())?;
    if let Some(a) = adapter {
        model = deepseek_core::adapter::load_adapter(model, a)?;
    }
    let tokenizer = TextTokenizer::from_file(&model_dir.join("tokenizer.json"))?;
    let template = ChatTemplate::new(QA_TEMPLATE, String::new(), Some("\n".into()))?;
    let newline = tokenizer.encode("\n")?[0] as i64;
    let cfg = GenerateConfig {
        max_new_tokens: 6,
        decoding: Decoding::Greedy,
        eos_token_id: Some(newline),
        stop_sequences: vec![],
    };
    let mut right = 0;
    for (i, (q, a)) in test.iter().enumerate() {
        let prompt = template.render(&[Message::new("user", q)], true)?;
        let ids: Vec<i64> = tokenizer.encode(&prompt)?.into_iter().map(i64::from).collect();
        let out = generate(&model, &[ids], &cfg, &device)?.remove(0);
        let text = tokenizer.decode(&out.iter().map(|&t| t as u32).collect::<Vec<_>>())?;
        let ok = text.trim() == a;
        right += ok as usize;
        if i < 3 {
            println!("   Q: {q}  A:{}  {}", text.trim_end(), if ok { "(correct)" } else { "" });
        }
    }
    Ok(right)
}

/// Resets the kernel's peak-RSS counter (Linux: `echo 5 > /proc/self/clear_refs`).
fn reset_peak_memory() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// Peak resident memory since the last reset, MiB (Linux `VmHWM`).
fn peak_memory_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}
