//! Distillation by rejection sampling, end to end on the CPU: a teacher that writes its
//! reasoning (additions with the carry spelled out, `… #### 25`) answers training questions
//! several times, the checker keeps its verified answers, and a smaller student is fine-tuned on
//! those traces; the same student fine-tuned on bare answers is the comparison. Both are scored
//! on held-out questions with the checker `deepseek eval` uses.
//!
//! ```sh
//! cargo run --release -p deepseek-examples --example distill
//! ```
//!
//! The teacher is the quickstart's model (`runs/quickstart/hf`, else a short pretraining run)
//! fine-tuned on reasoning answers to the training questions (twice `--steps`); the student is a
//! narrower model (hidden 128) pretrained briefly on the same corpus. Options: `--out DIR` (default `runs/distill`), `--seed S`,
//! `--steps N` (fine-tuning steps, default 150), `--student-steps N` (student pretraining,
//! default 300), `--samples K` (teacher answers per question, default 4).

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use burn::backend::Flex;
use deepseek_core::{load_model, DeepSeekConfig, LoadOptions};
use deepseek_examples::{addition_questions, qa_chat_dir, QA_TEMPLATE};
use deepseek_infer::chat::{ChatTemplate, Message};
use deepseek_infer::checker::is_correct;
use deepseek_infer::generate::{generate, Decoding, GenerateConfig};
use deepseek_infer::tokenizer::TextTokenizer;
use deepseek_train::config::{Finetune, RouterMode};
use deepseek_train::distill::{run_distill, DistillArgs, DistillConfig, Keep};
use deepseek_train::pretrain::{pretrain, PretrainArgs};
use deepseek_train::sft::{sft, sft_defaults, SftArgs};

fn main() -> Result<()> {
    deepseek_train::alloc::keep_freed_memory();
    let mut out = PathBuf::from("runs/distill");
    let (mut seed, mut steps, mut student_steps, mut samples) = (0u64, 150usize, 300usize, 4usize);
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--out" => out = value()?.into(),
            "--seed" => seed = value()?.parse()?,
            "--steps" => steps = value()?.parse()?,
            "--student-steps" => student_steps = value()?.parse()?,
            "--samples" => samples = value()?.parse()?,
            other => bail!(
                "unknown option `{other}` (use --out, --seed, --steps, --student-steps, --samples)"
            ),
        }
    }
    if out.exists() {
        std::fs::remove_dir_all(&out).with_context(|| format!("cannot clear {}", out.display()))?;
    }
    std::fs::create_dir_all(&out)?;
    let started = std::time::Instant::now();

    // The questions: a + b for a, b < 20; 40 held out.
    let (train, test) = addition_questions(seed);
    let reasoning = |a: u32, b: u32| {
        let (ones, carry) = ((a % 10 + b % 10) % 10, (a % 10 + b % 10) / 10);
        format!(
            "ones {} + {} = {}{}, tens {} + {} + {carry} = {}. #### {}",
            a % 10,
            b % 10,
            a % 10 + b % 10,
            if carry > 0 { format!(" write {ones} carry {carry}") } else { String::new() },
            a / 10,
            b / 10,
            a / 10 + b / 10 + carry,
            a + b
        )
    };

    println!("== The teacher: the quickstart model fine-tuned to write its reasoning");
    let pretrained = match Path::new("runs/quickstart/hf/config.json").is_file() {
        true => PathBuf::from("runs/quickstart/hf"),
        false => {
            let mut run = PretrainArgs::new(
                "small",
                out.join("teacher-pretrain"),
                deepseek_examples::quickstart_train(300, seed),
            );
            run.model = Some(deepseek_examples::quickstart_model());
            pretrain(&run)?.hf_dir
        }
    };
    let teacher_base = qa_chat_dir(&pretrained, &out.join("teacher-base"))?;
    let write = |name: &str,
                 rows: &[(u32, u32)],
                 answer: &dyn Fn(u32, u32) -> String|
     -> Result<PathBuf> {
        let path = out.join(name);
        let lines: Vec<String> = rows
            .iter()
            .map(|&(a, b)| serde_json::json!({"messages": [{"role": "user", "content": format!("{a} plus {b}")}, {"role": "assistant", "content": answer(a, b)}]}).to_string())
            .collect();
        std::fs::write(&path, lines.join("\n") + "\n")?;
        Ok(path)
    };
    // The teacher learns the reasoning format on the training questions, twice the steps.
    let teacher_data = write("teacher-sft.jsonl", &train, &reasoning)?;
    let test_file = write("test.jsonl", &test, &|a, b| format!("{}", a + b))?;
    let teacher_dir = out.join("teacher");
    let teacher =
        finetune(&teacher_base, &teacher_data, &test_file, &teacher_dir, 2 * steps, seed, 1e-3)?;
    let teacher_right = accuracy(&teacher, &test)?;
    println!("   teacher accuracy on held-out questions: {teacher_right}/{}", test.len());

    println!(
        "\n== Rejection sampling: {samples} answers per training question, verified by the checker"
    );
    let prompts = out.join("prompts.jsonl");
    let lines: Vec<String> = train
        .iter()
        .map(|(a, b)| {
            serde_json::json!({"prompt": format!("{a} plus {b}"), "answer": a + b}).to_string()
        })
        .collect();
    std::fs::write(&prompts, lines.join("\n") + "\n")?;
    // `prompt` items become one user turn, rendered with the teacher's template.
    let traces = out.join("traces.jsonl");
    let summary = run_distill(&DistillArgs {
        teacher: teacher.clone(),
        prompts,
        out: traces.clone(),
        config: DistillConfig {
            samples,
            max_new_tokens: 64,
            decoding: Decoding::Sample { temperature: 0.7, top_k: None, top_p: None, seed },
            keep: Keep::Best,
            max_len: None,
            batch: 16,
        },
        device: deepseek_core::device::DeviceKind::Flex,
    })?;
    println!(
        "{}",
        summary.to_string().lines().map(|l| format!("   {l}")).collect::<Vec<_>>().join("\n")
    );

    println!(
        "\n== The student: a narrower model (hidden 128) pretrained for {student_steps} steps"
    );
    let student_cfg = DeepSeekConfig { hidden_size: 128, ..deepseek_examples::quickstart_model() };
    let mut run = PretrainArgs::new(
        "small",
        out.join("student-pretrain"),
        deepseek_examples::quickstart_train(student_steps, seed),
    );
    run.model = Some(student_cfg);
    let student_base = qa_chat_dir(&pretrain(&run)?.hf_dir, &out.join("student-base"))?;
    // The comparison: the same questions the traces cover, with bare answers.
    let kept: Vec<(u32, u32)> = std::fs::read_to_string(&traces)?
        .lines()
        .filter_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).ok()?;
            let q = v["messages"][0]["content"].as_str()?.to_string();
            let (a, b) = q.split_once(" plus ")?;
            Some((a.parse().ok()?, b.parse().ok()?))
        })
        .collect();
    if kept.is_empty() {
        bail!("the teacher verified no answer: nothing to distill");
    }
    let bare = write("bare.jsonl", &kept, &|a, b| format!("{}", a + b))?;
    let mut results = Vec::new();
    for (name, data) in [("traces", &traces), ("bare answers", &bare)] {
        let dir = finetune(
            &student_base,
            data,
            &test_file,
            &out.join(format!("student-{}", name.replace(' ', "-"))),
            steps,
            seed,
            1e-3,
        )?;
        results.push((name, accuracy(&dir, &test)?));
    }
    println!(
        "\n== Summary ({} held-out questions, {:.0} s in all)",
        test.len(),
        started.elapsed().as_secs_f64()
    );
    println!("   teacher (reasoning format): {teacher_right}/{}", test.len());
    println!("   distillation: {} of {} teacher answers verified, {} traces kept (shortest per question)", summary.correct, summary.samples, summary.kept);
    for (name, right) in results {
        println!("   student fine-tuned on {name}: {right}/{}", test.len());
    }
    Ok(())
}

/// Full fine-tuning of `base` on `data` for `steps` steps; returns the exported model.
fn finetune(
    base: &Path,
    data: &Path,
    val: &Path,
    out: &Path,
    steps: usize,
    seed: u64,
    lr: f64,
) -> Result<PathBuf> {
    let mut train = sft_defaults(false, RouterMode::Frozen);
    train.steps = steps;
    train.batch_size = 8;
    train.seed = seed;
    train.lr = lr;
    train.min_lr = lr * 0.1;
    train.warmup_steps = deepseek_train::sft::warmup_for(steps);
    train.eval_every = 0;
    train.checkpoint_every = 0;
    train.finetune = Some(Finetune {
        base_model: base.to_path_buf(),
        lora: None,
        router: RouterMode::Frozen,
        data: None,
        adapter: None,
        base_dtype: Default::default(),
    });
    let summary = sft(&SftArgs {
        data: vec![data.to_path_buf()],
        val_data: vec![val.to_path_buf()],
        out: out.to_path_buf(),
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
        train,
    })?;
    Ok(summary.output)
}

/// Held-out questions answered right by the checker (`####` or the last number), greedy.
fn accuracy(model_dir: &Path, test: &[(u32, u32)]) -> Result<usize> {
    let device = Default::default();
    let model = load_model::<Flex>(model_dir, &device, LoadOptions::default())?;
    let tok = TextTokenizer::from_file(&model_dir.join("tokenizer.json"))?;
    let template = ChatTemplate::new(QA_TEMPLATE, String::new(), Some("\n".into()))?;
    let cfg = GenerateConfig {
        max_new_tokens: 64,
        decoding: Decoding::Greedy,
        eos_token_id: Some(tok.encode("\n")?[0] as i64),
        stop_sequences: vec![],
    };
    let mut right = 0;
    for &(a, b) in test {
        let prompt = template.render(&[Message::new("user", &format!("{a} plus {b}"))], true)?;
        let ids: Vec<i64> = tok.encode(&prompt)?.into_iter().map(i64::from).collect();
        let out = generate(&model, &[ids], &cfg, &device)?.remove(0);
        let text = tok.decode(&out.iter().map(|&t| t as u32).collect::<Vec<_>>())?;
        right += is_correct(&text, &(a + b).to_string()) as usize;
    }
    Ok(right)
}
