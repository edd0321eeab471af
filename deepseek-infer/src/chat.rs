//! Chat prompts from the model's own template: `chat_template` in `tokenizer_config.json`,
//! rendered with minijinja the way transformers renders it with jinja2 (`trim_blocks`,
//! `lstrip_blocks`, loop controls, `bos_token` in scope), so no model's prompt format is
//! hand-coded here.

use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use serde::Serialize;
use serde_json::Value;

/// One turn of a conversation.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Self {
        Self { role: role.into(), content: content.into() }
    }
}

/// A chat template and the special tokens it refers to.
pub struct ChatTemplate {
    env: minijinja::Environment<'static>,
    /// Text of the beginning-of-sequence token, passed to the template as `bos_token`.
    pub bos_token: String,
    /// Text of the end-of-sequence token (ends an assistant turn).
    pub eos_token: Option<String>,
}

/// A special token in `tokenizer_config.json`: a string or `{"content": ...}`.
pub fn token_text(value: Option<&Value>) -> Option<String> {
    match value? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

impl ChatTemplate {
    /// The id of the token that ends a turn: the template's EOS as `tokenizer` spells it, else
    /// `model_eos` (the model config's `eos_token_id`).
    pub fn end_of_turn(
        &self,
        tokenizer: &crate::tokenizer::TextTokenizer,
        model_eos: Option<u32>,
    ) -> Option<i64> {
        self.eos_token.as_deref().and_then(|t| tokenizer.token_id(t)).or(model_eos).map(i64::from)
    }

    /// Reads `tokenizer_config.json` (a file, or a directory holding one).
    pub fn from_tokenizer_config(path: &Path) -> Result<Self> {
        let file =
            if path.is_dir() { path.join("tokenizer_config.json") } else { path.to_path_buf() };
        let text = std::fs::read_to_string(&file)
            .with_context(|| format!("cannot read {}", file.display()))?;
        let config: Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not valid JSON", file.display()))?;
        let Some(template) = config.get("chat_template").and_then(Value::as_str) else {
            bail!("{} has no `chat_template`: this model has no chat format", file.display());
        };
        Self::new(
            template,
            token_text(config.get("bos_token")).unwrap_or_default(),
            token_text(config.get("eos_token")),
        )
    }

    /// A template from its source text.
    pub fn new(template: &str, bos_token: String, eos_token: Option<String>) -> Result<Self> {
        let mut env = minijinja::Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        // transformers' templates call Python string methods (`content.split(...)`, `strip`).
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_template_owned("chat", template.to_string())
            .map_err(|e| anyhow!("invalid chat template: {e}"))?;
        Ok(Self { env, bos_token, eos_token })
    }

    /// The prompt text for `messages`, ending with the assistant's turn opener when
    /// `add_generation_prompt`.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let template = self.env.get_template("chat").expect("added in new");
        template
            .render(minijinja::context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => self.bos_token.clone(),
                eos_token => self.eos_token.clone(),
            })
            .map_err(|e| anyhow!("cannot render the chat template: {e}"))
    }
}
