//! The end product of a run: the model in Hugging Face layout (`config.json`,
//! `model.safetensors`, `tokenizer.json`, `tokenizer_config.json`) in `<out>/hf/`, which
//! `deepseek generate`, `deepseek chat`, `deepseek logits` and transformers load.
//!
//! `tokenizer_config.json` is the one the tokenizer came with when it did (a `--tokenizer` file
//! or an `--init-from` model with one beside it). Otherwise it is written here: BOS and EOS are
//! the tokens of the model's `bos_token_id` / `eos_token_id`, and without an EOS id the newline
//! token, since every document of the built-in corpus (and every line of a text file) ends with
//! one. The chat template is then a continuation format, the one a model pretrained on plain
//! lines of text can follow: earlier messages one per line, and the last one left open for the
//! model to complete, so a reply ends at the newline.

use std::path::{Path, PathBuf};

use burn::tensor::backend::Backend;
use deepseek_core::DeepSeekModel;
use serde_json::json;
use tokenizers::Tokenizer;

use crate::data::{Dataset, TokenizerSource, TOKENIZER_FILE};
use crate::error::{Result, TrainError};

/// Subdirectory of the run directory.
pub const HF_DIR: &str = "hf";

/// The tokenizer config file beside `tokenizer.json`.
pub const TOKENIZER_CONFIG_FILE: &str = "tokenizer_config.json";

/// The chat template written for a model pretrained on plain lines: each message on its own
/// line, the last one open for the model to continue when a reply is asked for. The newline is
/// an expression, not template text: chat templates render with `trim_blocks`, which drops a
/// newline that follows a block tag.
pub const LINE_CHAT_TEMPLATE: &str = "{% if bos_token %}{{ bos_token }}{% endif %}{% for message in messages %}{{ message['content'] }}{% if not (loop.last and add_generation_prompt) %}{{ '\\n' }}{% endif %}{% endfor %}";

/// Writes the model, the tokenizer and its config to `<out>/hf/`; returns that directory.
pub fn export_hf<B: Backend>(
    model: &DeepSeekModel<B>,
    data: &Dataset,
    out: &Path,
) -> Result<PathBuf> {
    let dir = out.join(HF_DIR);
    deepseek_core::save_model(model, &dir)?;
    let source = data.dir.join(TOKENIZER_FILE);
    let bytes = std::fs::read(&source).map_err(|e| TrainError::io(&source, e))?;
    deepseek_core::checkpoint::write_atomic(&dir.join(TOKENIZER_FILE), &bytes)?;
    let config = match shipped_config(&data.meta.config.tokenizer) {
        Some(path) => std::fs::read(&path).map_err(|e| TrainError::io(&path, e))?,
        None => {
            let cfg = &model.config;
            tokenizer_config(&data.tokenizer, cfg.bos_token_id, cfg.eos_token_id)?
                .to_string()
                .into_bytes()
        }
    };
    deepseek_core::checkpoint::write_atomic(&dir.join(TOKENIZER_CONFIG_FILE), &config)?;
    Ok(dir)
}

/// The `tokenizer_config.json` that came with a tokenizer file, if there is one.
fn shipped_config(source: &TokenizerSource) -> Option<PathBuf> {
    let TokenizerSource::File(path) = source else { return None };
    let beside = path.parent()?.join(TOKENIZER_CONFIG_FILE);
    beside.is_file().then_some(beside)
}

/// A `tokenizer_config.json` for `tokenizer` (see the module docs).
///
/// # Errors
/// A BOS or EOS id outside the tokenizer, or no EOS id and no single newline token.
pub fn tokenizer_config(
    tokenizer: &Tokenizer,
    bos_id: Option<u32>,
    eos_id: Option<u32>,
) -> Result<serde_json::Value> {
    let token = |id: u32, what: &str| {
        tokenizer.id_to_token(id).ok_or_else(|| {
            TrainError::Data(format!("{what} id {id} is not in the tokenizer's vocabulary"))
        })
    };
    let bos = bos_id.map(|id| token(id, "bos_token_id")).transpose()?;
    let eos = match eos_id {
        Some(id) => token(id, "eos_token_id")?,
        None => {
            let newline = tokenizer
                .encode("\n", false)
                .map_err(|e| TrainError::Data(format!("cannot tokenize a newline: {e}")))?;
            match newline.get_ids() {
                [id] => token(*id, "newline")?,
                ids => {
                    return Err(TrainError::Data(format!(
                        "the model has no eos_token_id and a newline is {} tokens, not one",
                        ids.len()
                    )))
                }
            }
        }
    };
    Ok(json!({
        "add_bos_token": bos.is_some(),
        "add_eos_token": false,
        "bos_token": bos,
        "eos_token": eos,
        "clean_up_tokenization_spaces": false,
        "model_max_length": 1_000_000_000_000_000_000u64,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": LINE_CHAT_TEMPLATE,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::byte_tokenizer;

    #[test]
    fn byte_models_end_turns_at_the_newline_token() {
        let tok = byte_tokenizer();
        let cfg = tokenizer_config(&tok, None, None).unwrap();
        let eos = cfg["eos_token"].as_str().unwrap();
        assert_eq!(tok.token_to_id(eos), Some(10), "the byte-level token of '\\n'");
        assert!(cfg["bos_token"].is_null() && cfg["add_bos_token"] == false);
        let with_ids = tokenizer_config(&tok, Some(2), Some(3)).unwrap();
        assert_eq!(tok.token_to_id(with_ids["bos_token"].as_str().unwrap()), Some(2));
        assert_eq!(tok.token_to_id(with_ids["eos_token"].as_str().unwrap()), Some(3));
        assert!(tokenizer_config(&tok, None, Some(300)).is_err(), "an id outside the vocabulary");
    }
}
