//! Hugging Face `tokenizer.json` through the `tokenizers` crate, checked against the model's
//! vocabulary, and incremental detokenization for streaming output that never emits a partial
//! UTF-8 character (byte-level BPE splits multi-byte characters across tokens).

use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};

/// A loaded tokenizer.
pub struct TextTokenizer {
    inner: tokenizers::Tokenizer,
}

impl TextTokenizer {
    /// Loads `tokenizer.json` (a file, or a directory holding one).
    pub fn from_file(path: &Path) -> Result<Self> {
        let file = if path.is_dir() { path.join("tokenizer.json") } else { path.to_path_buf() };
        let inner = tokenizers::Tokenizer::from_file(&file)
            .map_err(|e| anyhow!("cannot load tokenizer {}: {e}", file.display()))?;
        Ok(Self { inner })
    }

    /// Fails unless every token id fits the model's embedding (`vocab_size` rows). Models may
    /// have more rows than the tokenizer has tokens (padding), never fewer.
    pub fn check_vocab(&self, model_vocab: usize) -> Result<()> {
        let n = self.inner.get_vocab_size(true);
        if n > model_vocab {
            bail!("the tokenizer has {n} tokens but the model's vocabulary has {model_vocab}: they do not belong together");
        }
        Ok(())
    }

    /// Token ids of `text`, without added special tokens (callers add BOS or a chat template).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, false).map_err(|e| anyhow!("cannot tokenize: {e}"))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Token ids of `text` with the tokenizer's post-processor applied (`add_special_tokens=True`
    /// in Python; whether that adds BOS depends on `tokenizer.json`).
    pub fn encode_with_special_tokens(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, true).map_err(|e| anyhow!("cannot tokenize: {e}"))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids` (special tokens kept as text).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, false).map_err(|e| anyhow!("cannot detokenize: {e}"))
    }

    /// Id of a token string such as `<｜end▁of▁sentence｜>`, or of a text that is exactly one
    /// token (`\n` of a byte-level vocabulary, whose token string is `Ċ`, as a template's EOS).
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token).or_else(|| match self.encode(token).ok()?.as_slice() {
            [id] => Some(*id),
            _ => None,
        })
    }
}

/// Streams text as tokens arrive. Decodes a window of recent tokens and emits only the text that
/// is complete: while the window ends inside a multi-byte character the decoder yields U+FFFD,
/// and nothing is emitted until the character is whole.
pub struct IncrementalDecoder<'a> {
    tokenizer: &'a TextTokenizer,
    ids: Vec<u32>,
    /// Start of the window whose text has been partly emitted.
    prefix: usize,
    /// End of the text already emitted, as a token index.
    read: usize,
}

impl<'a> IncrementalDecoder<'a> {
    pub fn new(tokenizer: &'a TextTokenizer) -> Self {
        Self { tokenizer, ids: Vec::new(), prefix: 0, read: 0 }
    }

    /// Adds a token; returns the newly complete text, possibly empty.
    pub fn push(&mut self, id: u32) -> Result<String> {
        self.ids.push(id);
        let before = self
            .tokenizer
            .decode(&self.ids[self.prefix..self.read])
            .context("incremental decode")?;
        let now = self.tokenizer.decode(&self.ids[self.prefix..]).context("incremental decode")?;
        if now.len() > before.len()
            && !now.ends_with('\u{FFFD}')
            && now.is_char_boundary(before.len())
        {
            let new = now[before.len()..].to_string();
            self.prefix = self.read;
            self.read = self.ids.len();
            Ok(new)
        } else {
            Ok(String::new())
        }
    }
}
