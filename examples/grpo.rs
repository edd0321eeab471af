//! Reinforcement learning with verifiable rewards (GRPO) end to end on the CPU: a small model
//! that learned arithmetic in pretraining is fine-tuned (LoRA) on `Q: 12 plus 7` → `A: 19`
//! conversations of which half decline with `A: not sure`; greedy decoding then mostly declines.
//! GRPO with the exact-answer reward samples 8 answers per question, and the answers that try
//! and are right beat their group's mean: the policy learns to answer. Held-out accuracy
//! (greedy, questions never trained on) is printed before and after.
//!
//! ```sh
//! cargo run --release -p deepseek-examples --example grpo
//! ```
//!
//! The base is `runs/quickstart/hf` when the quickstart has run, else a short pretraining run of
//! the same model and length (`--pretrain-steps`, default 700). The task is the built-in `arithmetic` one
//! (`a plus b`, a, b < 20); `--seed` picks the 20% held out and seeds everything else. Options:
//! `--out DIR` (default `runs/grpo`), `--seed S`, `--steps N` (GRPO steps, default 120),
//! `--sft-steps N` (default 150), `--pretrain-steps N`, `--base DIR`. The last lines are
//! `accuracy_before: X` and `accuracy_after: Y`.

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use deepseek_examples::qa_chat_dir;
use deepseek_train::config::{Finetune, LoraRecipe, RouterMode};
use deepseek_train::grpo::task::{mix, Op, TaskSpec};
use deepseek_train::grpo::{grpo, GrpoArgs, GrpoConfig};
use deepseek_train::sft::{sft, sft_defaults, SftArgs};
use deepseek_train::TrainConfig;

fn main() -> Result<()> {
    deepseek_train::alloc::keep_freed_memory();
    let mut base: Option<PathBuf> = None;
    let mut out = PathBuf::from("runs/grpo");
    let (mut seed, mut steps, mut sft_steps, mut pretrain_steps) =
        (0u64, 120usize, 150usize, 700usize);
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--base" => base = Some(value()?.into()),
            "--out" => out = value()?.into(),
            "--seed" => seed = value()?.parse()?,
            "--steps" => steps = value()?.parse()?,
            "--sft-steps" => sft_steps = value()?.parse()?,
            "--pretrain-steps" => pretrain_steps = value()?.parse()?,
            other => bail!("unknown option `{other}` (use --base DIR, --out DIR, --seed S, --steps N, --sft-steps N, --pretrain-steps N)"),
        }
    }
    let start = std::time::Instant::now();
    deepseek_examples::fresh_dir(&out)?;
    let pretrained = deepseek_examples::pretrained_base(base, &out, pretrain_steps, seed)?;
    println!("== Base model: {}", pretrained.display());
    let base = std::fs::canonicalize(qa_chat_dir(&pretrained, &out.join("base"))?)?;

    // The task and its held-out split; the SFT data answers half the training questions and
    // declines the other half.
    let task =
        TaskSpec::Arithmetic { max_operand: 20, ops: vec![Op::Plus], heldout_per_mille: 200 };
    let problems = task.load(seed)?;
    let lines: Vec<String> = problems
        .train
        .iter()
        .enumerate()
        .map(|(i, item)| {
            let answer = if mix(seed ^ i as u64).is_multiple_of(2) {
                item.answer.as_str()
            } else {
                "not sure"
            };
            serde_json::json!({"messages": [
                {"role": "user", "content": item.messages[0].content},
                {"role": "assistant", "content": answer},
            ]})
            .to_string()
        })
        .collect();
    let sft_data = out.join("sft.jsonl");
    std::fs::write(&sft_data, lines.join("\n") + "\n")?;
    println!(
        "   {} training questions (half answered `not sure` in the SFT data), {} held out",
        problems.train.len(),
        problems.heldout.len()
    );

    println!("\n== SFT (LoRA r 16, attention + MLPs) for {sft_steps} steps");
    let lora = LoraRecipe {
        rank: 16,
        alpha: 32.0,
        rslora: false,
        dropout: 0.0,
        expert_rank: 4,
        targets: deepseek_core::LoraTargets::parse("attn+mlp").expect("known targets").0,
    };
    let mut sft_cfg = sft_defaults(true, RouterMode::Frozen);
    sft_cfg.steps = sft_steps;
    sft_cfg.batch_size = 8;
    sft_cfg.seed = seed;
    sft_cfg.lr = 3e-3; // a tiny model and a few hundred steps (see the finetune example)
    sft_cfg.min_lr = 3e-4;
    sft_cfg.warmup_steps = deepseek_train::sft::warmup_for(sft_steps);
    sft_cfg.eval_every = 0;
    sft_cfg.checkpoint_every = 0;
    sft_cfg.finetune = Some(Finetune {
        base_model: base.clone(),
        lora: Some(lora.clone()),
        router: RouterMode::Frozen,
        data: None,
        adapter: None,
        base_dtype: Default::default(),
    });
    let sft_summary = sft(&SftArgs {
        data: vec![sft_data.clone()],
        val_data: vec![sft_data],
        out: out.join("sft"),
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
        train: sft_cfg,
    })?;
    let adapter = std::fs::canonicalize(&sft_summary.output)?;

    println!("\n== GRPO for {steps} steps: 16 questions x 8 samples per step, exact-answer reward");
    let grpo_cfg = GrpoConfig {
        task,
        group: 8,
        prompts_per_step: 16,
        max_new_tokens: 6,
        temperature: 1.0,
        micro_batch: 64,
        rollout_batch: 128,
        ..GrpoConfig::default()
    };
    let mut train = TrainConfig {
        steps,
        seed,
        lr: 3e-4,
        warmup_steps: 3,
        decay_start: 1.0,
        decay_end: 1.0,
        min_lr: 3e-4,
        final_lr: None,
        eval_every: 20,
        checkpoint_every: 50,
        grpo: Some(grpo_cfg),
        ..TrainConfig::default()
    };
    train.optim.weight_decay = 0.0;
    train.finetune = Some(Finetune {
        base_model: base.clone(),
        lora: Some(lora),
        router: RouterMode::Frozen,
        data: None,
        adapter: Some(adapter),
        base_dtype: Default::default(),
    });
    let summary = grpo(&GrpoArgs {
        out: out.join("grpo"),
        resume: false,
        device: deepseek_core::device::DeviceKind::Flex,
        progress: true,
        train,
    })?;
    println!("{summary}");
    let before = summary.heldout_before.context("the task holds questions out")?;
    let after = summary.heldout_after.context("evaluated at the end")?;
    let n = problems.heldout.len();
    println!(
        "\n== Held-out exact match (greedy): {:.0}/{n} before, {:.0}/{n} after; {:.0} s in all",
        before * n as f64,
        after * n as f64,
        start.elapsed().as_secs_f64()
    );
    println!(
        "   adapter: {} (PEFT layout; try `deepseek chat --model {} --adapter {}`)",
        summary.output.display(),
        base.display(),
        summary.output.display()
    );
    println!("accuracy_before: {before:.4}");
    println!("accuracy_after: {after:.4}");
    Ok(())
}
