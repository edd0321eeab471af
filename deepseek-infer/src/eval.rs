//! Evaluation (`deepseek eval`): multiple choice scored as lm-evaluation-harness scores it,
//! perplexity and bits per byte over a text, and generated answers checked exactly
//! ([`crate::checker`]) with pass@k.
//!
//! Multiple choice: the log-likelihood of each continuation given the context is the sum of
//! `log p(token | everything before)` over the continuation's tokens. As in
//! lm-evaluation-harness, the continuation's tokens are those of `tokenize(context +
//! continuation)` after the tokens of `tokenize(context)` (so a continuation starting with a
//! space merges as the tokenizer merges it), trailing spaces of the context move to the
//! continuation, and a request longer than the context window keeps its last tokens. `acc` picks
//! the largest log-likelihood, `acc_norm` the largest per byte of continuation text.
//! Requests run in batches of rows padded at the end: the model is causal, so padding after a
//! request cannot change its log-probabilities.

use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use burn::tensor::activation::log_softmax;
use burn::tensor::{backend::Backend, Int, Tensor, TensorData};
use deepseek_core::DeepSeekModel;
use serde_json::Value;

use crate::chat::{ChatTemplate, Message};
use crate::tokenizer::TextTokenizer;

/// A multiple-choice item.
#[derive(Debug, Clone, PartialEq)]
pub struct ChoiceItem {
    /// The context the choices continue (`question` or `context`, or a chat rendered as a
    /// prompt).
    pub context: String,
    /// The continuations.
    pub choices: Vec<String>,
    /// Index of the right one.
    pub answer: usize,
}

/// A question with a checkable answer.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateItem {
    /// The prompt text (a chat already rendered with the template).
    pub prompt: String,
    /// The gold answer.
    pub answer: String,
}

/// Reads JSONL, one item per non-empty line; `parse` gets each line's object. Errors name the
/// file and line; an empty file is an error.
pub fn read_items<T>(
    path: &Path,
    mut parse: impl FnMut(&serde_json::Map<String, Value>) -> Result<T>,
) -> Result<Vec<T>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut items = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = |e: anyhow::Error| anyhow!("{}:{}: {e:#}", path.display(), n + 1);
        let value: Value =
            serde_json::from_str(line).map_err(|e| at(anyhow!("malformed JSON: {e}")))?;
        let Value::Object(obj) = value else { return Err(at(anyhow!("expected a JSON object"))) };
        items.push(parse(&obj).map_err(at)?);
    }
    if items.is_empty() {
        bail!("{}: no items in the file", path.display());
    }
    Ok(items)
}

fn string(obj: &serde_json::Map<String, Value>, key: &str) -> Result<Option<String>> {
    match obj.get(key) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Number(n)) => Ok(Some(n.to_string())),
        Some(other) => bail!("`{key}` must be a string, got {other}"),
    }
}

/// The prompt of an item: `messages` rendered with the chat template (with the generation
/// prompt), else `prompt`/`question`/`context` as raw text behind the BOS the tokenizer config
/// asks for.
fn prompt_of(
    obj: &serde_json::Map<String, Value>,
    template: Option<&ChatTemplate>,
    bos: &str,
) -> Result<String> {
    if let Some(messages) = obj.get("messages") {
        let messages = parse_messages(messages)?;
        let template = template.ok_or_else(|| {
            anyhow!("a `messages` item needs the model's chat template (tokenizer_config.json)")
        })?;
        return template.render(&messages, true);
    }
    for key in ["prompt", "question", "context"] {
        if let Some(text) = string(obj, key)? {
            return Ok(format!("{bos}{text}"));
        }
    }
    bail!("expected `messages`, `prompt`, `question` or `context`")
}

/// An OpenAI-style `messages` list: objects with string `role` and `content`.
pub fn parse_messages(value: &Value) -> Result<Vec<Message>> {
    let Value::Array(list) = value else { bail!("`messages` must be a list") };
    list.iter()
        .map(|m| {
            let field = |k: &str| {
                m.get(k)
                    .and_then(Value::as_str)
                    .map(str::to_string)
                    .ok_or_else(|| anyhow!("a message needs a string `{k}`"))
            };
            Ok(Message { role: field("role")?, content: field("content")? })
        })
        .collect()
}

/// Parses a multiple-choice item: `{question | context | messages, choices, answer}`.
pub fn parse_choice(
    obj: &serde_json::Map<String, Value>,
    template: Option<&ChatTemplate>,
    bos: &str,
) -> Result<ChoiceItem> {
    let context = prompt_of(obj, template, bos)?;
    let Some(Value::Array(list)) = obj.get("choices") else {
        bail!("`choices` must be a list of strings")
    };
    let choices = list
        .iter()
        .map(|c| {
            c.as_str()
                .map(str::to_string)
                .ok_or_else(|| anyhow!("`choices` must be a list of strings, got {c}"))
        })
        .collect::<Result<Vec<_>>>()?;
    if choices.len() < 2 {
        bail!("`choices` needs at least two entries, got {}", choices.len());
    }
    let answer = match obj.get("answer") {
        Some(Value::Number(n)) => {
            n.as_u64().map(|v| v as usize).ok_or_else(|| anyhow!("`answer` {n} is not an index"))?
        }
        Some(Value::String(s)) => choices
            .iter()
            .position(|c| c == s)
            .ok_or_else(|| anyhow!("`answer` {s:?} is not one of the choices"))?,
        _ => bail!("`answer` must be the index of the right choice (or its text)"),
    };
    if answer >= choices.len() {
        bail!("`answer` {answer} is out of range for {} choices", choices.len());
    }
    Ok(ChoiceItem { context, choices, answer })
}

/// Parses a generation item: `{prompt | question | messages, answer}`.
pub fn parse_generate(
    obj: &serde_json::Map<String, Value>,
    template: Option<&ChatTemplate>,
    bos: &str,
) -> Result<GenerateItem> {
    let prompt = prompt_of(obj, template, bos)?;
    let answer = string(obj, "answer")?.ok_or_else(|| anyhow!("missing `answer`"))?;
    Ok(GenerateItem { prompt, answer })
}

/// The token ids of a choice request: the context's and the continuation's, lm-eval style.
pub fn encode_request(
    tok: &TextTokenizer,
    context: &str,
    continuation: &str,
) -> Result<(Vec<u32>, Vec<u32>)> {
    // Trailing spaces belong to the continuation (lm-evaluation-harness).
    let trimmed = context.trim_end_matches(' ');
    let moved = &context[trimmed.len()..];
    let continuation = format!("{moved}{continuation}");
    let whole = tok.encode(&format!("{trimmed}{continuation}"))?;
    let context_ids = tok.encode(trimmed)?;
    let shared = context_ids.len().min(whole.len());
    Ok((whole[..shared].to_vec(), whole[shared..].to_vec()))
}

/// Sums of continuation log-probabilities of `requests` (`(context, continuation)` ids), `batch`
/// requests per forward pass, each cut to its last `max_len + 1` tokens.
pub fn loglikelihoods<B: Backend>(
    model: &DeepSeekModel<B>,
    requests: &[(Vec<u32>, Vec<u32>)],
    batch: usize,
    max_len: usize,
    device: &B::Device,
    mut progress: impl FnMut(usize),
) -> Result<Vec<f64>> {
    let mut out = Vec::with_capacity(requests.len());
    for chunk in requests.chunks(batch.max(1)) {
        // Inputs are all tokens but the last; the continuation's tokens are the targets of the
        // last `cont.len()` inputs.
        let rows: Vec<(Vec<i64>, usize)> = chunk
            .iter()
            .map(|(ctx, cont)| {
                if cont.is_empty() {
                    bail!("an empty continuation has no log-likelihood");
                }
                let all: Vec<i64> = ctx.iter().chain(cont).map(|&t| t as i64).collect();
                let keep = all.len().min(max_len + 1);
                Ok((all[all.len() - keep..].to_vec(), cont.len().min(keep - 1)))
            })
            .collect::<Result<_>>()?;
        if rows.iter().any(|(r, n)| r.len() < 2 || *n == 0) {
            bail!("a request needs at least one token of context (the tokenizer adds no BOS here)");
        }
        let len = rows.iter().map(|(r, _)| r.len() - 1).max().expect("non-empty chunk");
        let ids: Vec<i64> = rows
            .iter()
            .flat_map(|(r, _)| {
                let inputs = &r[..r.len() - 1];
                inputs.iter().copied().chain(std::iter::repeat_n(0, len - inputs.len()))
            })
            .collect();
        let input = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [rows.len(), len]), device);
        let forward = || model.try_forward(input, Default::default());
        let logits = deepseek_core::pool::on_pool::<B, _>(forward)?.logits; // [b, len, V]
        let [b, _, vocab] = logits.dims();
        let logp =
            log_softmax(logits.reshape([b * len, vocab]).cast(burn::tensor::FloatDType::F32), 1);
        // Gather on the device: the target of every input position (padding gathers token 0).
        let targets: Vec<i64> = rows
            .iter()
            .flat_map(|(r, _)| {
                r[1..].iter().copied().chain(std::iter::repeat_n(0, len - (r.len() - 1)))
            })
            .collect();
        let targets =
            Tensor::<B, 2, Int>::from_data(TensorData::new(targets, [b * len, 1]), device);
        let picked: Vec<f32> = logp
            .gather(1, targets)
            .into_data()
            .convert::<f32>()
            .into_vec()
            .map_err(|e| anyhow!("{e:?}"))?;
        for (i, (r, n)) in rows.iter().enumerate() {
            let end = r.len() - 1; // inputs of this row
            out.push(picked[i * len + end - n..i * len + end].iter().map(|&v| v as f64).sum());
        }
        progress(chunk.len());
    }
    Ok(out)
}

/// The outcome of a multiple-choice item.
#[derive(Debug, Clone, PartialEq)]
pub struct ChoiceScore {
    pub loglikelihoods: Vec<f64>,
    /// argmax of the log-likelihoods.
    pub pred: usize,
    /// argmax of the log-likelihoods per byte of continuation.
    pub pred_norm: usize,
    pub gold: usize,
}

/// Scores `items` (see the module docs).
pub fn score_choices<B: Backend>(
    model: &DeepSeekModel<B>,
    tok: &TextTokenizer,
    items: &[ChoiceItem],
    batch: usize,
    device: &B::Device,
    progress: impl FnMut(usize),
) -> Result<Vec<ChoiceScore>> {
    let mut requests = Vec::new();
    for item in items {
        for c in &item.choices {
            requests.push(encode_request(tok, &item.context, c)?);
        }
    }
    let max_len = model.config.max_position_embeddings;
    let ll = loglikelihoods(model, &requests, batch, max_len, device, progress)?;
    let mut at = 0;
    Ok(items
        .iter()
        .map(|item| {
            let lls = ll[at..at + item.choices.len()].to_vec();
            at += item.choices.len();
            let argmax = |v: &[f64]| {
                v.iter().enumerate().fold(0, |best, (i, x)| if *x > v[best] { i } else { best })
            };
            let norm: Vec<f64> =
                lls.iter().zip(&item.choices).map(|(l, c)| l / c.len().max(1) as f64).collect();
            ChoiceScore {
                pred: argmax(&lls),
                pred_norm: argmax(&norm),
                loglikelihoods: lls,
                gold: item.answer,
            }
        })
        .collect())
}

/// Perplexity of a text: windows of `max_len` tokens (each window's first token is predicted
/// by nothing and not scored; the first window starts with BOS when given).
#[derive(Debug, Clone, PartialEq)]
pub struct Perplexity {
    /// Scored tokens.
    pub tokens: usize,
    /// Bytes of the text.
    pub bytes: usize,
    /// Summed negative log-likelihood, nats.
    pub nll: f64,
}

impl Perplexity {
    /// `exp(nll / tokens)`.
    pub fn token_perplexity(&self) -> f64 {
        (self.nll / self.tokens.max(1) as f64).exp()
    }

    /// `nll / (ln 2 · bytes)`.
    pub fn bits_per_byte(&self) -> f64 {
        self.nll / (std::f64::consts::LN_2 * self.bytes.max(1) as f64)
    }
}

/// [`Perplexity`] of `ids` (the text's tokens, BOS first when the tokenizer adds one).
pub fn perplexity<B: Backend>(
    model: &DeepSeekModel<B>,
    ids: &[u32],
    bytes: usize,
    max_len: usize,
    batch: usize,
    device: &B::Device,
    progress: impl FnMut(usize),
) -> Result<Perplexity> {
    if ids.len() < 2 {
        bail!("the text is {} token(s): nothing to predict", ids.len());
    }
    let window = max_len.max(2);
    let requests: Vec<(Vec<u32>, Vec<u32>)> = ids
        .chunks(window)
        .filter(|w| w.len() >= 2)
        .map(|w| (w[..1].to_vec(), w[1..].to_vec()))
        .collect();
    let tokens = requests.iter().map(|(_, c)| c.len()).sum();
    let ll = loglikelihoods(model, &requests, batch, window, device, progress)?;
    Ok(Perplexity { tokens, bytes, nll: -ll.iter().sum::<f64>() })
}
