//! The end product of a run: the model in Hugging Face layout (`config.json`,
//! `model.safetensors`, `tokenizer.json`) in `<out>/hf/`, which `deepseek generate`,
//! `deepseek logits` and transformers load.

use std::path::{Path, PathBuf};

use burn::tensor::backend::Backend;
use deepseek_core::DeepSeekModel;

use crate::data::{Dataset, TOKENIZER_FILE};
use crate::error::{Result, TrainError};

/// Subdirectory of the run directory.
pub const HF_DIR: &str = "hf";

/// Writes the model and the tokenizer to `<out>/hf/`; returns that directory.
pub fn export_hf<B: Backend>(model: &DeepSeekModel<B>, data: &Dataset, out: &Path) -> Result<PathBuf> {
    let dir = out.join(HF_DIR);
    deepseek_core::save_model(model, &dir)?;
    let bytes = std::fs::read(data.dir.join(TOKENIZER_FILE)).map_err(|e| TrainError::io(&data.dir.join(TOKENIZER_FILE), e))?;
    deepseek_core::checkpoint::write_atomic(&dir.join(TOKENIZER_FILE), &bytes)?;
    Ok(dir)
}
