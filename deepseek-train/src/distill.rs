//! Distillation by rejection sampling (DeepSeek-V3 §5.1, the R1 recipe in small): a teacher
//! answers each prompt K times, a checker keeps the answers that are right, and the kept
//! conversations become `messages` JSONL for `deepseek-train sft`.

use std::path::Path;

use burn::tensor::backend::Backend;
use deepseek_core::DeepSeekModel;
use deepseek_infer::chat::{ChatTemplate, Message};
use deepseek_infer::engine::{generate_all, Request};
use deepseek_infer::generate::Decoding;
use deepseek_infer::tokenizer::TextTokenizer;
use serde_json::Value;

use crate::error::{Result, TrainError};

/// A prompt with its checkable answer.
#[derive(Debug, Clone, PartialEq)]
pub struct DistillPrompt {
    /// The conversation so far (a `prompt` or `question` becomes one user turn).
    pub messages: Vec<Message>,
    /// The gold answer.
    pub answer: String,
}

/// Which verified answers to keep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keep {
    /// Every correct answer.
    AllCorrect,
    /// The shortest correct answer of each prompt (a length control).
    Best,
}

impl std::str::FromStr for Keep {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "all-correct" => Ok(Self::AllCorrect),
            "best" => Ok(Self::Best),
            other => Err(format!("unknown --keep `{other}`: best or all-correct")),
        }
    }
}

/// How the teacher samples and what is kept.
#[derive(Debug, Clone)]
pub struct DistillConfig {
    /// Answers per prompt.
    pub samples: usize,
    pub max_new_tokens: usize,
    /// Sampling (`Decoding::Sample`; sample `s` of a prompt uses `seed + s`).
    pub decoding: Decoding,
    pub keep: Keep,
    /// Keep only answers of at most this many tokens.
    pub max_len: Option<usize>,
    /// Answers decoded together (continuous batching; the answers do not depend on it).
    pub batch: usize,
}

/// One answer of the teacher.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub text: String,
    pub tokens: usize,
    pub correct: bool,
    pub kept: bool,
}

/// Reads `{prompt | question | messages, answer}` JSONL; errors name the file and line.
pub fn read_prompts(path: &Path) -> Result<Vec<DistillPrompt>> {
    deepseek_infer::eval::read_items(path, |obj| {
        let answer = match obj.get("answer") {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Number(n)) => n.to_string(),
            _ => anyhow::bail!("missing `answer` (a string or a number)"),
        };
        let messages = match (obj.get("messages"), obj.get("prompt").or(obj.get("question"))) {
            (Some(list), _) => deepseek_infer::eval::parse_messages(list)?,
            (None, Some(Value::String(p))) => vec![Message::new("user", p)],
            _ => anyhow::bail!("expected `messages` (a list) or a string `prompt`/`question`"),
        };
        Ok(DistillPrompt { messages, answer })
    })
    .map_err(|e| TrainError::Data(format!("{e:#}")))
}

/// The teacher model with the tokenizer and chat template it is prompted with.
pub struct Teacher<'a, B: Backend> {
    pub model: &'a DeepSeekModel<B>,
    pub tokenizer: &'a TextTokenizer,
    pub template: &'a ChatTemplate,
}

/// Samples the teacher on every prompt and marks what `check(answer_text, gold)` verifies and
/// what is kept. Returns the samples of each prompt, in order.
pub fn distill<B: Backend>(
    teacher: &Teacher<B>,
    prompts: &[DistillPrompt],
    config: &DistillConfig,
    device: &B::Device,
    check: impl Fn(&str, &str) -> bool,
    mut progress: impl FnMut(),
) -> Result<Vec<Vec<Sample>>> {
    if config.samples == 0 {
        return Err(TrainError::config("samples", "must be at least 1"));
    }
    let Teacher { model: teacher, tokenizer: tok, template } = *teacher;
    let eos = template.end_of_turn(tok, teacher.config.eos_token_id);
    let data = |e: anyhow::Error| TrainError::Data(format!("{e:#}"));
    if config.batch == 0 {
        return Err(TrainError::config("batch", "must be at least 1"));
    }
    // Every (prompt, sample) pair is one request; the engine decodes `batch` of them at once.
    let mut requests = Vec::with_capacity(prompts.len() * config.samples);
    for p in prompts {
        let text = template.render(&p.messages, true).map_err(data)?;
        let prompt: Vec<i64> =
            tok.encode(&text).map_err(data)?.into_iter().map(i64::from).collect();
        for s in 0..config.samples {
            requests.push(Request {
                prompt: prompt.clone(),
                max_new_tokens: config.max_new_tokens,
                decoding: config.decoding.for_sample(s),
                stop_tokens: eos.into_iter().collect(),
                stop_sequences: vec![],
            });
        }
    }
    let outputs = generate_all(teacher, requests, config.batch, device, &mut |_, _| Ok(true))
        .map_err(data)?;
    let mut outputs = outputs.into_iter();
    let mut out = Vec::with_capacity(prompts.len());
    for p in prompts {
        let mut samples = Vec::with_capacity(config.samples);
        for _ in 0..config.samples {
            let mut ids = outputs.next().expect("one output per request").tokens;
            // The end-of-turn token belongs to the template, not to the answer's text.
            if eos.is_some() && ids.last() == eos.as_ref() {
                ids.pop();
            }
            let text =
                tok.decode(&ids.iter().map(|&t| t as u32).collect::<Vec<_>>()).map_err(data)?;
            let correct = check(&text, &p.answer);
            let fits = config.max_len.is_none_or(|m| ids.len() <= m);
            samples.push(Sample { text, tokens: ids.len(), correct, kept: correct && fits });
            progress();
        }
        if config.keep == Keep::Best {
            let best = samples
                .iter()
                .enumerate()
                .filter(|(_, s)| s.kept)
                .min_by_key(|(_, s)| s.tokens)
                .map(|(i, _)| i);
            for (i, s) in samples.iter_mut().enumerate() {
                s.kept = Some(i) == best;
            }
        }
        out.push(samples);
    }
    Ok(out)
}

/// The kept answers as `messages` JSONL lines (the prompt's turns, then the answer).
pub fn traces(prompts: &[DistillPrompt], samples: &[Vec<Sample>]) -> Vec<String> {
    prompts
        .iter()
        .zip(samples)
        .flat_map(|(p, ss)| {
            ss.iter().filter(|s| s.kept).map(move |s| {
                let mut messages: Vec<Value> = p
                    .messages
                    .iter()
                    .map(|m| serde_json::json!({"role": m.role, "content": m.content}))
                    .collect();
                messages.push(serde_json::json!({"role": "assistant", "content": s.text}));
                serde_json::json!({"messages": messages}).to_string()
            })
        })
        .collect()
}

/// What `deepseek-train distill` runs.
#[derive(Debug, Clone)]
pub struct DistillArgs {
    /// The teacher: an HF-layout model directory with `tokenizer.json` (and a chat template).
    pub teacher: std::path::PathBuf,
    pub prompts: std::path::PathBuf,
    /// The traces file to write (`messages` JSONL).
    pub out: std::path::PathBuf,
    pub config: DistillConfig,
    pub device: deepseek_core::device::DeviceKind,
}

/// What a distillation run found.
#[derive(Debug, Clone, PartialEq)]
pub struct DistillSummary {
    pub prompts: usize,
    pub samples: usize,
    pub correct: usize,
    pub kept: usize,
    /// Prompts with at least one correct answer.
    pub solved: usize,
}

impl std::fmt::Display for DistillSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "prompts: {}", self.prompts)?;
        writeln!(f, "samples: {}", self.samples)?;
        writeln!(
            f,
            "correct: {} ({:.1}%)",
            self.correct,
            100.0 * self.correct as f64 / self.samples.max(1) as f64
        )?;
        writeln!(f, "prompts_solved: {}", self.solved)?;
        write!(f, "kept: {}", self.kept)
    }
}

/// Reads the prompts, samples the teacher on `args.device`, checks the answers with
/// [`deepseek_infer::checker::is_correct`] and writes the kept traces atomically.
pub fn run_distill(args: &DistillArgs) -> Result<DistillSummary> {
    struct Run<'a>(&'a DistillArgs);
    impl deepseek_core::device::BackendTask for Run<'_> {
        type Output = Result<DistillSummary>;
        fn run<B: Backend>(self, devices: Vec<B::Device>) -> Result<DistillSummary> {
            let a = self.0;
            let device = &devices[0];
            let prompts = read_prompts(&a.prompts)?;
            let data = |e: anyhow::Error| TrainError::Data(format!("{e:#}"));
            let tok = TextTokenizer::from_file(&a.teacher.join("tokenizer.json")).map_err(data)?;
            let (template, _) = crate::sft_data::model_template(&a.teacher)?;
            let teacher = deepseek_core::load_model::<B>(&a.teacher, device, Default::default())?;
            tok.check_vocab(teacher.config.vocab_size).map_err(data)?;
            let bar = indicatif::ProgressBar::new((prompts.len() * a.config.samples) as u64);
            let teacher = Teacher { model: &teacher, tokenizer: &tok, template: &template };
            let samples = distill(
                &teacher,
                &prompts,
                &a.config,
                device,
                deepseek_infer::checker::is_correct,
                || bar.inc(1),
            )?;
            bar.finish_and_clear();
            let lines = traces(&prompts, &samples);
            let text = if lines.is_empty() { String::new() } else { lines.join("\n") + "\n" };
            deepseek_core::checkpoint::write_atomic(&a.out, text.as_bytes())?;
            let all = samples.iter().flatten();
            Ok(DistillSummary {
                prompts: prompts.len(),
                samples: all.clone().count(),
                correct: all.clone().filter(|s| s.correct).count(),
                kept: lines.len(),
                solved: samples.iter().filter(|ss| ss.iter().any(|s| s.correct)).count(),
            })
        }
    }
    deepseek_core::device::run_on(args.device, &[], Run(args))?
}
