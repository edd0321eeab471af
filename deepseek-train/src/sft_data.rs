//! Fine-tuning data: conversations in JSONL, rendered with the model's own chat template,
//! tokenized, and weighted so that the loss covers the assistant's tokens only.
//!
//! Formats, detected per line:
//! - `{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}` (OpenAI,
//!   TRL), the native one;
//! - alpaca `{"instruction", "input"?, "output", "system"?}`: one user turn (instruction, then
//!   the input after a blank line) and one assistant turn;
//! - ShareGPT `{"conversations": [{"from": "system"|"human"|"gpt", "value": "..."}, ...]}`.
//!
//! Assistant spans are found by rendering prefixes: for assistant turn `i`, the text of
//! `messages[..i]` with the generation prompt ends where the turn's content starts, and the text
//! of `messages[..=i]` ends where it ends (its end-of-turn token included). This holds for any
//! template that renders a conversation as the concatenation of its turns, which is checked: a
//! template that does not is an error rather than a wrong mask. A token is trained when its
//! first byte lies in a span. The text is tokenized as one string, without added special tokens,
//! as transformers' `apply_chat_template(tokenize=True)` does (the template writes BOS itself).
//!
//! Order and packing: training examples are served in a seeded order that is a pure function of
//! `(seed, position)`, like the pretraining windows. With packing, examples are laid end to end
//! (in a seeded shuffle, first fit) into rows of `max_len` tokens; each keeps its own document
//! id, so positions restart and attention stays inside it ([`deepseek_core::packing`]).

use std::path::{Path, PathBuf};

use deepseek_infer::chat::{token_text, ChatTemplate, Message};
use serde_json::Value;
use tokenizers::Tokenizer;

use crate::corpus::SplitMix64;
use crate::error::{Result, TrainError};
use crate::source::{BatchReader, HostBatch, TrainingData};

/// The chat template used when a model directory has none: DeepSeek-V3's format without tool
/// calls (system prompts first, then `<｜User｜>…` and `<｜Assistant｜>…<｜end▁of▁sentence｜>`).
pub const DEFAULT_CHAT_TEMPLATE: &str = "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'] }}{% endif %}{% endfor %}{% for message in messages %}{% if message['role'] == 'user' %}{{ '<｜User｜>' + message['content'] }}{% elif message['role'] == 'assistant' %}{{ '<｜Assistant｜>' + message['content'] + '<｜end▁of▁sentence｜>' }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<｜Assistant｜>' }}{% endif %}";

/// One conversation, tokenized.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    /// Token ids of the rendered conversation.
    pub ids: Vec<u32>,
    /// Whether each token is part of an assistant turn (a target the loss trains).
    pub assistant: Vec<bool>,
}

/// How conversations become examples.
#[derive(Debug, Clone)]
pub struct SftDataConfig {
    /// Longest example in tokens (a row of `max_len` tokens has `max_len - 1` targets).
    pub max_len: usize,
    /// Longer conversations are an error instead of being skipped.
    pub strict_length: bool,
    /// Train on every token, prompts included.
    pub train_on_prompt: bool,
    /// Pack several examples per row.
    pub pack: bool,
    /// Seed of the packing order.
    pub seed: u64,
}

/// The parsed messages of one JSONL line, in any of the three formats.
pub fn parse_line(line: &str) -> std::result::Result<Vec<Message>, String> {
    let value: Value = serde_json::from_str(line).map_err(|e| format!("malformed JSON: {e}"))?;
    let Value::Object(obj) = value else {
        return Err("expected a JSON object".into());
    };
    let text = |v: &Value, what: &str| -> std::result::Result<String, String> {
        v.as_str().map(str::to_string).ok_or_else(|| format!("`{what}` must be a string, got {v}"))
    };
    let messages = if let Some(list) = obj.get("messages") {
        let Value::Array(list) = list else { return Err("`messages` must be a list".into()) };
        list.iter()
            .map(|m| {
                let role = text(m.get("role").unwrap_or(&Value::Null), "role")?;
                let content = text(m.get("content").unwrap_or(&Value::Null), "content")?;
                Ok(Message { role, content })
            })
            .collect::<std::result::Result<Vec<_>, String>>()?
    } else if let Some(list) = obj.get("conversations") {
        let Value::Array(list) = list else { return Err("`conversations` must be a list".into()) };
        list.iter()
            .map(|m| {
                let from = text(m.get("from").unwrap_or(&Value::Null), "from")?;
                let role = match from.as_str() {
                    "human" | "user" => "user",
                    "gpt" | "assistant" => "assistant",
                    "system" => "system",
                    other => {
                        return Err(format!(
                            "unknown ShareGPT speaker `{other}`: expected human, gpt or system"
                        ))
                    }
                };
                let content = text(m.get("value").unwrap_or(&Value::Null), "value")?;
                Ok(Message { role: role.into(), content })
            })
            .collect::<std::result::Result<Vec<_>, String>>()?
    } else if let Some(instruction) = obj.get("instruction") {
        let mut user = text(instruction, "instruction")?;
        if let Some(input) = obj.get("input") {
            let input = text(input, "input")?;
            if !input.is_empty() {
                user = format!("{user}\n\n{input}");
            }
        }
        let output = text(obj.get("output").unwrap_or(&Value::Null), "output")?;
        let mut messages = Vec::new();
        if let Some(system) = obj.get("system") {
            messages.push(Message { role: "system".into(), content: text(system, "system")? });
        }
        messages.push(Message { role: "user".into(), content: user });
        messages.push(Message { role: "assistant".into(), content: output });
        messages
    } else {
        return Err("expected `messages` (OpenAI/TRL), `conversations` (ShareGPT) or `instruction`/`output` (alpaca)".into());
    };
    if let Some(m) =
        messages.iter().find(|m| !["system", "user", "assistant"].contains(&m.role.as_str()))
    {
        return Err(format!("unknown role `{}`: expected system, user or assistant", m.role));
    }
    if !messages.iter().any(|m| m.role == "assistant") {
        return Err("the conversation has no assistant turn: there is nothing to train on".into());
    }
    Ok(messages)
}

/// Renders `messages` and marks the assistant tokens (see the module docs).
pub fn tokenize_conversation(
    messages: &[Message],
    template: &ChatTemplate,
    tokenizer: &Tokenizer,
) -> std::result::Result<Example, String> {
    let render = |m: &[Message], generation: bool| {
        template.render(m, generation).map_err(|e| format!("{e:#}"))
    };
    let full = render(messages, false)?;
    let mut spans = Vec::new();
    for (i, m) in messages.iter().enumerate() {
        if m.role != "assistant" {
            continue;
        }
        let before = render(&messages[..i], true)?;
        let through = render(&messages[..=i], false)?;
        if !through.starts_with(&before) || !full.starts_with(&through) {
            return Err(format!(
                "the chat template does not render turn {i} as a continuation of the turns before it, so the assistant's tokens cannot be found by prefix; use a template that renders conversations turn by turn"
            ));
        }
        spans.push(before.len()..through.len());
    }
    let encoding =
        tokenizer.encode(full.as_str(), false).map_err(|e| format!("cannot tokenize: {e}"))?;
    let assistant = encoding
        .get_offsets()
        .iter()
        .map(|&(start, _)| spans.iter().any(|s| s.contains(&start)))
        .collect();
    Ok(Example { ids: encoding.get_ids().to_vec(), assistant })
}

/// What reading the data found besides the examples.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReadStats {
    /// Conversations read.
    pub conversations: usize,
    /// Conversations longer than `max_len`, skipped.
    pub too_long: usize,
}

/// Reads every JSONL file into examples. Errors name the file and line.
pub fn read_examples(
    files: &[PathBuf],
    template: &ChatTemplate,
    tokenizer: &Tokenizer,
    config: &SftDataConfig,
) -> Result<(Vec<Example>, ReadStats)> {
    let mut examples = Vec::new();
    let mut stats = ReadStats::default();
    for file in files {
        let text = std::fs::read_to_string(file).map_err(|e| TrainError::io(file, e))?;
        let before = examples.len() + stats.too_long;
        for (n, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let at = |problem: String| {
                TrainError::Data(format!("{}:{}: {problem}", file.display(), n + 1))
            };
            let messages = parse_line(line).map_err(at)?;
            let example = tokenize_conversation(&messages, template, tokenizer).map_err(at)?;
            if example.ids.len() < 2 {
                return Err(at(format!(
                    "the conversation renders to {} token(s): nothing to predict",
                    example.ids.len()
                )));
            }
            stats.conversations += 1;
            if example.ids.len() > config.max_len {
                if config.strict_length {
                    return Err(at(format!(
                        "the conversation is {} tokens, longer than --max-len {} (drop --strict-length to skip such conversations)",
                        example.ids.len(),
                        config.max_len
                    )));
                }
                stats.too_long += 1;
                continue;
            }
            examples.push(example);
        }
        if examples.len() + stats.too_long == before {
            return Err(TrainError::Data(format!(
                "{}: no conversations in the file",
                file.display()
            )));
        }
    }
    if examples.is_empty() {
        return Err(TrainError::Data(format!(
            "every one of the {} conversations is longer than --max-len {}",
            stats.conversations, config.max_len
        )));
    }
    Ok((examples, stats))
}

/// Rows of training examples (one each, or packed) and the validation examples.
pub struct SftData {
    /// Training rows: each a list of examples laid end to end.
    rows: Vec<Vec<Example>>,
    /// Validation examples, one per row.
    val: Vec<Example>,
    config: SftDataConfig,
}

impl SftData {
    /// Arranges `train` into rows (packed when the config says so).
    pub fn new(train: Vec<Example>, val: Vec<Example>, config: SftDataConfig) -> Result<Self> {
        if val.is_empty() {
            return Err(TrainError::Data("no validation conversations".into()));
        }
        let rows = if config.pack {
            let mut order: Vec<usize> = (0..train.len()).collect();
            let mut rng = SplitMix64::new(config.seed ^ 0x5EED_F00D);
            for i in (1..order.len()).rev() {
                order.swap(i, rng.below(i as u64 + 1) as usize);
            }
            // First fit into rows of max_len tokens.
            let mut rows: Vec<(usize, Vec<Example>)> = Vec::new();
            for i in order {
                let n = train[i].ids.len();
                match rows.iter_mut().find(|(used, _)| used + n <= config.max_len) {
                    Some((used, row)) => {
                        *used += n;
                        row.push(train[i].clone());
                    }
                    None => rows.push((n, vec![train[i].clone()])),
                }
            }
            rows.into_iter().map(|(_, r)| r).collect()
        } else {
            train.into_iter().map(|e| vec![e]).collect()
        };
        Ok(Self { rows, val, config })
    }

    /// Training rows (the data position advances by one per row).
    pub fn train_rows(&self) -> usize {
        self.rows.len()
    }

    /// Training examples.
    pub fn train_examples(&self) -> usize {
        self.rows.iter().map(Vec::len).sum()
    }

    /// The batch of `rows`, padded to the longest (or to `max_len` when `packed`).
    fn batch(&self, rows: &[&[Example]], packed: bool) -> HostBatch {
        let lens: Vec<usize> = rows.iter().map(|r| r.iter().map(|e| e.ids.len()).sum()).collect();
        let len = if packed {
            self.config.max_len
        } else {
            lens.iter().copied().max().unwrap_or(2).max(2)
        };
        let seq = len - 1;
        let (mut ids, mut weights, mut segments) = (Vec::new(), Vec::new(), Vec::new());
        let mut real = Vec::with_capacity(rows.len() * seq);
        let mut tokens = 0;
        for row in rows {
            let start = ids.len();
            let mut trained = Vec::with_capacity(len);
            for (d, e) in row.iter().enumerate() {
                ids.extend(e.ids.iter().map(|&t| t as i64));
                segments.extend(std::iter::repeat_n(d as u32, e.ids.len()));
                // The first token of a document is never a target (nothing predicts it).
                trained.push(false);
                trained.extend(e.assistant[1..].iter().map(|&a| a || self.config.train_on_prompt));
                tokens += e.ids.len() - 1;
            }
            let used = ids.len() - start;
            let pad = len - used;
            real.extend((0..seq).map(|i| (i < used) as i64));
            ids.extend(std::iter::repeat_n(0, pad));
            segments.extend(std::iter::repeat_n(row.len() as u32, pad));
            trained.extend(std::iter::repeat_n(false, pad));
            // Target i is token i + 1.
            weights.extend(trained[1..].iter().map(|&t| t as u8 as f32));
        }
        debug_assert_eq!(weights.len(), rows.len() * seq);
        HostBatch {
            rows: rows.len(),
            len,
            ids,
            weights: Some(weights),
            segments: packed.then_some(segments),
            tokens,
            real: real.contains(&0).then_some(real),
        }
    }
}

struct SftReader<'a> {
    data: &'a SftData,
    perm: Option<(u64, Vec<u32>)>,
}

impl BatchReader for SftReader<'_> {
    fn rows(&mut self, seed: u64, first: u64, rows: usize) -> HostBatch {
        let count = self.data.rows.len() as u64;
        let picked: Vec<&[Example]> = (first..first + rows as u64)
            .map(|position| {
                let epoch = position / count;
                if self.perm.as_ref().map(|(e, _)| *e) != Some(epoch) {
                    let mut rng = SplitMix64::new(seed ^ epoch.wrapping_mul(0xA24B_AED4_963E_E407));
                    let mut perm: Vec<u32> = (0..count as u32).collect();
                    for i in (1..perm.len()).rev() {
                        perm.swap(i, rng.below(i as u64 + 1) as usize);
                    }
                    self.perm = Some((epoch, perm));
                }
                let perm = &self.perm.as_ref().expect("set above").1;
                self.data.rows[perm[(position % count) as usize] as usize].as_slice()
            })
            .collect();
        self.data.batch(&picked, self.data.config.pack)
    }
}

impl TrainingData for SftData {
    fn reader(&self, _seq: usize) -> Result<Box<dyn BatchReader + '_>> {
        Ok(Box::new(SftReader { data: self, perm: None }))
    }

    /// One conversation per row, padded (validation is never packed).
    fn validation(&self, _seq: usize, batch: usize, limit: usize) -> Result<Vec<HostBatch>> {
        let chunks: Vec<Vec<&[Example]>> = self
            .val
            .chunks(batch.max(1))
            .map(|c| c.iter().map(std::slice::from_ref).collect())
            .collect();
        let take = if limit == 0 { chunks.len() } else { limit.min(chunks.len()) };
        Ok(chunks[..take].iter().map(|rows| self.batch(rows, false)).collect())
    }
}

/// The chat template of a model directory (`tokenizer_config.json`'s `chat_template`), or
/// [`DEFAULT_CHAT_TEMPLATE`] when it has none; with the template source used.
pub fn model_template(dir: &Path) -> Result<(ChatTemplate, String)> {
    let file = dir.join("tokenizer_config.json");
    let config: Option<Value> =
        match std::fs::read_to_string(&file) {
            Ok(text) => Some(serde_json::from_str(&text).map_err(|e| {
                TrainError::Data(format!("{} is not valid JSON: {e}", file.display()))
            })?),
            // Only a missing file means "no template": anything else is an error, not a silent
            // switch to the default format.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(TrainError::io(&file, e)),
        };
    let source = config
        .as_ref()
        .and_then(|c| c.get("chat_template"))
        .and_then(Value::as_str)
        .unwrap_or(DEFAULT_CHAT_TEMPLATE)
        .to_string();
    let text_of = |key: &str| token_text(config.as_ref()?.get(key));
    let bos = text_of("bos_token").unwrap_or_else(|| {
        if config.is_none() {
            "<｜begin▁of▁sentence｜>".into()
        } else {
            String::new()
        }
    });
    let template = ChatTemplate::new(&source, bos, text_of("eos_token"))
        .map_err(|e| TrainError::Data(format!("{}: {e:#}", file.display())))?;
    Ok((template, source))
}
