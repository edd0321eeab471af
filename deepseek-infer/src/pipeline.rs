//! From a checkpoint directory to text: [`Pipeline`] bundles the model, its tokenizer, its chat
//! template, the BOS/EOS conventions of its `tokenizer_config.json` and an optional LoRA adapter.
//!
//! Prompts are tokenized as Hugging Face tokenizes them: the tokenizer's own post-processor runs
//! (`add_special_tokens=True`), and BOS is put first when `tokenizer_config.json` says
//! `add_bos_token` (as transformers' Llama-style tokenizers, DeepSeek-V3's class, do). Chat
//! prompts are the rendered template, tokenized without special tokens (the template writes BOS
//! itself), as `apply_chat_template` does. A reply ends at the tokenizer config's EOS token, else
//! the model config's.

use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use burn::tensor::backend::Backend;
use deepseek_core::{DeepSeekModel, LoadOptions};
use serde_json::Value;

use crate::chat::{token_text, ChatTemplate, Message};
use crate::engine::{generate_all, Engine, Finish, Request, SequenceId, TokenEvent};
use crate::generate::Decoding;
use crate::stop::StopStrings;
use crate::tokenizer::{IncrementalDecoder, TextTokenizer};

/// How to generate: the settings an API request carries.
#[derive(Debug, Clone)]
pub struct GenerationOptions {
    /// Most tokens to generate.
    pub max_new_tokens: usize,
    /// 0 decodes greedily.
    pub temperature: f32,
    /// Nucleus sampling threshold, in (0, 1].
    pub top_p: Option<f32>,
    /// Keep only this many most likely tokens.
    pub top_k: Option<usize>,
    /// Seed of the sampler.
    pub seed: u64,
    /// The reply ends before the first of these strings (not included).
    pub stop: Vec<String>,
}

impl Default for GenerationOptions {
    fn default() -> Self {
        Self {
            max_new_tokens: 128,
            temperature: 0.0,
            top_p: None,
            top_k: None,
            seed: 0,
            stop: vec![],
        }
    }
}

impl GenerationOptions {
    /// The token-level decoding these settings ask for (checked).
    pub fn decoding(&self) -> Result<Decoding> {
        Decoding::new(self.temperature, self.top_k, self.top_p, self.seed)
    }
}

/// A finished generation.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    /// The generated text (a stop string and the EOS token not included).
    pub text: String,
    /// The generated token ids (EOS included when generated).
    pub tokens: Vec<i64>,
    /// Tokens of the prompt.
    pub prompt_tokens: usize,
    /// Why generation ended.
    pub finish: Finish,
}

/// A model ready to generate text.
pub struct Pipeline<B: Backend> {
    /// The model (with the adapter applied, if one was given).
    pub model: DeepSeekModel<B>,
    /// Its tokenizer.
    pub tokenizer: TextTokenizer,
    /// Its chat template, if `tokenizer_config.json` has one.
    pub template: Option<ChatTemplate>,
    /// Put first in plain prompts (`add_bos_token`).
    pub bos_token_id: Option<u32>,
    /// Ends a reply.
    pub eos_token_id: Option<u32>,
    device: B::Device,
}

impl<B: Backend> Pipeline<B> {
    /// Loads `dir`: `config.json`, the safetensors weights, `tokenizer.json` and (if present)
    /// `tokenizer_config.json`.
    pub fn load(dir: impl AsRef<Path>, device: &B::Device) -> Result<Self> {
        Self::load_with_adapter(dir, None, device)
    }

    /// [`Pipeline::load`] with a LoRA adapter directory (PEFT layout) applied unmerged; the
    /// adapter's own `tokenizer_config.json`, when it has one, gives the chat template (the one
    /// it was trained with).
    pub fn load_with_adapter(
        dir: impl AsRef<Path>,
        adapter: Option<&Path>,
        device: &B::Device,
    ) -> Result<Self> {
        Self::load_with(dir, adapter, LoadOptions::default(), device)
    }

    /// [`Pipeline::load_with_adapter`] with loader options: the weights' dtype
    /// (`LoadOptions::default().with_dtype(WeightDtype::Bf16)` halves the memory of f32).
    pub fn load_with(
        dir: impl AsRef<Path>,
        adapter: Option<&Path>,
        options: LoadOptions,
        device: &B::Device,
    ) -> Result<Self> {
        let dir = dir.as_ref();
        let model = deepseek_core::load_model::<B>(dir, device, options)
            .with_context(|| format!("loading model from {}", dir.display()))?;
        let model = match adapter {
            Some(a) => deepseek_core::adapter::load_adapter(model, a)
                .with_context(|| format!("applying the adapter in {}", a.display()))?,
            None => model,
        };
        let tokenizer = TextTokenizer::from_file(&dir.join("tokenizer.json"))?;
        tokenizer.check_vocab(model.config.vocab_size)?;
        let config_file = tokenizer_config_file(dir, adapter);
        let (template, bos_token_id, eos) = if config_file.is_file() {
            read_tokenizer_config(&config_file, &tokenizer)?
        } else {
            (None, None, None)
        };
        let eos_token_id = eos.or(model.config.eos_token_id);
        Ok(Self { model, tokenizer, template, bos_token_id, eos_token_id, device: device.clone() })
    }

    /// The device the model runs on.
    pub fn device(&self) -> &B::Device {
        &self.device
    }

    /// Token ids of a plain prompt, as Hugging Face's tokenizer gives them with
    /// `add_special_tokens=True`.
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<i64>> {
        encode_plain(&self.tokenizer, self.bos_token_id, text)
    }

    /// Token ids of a conversation in the chat template, ending with the assistant's opener.
    pub fn encode_chat(&self, messages: &[Message]) -> Result<Vec<i64>> {
        let template = self.template.as_ref().ok_or_else(|| {
            anyhow!("this model has no chat template (`chat_template` in tokenizer_config.json)")
        })?;
        encode_chat_with(template, &self.tokenizer, messages)
    }

    /// The engine request for prompt ids under `options` (EOS as its stop token).
    pub fn request(&self, prompt: Vec<i64>, options: &GenerationOptions) -> Result<Request> {
        Ok(Request {
            prompt,
            max_new_tokens: options.max_new_tokens,
            decoding: options.decoding()?,
            stop_tokens: self.eos_token_id.map(i64::from).into_iter().collect(),
            stop_sequences: vec![],
        })
    }

    /// Continues a plain prompt.
    pub fn generate(&self, prompt: &str, options: &GenerationOptions) -> Result<String> {
        Ok(self.complete(self.encode_prompt(prompt)?, options, |_| Ok(()))?.text)
    }

    /// The assistant's reply to a conversation.
    pub fn chat(&self, messages: &[Message], options: &GenerationOptions) -> Result<String> {
        Ok(self.complete(self.encode_chat(messages)?, options, |_| Ok(()))?.text)
    }

    /// [`Pipeline::generate`] as a stream of text pieces: each item is the text that became
    /// final with the latest token (never a partial character, never text a stop string
    /// removes).
    pub fn generate_stream(
        &self,
        prompt: &str,
        options: &GenerationOptions,
    ) -> Result<TextStream<'_, B>> {
        TextStream::new(self, self.encode_prompt(prompt)?, options)
    }

    /// [`Pipeline::chat`] as a stream of text pieces.
    pub fn chat_stream(
        &self,
        messages: &[Message],
        options: &GenerationOptions,
    ) -> Result<TextStream<'_, B>> {
        TextStream::new(self, self.encode_chat(messages)?, options)
    }

    /// Generates from prompt ids, calling `on_piece` with each final piece of text; returns the
    /// whole completion.
    pub fn complete(
        &self,
        prompt: Vec<i64>,
        options: &GenerationOptions,
        mut on_piece: impl FnMut(&str) -> Result<()>,
    ) -> Result<Completion> {
        let mut stream = TextStream::new(self, prompt, options)?;
        for piece in &mut stream {
            on_piece(&piece?)?;
        }
        stream.completion()
    }

    /// Continues several plain prompts together (continuous batching, at most `max_batch` at a
    /// time); replies in prompt order, each what it would be alone.
    pub fn generate_batch(
        &self,
        prompts: &[&str],
        options: &GenerationOptions,
        max_batch: usize,
    ) -> Result<Vec<String>> {
        let requests = prompts
            .iter()
            .map(|p| self.request(self.encode_prompt(p)?, options))
            .collect::<Result<Vec<_>>>()?;
        let mut texts: Vec<Texts> = prompts.iter().map(|_| Texts::new(self, options)).collect();
        generate_all(&self.model, requests, max_batch, &self.device, &mut |i, event| {
            texts[i].push(event.token)
        })?;
        texts.into_iter().map(|mut t| t.finish()).collect()
    }
}

/// The `tokenizer_config.json` that governs a model with an optional adapter: the adapter's when
/// it has one (the template it was trained with), else the model's (which may not exist).
pub fn tokenizer_config_file(model: &Path, adapter: Option<&Path>) -> std::path::PathBuf {
    adapter
        .map(|a| a.join("tokenizer_config.json"))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| model.join("tokenizer_config.json"))
}

/// Token ids of a chat prompt: `messages` in `template`, ending with the assistant's opener,
/// tokenized without special tokens (the template writes BOS), as `apply_chat_template` does.
pub fn encode_chat_with(
    template: &ChatTemplate,
    tokenizer: &TextTokenizer,
    messages: &[Message],
) -> Result<Vec<i64>> {
    let text = template.render(messages, true)?;
    Ok(tokenizer.encode(&text)?.into_iter().map(i64::from).collect())
}

/// Token ids of a plain prompt as Hugging Face's tokenizer gives them with
/// `add_special_tokens=True`: the tokenizer's post-processor, then `bos` first unless it already
/// is.
pub fn encode_plain(tokenizer: &TextTokenizer, bos: Option<u32>, text: &str) -> Result<Vec<i64>> {
    let ids = tokenizer.encode_with_special_tokens(text)?;
    let bos = bos.filter(|&b| ids.first() != Some(&b));
    Ok(bos.into_iter().chain(ids).map(i64::from).collect())
}

/// Reads the chat template, BOS (when `add_bos_token`) and EOS of a `tokenizer_config.json`.
pub fn read_tokenizer_config(
    file: &Path,
    tokenizer: &TextTokenizer,
) -> Result<(Option<ChatTemplate>, Option<u32>, Option<u32>)> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    let config: Value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not valid JSON", file.display()))?;
    let id_of = |key: &str| -> Result<Option<u32>> {
        match token_text(config.get(key)) {
            None => Ok(None),
            Some(t) => tokenizer.token_id(&t).map(Some).ok_or_else(|| {
                anyhow!("{}: {key} `{t}` is not a token of tokenizer.json", file.display())
            }),
        }
    };
    let add_bos = config.get("add_bos_token").and_then(Value::as_bool).unwrap_or(false);
    let bos = if add_bos { id_of("bos_token")? } else { None };
    if add_bos && bos.is_none() {
        bail!("{}: add_bos_token is set but there is no bos_token", file.display());
    }
    let template = match config.get("chat_template") {
        Some(_) => Some(ChatTemplate::from_tokenizer_config(file)?),
        None => None,
    };
    // An EOS the tokenizer lacks (a template's text marker) leaves the model config's EOS.
    let eos = token_text(config.get("eos_token")).and_then(|t| tokenizer.token_id(&t));
    Ok((template, bos, eos))
}

/// Text of one sequence as its tokens arrive: incremental detokenization, EOS dropped, stop
/// strings applied.
pub(crate) struct Texts<'p> {
    decoder: IncrementalDecoder<'p>,
    stops: StopStrings,
    eos: Option<i64>,
    text: String,
}

impl<'p> Texts<'p> {
    fn new<B: Backend>(pipeline: &'p Pipeline<B>, options: &GenerationOptions) -> Self {
        Self::with(&pipeline.tokenizer, pipeline.eos_token_id, &options.stop)
    }

    pub(crate) fn with(tokenizer: &'p TextTokenizer, eos: Option<u32>, stop: &[String]) -> Self {
        Self {
            decoder: IncrementalDecoder::new(tokenizer),
            stops: StopStrings::new(stop),
            eos: eos.map(i64::from),
            text: String::new(),
        }
    }

    /// Whether a stop string ended the text.
    pub(crate) fn stopped(&self) -> bool {
        self.stops.stopped()
    }

    /// Takes a token; `false` once a stop string ended the text.
    fn push(&mut self, token: i64) -> Result<bool> {
        self.piece(token)?;
        Ok(!self.stops.stopped())
    }

    /// Takes a token; returns the text that became final.
    pub(crate) fn piece(&mut self, token: i64) -> Result<String> {
        if Some(token) == self.eos || self.stops.stopped() {
            return Ok(String::new());
        }
        let id = u32::try_from(token).map_err(|_| anyhow!("token id {token} out of range"))?;
        let piece = self.stops.push(&self.decoder.push(id)?);
        self.text.push_str(&piece);
        Ok(piece)
    }

    /// The held-back rest at the end of generation.
    pub(crate) fn flush(&mut self) -> String {
        let rest = self.stops.flush();
        self.text.push_str(&rest);
        rest
    }

    fn finish(&mut self) -> Result<String> {
        self.flush();
        Ok(std::mem::take(&mut self.text))
    }
}

/// The text pieces of one generation, as they become final ([`Pipeline::generate_stream`]).
pub struct TextStream<'p, B: Backend> {
    engine: Engine<'p, B>,
    id: Option<SequenceId>,
    texts: Texts<'p>,
    /// The first token, chosen by the prefill, not yet turned into text.
    first: Option<TokenEvent>,
    tokens: Vec<i64>,
    prompt_tokens: usize,
    finish: Option<Finish>,
    flushed: bool,
}

impl<'p, B: Backend> TextStream<'p, B> {
    fn new(
        pipeline: &'p Pipeline<B>,
        prompt: Vec<i64>,
        options: &GenerationOptions,
    ) -> Result<Self> {
        let prompt_tokens = prompt.len();
        let request = pipeline.request(prompt, options)?;
        let context = (prompt_tokens + request.max_new_tokens)
            .clamp(1, pipeline.model.config.max_position_embeddings);
        let mut engine = Engine::new(&pipeline.model, 1, context, &pipeline.device)?;
        let (id, first) = engine.add(request)?;
        let finish = first.is_none().then_some(Finish::Length);
        Ok(Self {
            engine,
            id: Some(id),
            texts: Texts::new(pipeline, options),
            first,
            tokens: Vec::new(),
            prompt_tokens,
            finish,
            flushed: false,
        })
    }

    fn next_piece(&mut self) -> Result<Option<String>> {
        loop {
            if self.finish.is_some() {
                if self.flushed {
                    return Ok(None);
                }
                self.flushed = true;
                let rest = self.texts.flush();
                return Ok((!rest.is_empty()).then_some(rest));
            }
            let event = match self.first.take() {
                Some(e) => e,
                None => match self.engine.step()?.pop() {
                    Some(e) => e,
                    None => bail!("the sequence left the engine without finishing"),
                },
            };
            self.tokens.push(event.token);
            let piece = self.texts.piece(event.token)?;
            if self.texts.stopped() {
                if let Some(id) = self.id.take() {
                    self.engine.cancel(id);
                }
                self.finish = Some(Finish::Stop);
            } else if let Some(f) = event.finish {
                self.finish = Some(f);
            }
            if !piece.is_empty() {
                return Ok(Some(piece));
            }
        }
    }

    /// The whole completion, once the stream is exhausted (generating the rest if it is not).
    pub fn completion(mut self) -> Result<Completion> {
        while self.next_piece()?.is_some() {}
        Ok(Completion {
            text: std::mem::take(&mut self.texts.text),
            tokens: self.tokens,
            prompt_tokens: self.prompt_tokens,
            finish: self.finish.expect("finished"),
        })
    }
}

impl<B: Backend> Iterator for TextStream<'_, B> {
    type Item = Result<String>;

    fn next(&mut self) -> Option<Result<String>> {
        match self.next_piece() {
            Ok(piece) => piece.map(Ok),
            Err(e) => {
                self.finish.get_or_insert(Finish::Stop);
                self.flushed = true;
                Some(Err(e))
            }
        }
    }
}
