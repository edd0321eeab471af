//! Typed errors of the core crate: configuration and checkpoint problems, each naming the field,
//! tensor or file at fault and what was expected.

use std::path::PathBuf;

/// Everything that can go wrong while building a model from a configuration or a checkpoint.
#[derive(Debug, thiserror::Error)]
pub enum DeepSeekError {
    /// A configuration field is missing, malformed or inconsistent with another field.
    #[error("config field `{field}`: {problem}")]
    Config {
        /// The field (a `config.json` key or a setting).
        field: String,
        /// What is wrong and how to fix it.
        problem: String,
    },

    /// The `config.json` names an architecture or model type this crate does not implement.
    #[error("unknown architecture `{found}`: this crate loads DeepseekV3ForCausalLM / DeepseekV2ForCausalLM checkpoints (model_type deepseek_v3 or deepseek_v2)")]
    UnknownArchitecture {
        /// The architecture or model type found.
        found: String,
    },

    /// A file could not be read.
    #[error("cannot read `{path}`: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What the system said.
        #[source]
        source: std::io::Error,
    },

    /// A JSON file (config or shard index) is not valid JSON of the expected form.
    #[error("malformed JSON in `{path}`: {reason}")]
    Json {
        /// The file.
        path: PathBuf,
        /// What the parser said.
        reason: String,
    },

    /// A safetensors file is truncated or its header is malformed.
    #[error("malformed or truncated safetensors file `{path}`: {reason}")]
    MalformedSafetensors {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },

    /// The checkpoint lacks a tensor the configuration requires.
    #[error("missing tensor `{name}` (expected shape {expected:?}); looked in {searched}")]
    MissingTensor {
        /// The tensor's checkpoint name.
        name: String,
        /// Its shape from the config.
        expected: Vec<usize>,
        /// The files searched.
        searched: String,
    },

    /// A tensor has a shape other than the configuration implies.
    #[error("tensor `{name}` has shape {actual:?}, expected {expected:?} from the config")]
    ShapeMismatch {
        /// The tensor's checkpoint name.
        name: String,
        /// Its shape from the config.
        expected: Vec<usize>,
        /// Its stored shape.
        actual: Vec<usize>,
    },

    /// A tensor is stored in a dtype this loader does not read.
    #[error("tensor `{name}` has dtype {actual}, expected one of F32, BF16, F16")]
    WrongDtype {
        /// The tensor's checkpoint name.
        name: String,
        /// Its stored dtype.
        actual: String,
    },

    /// An FP8 tensor the loader cannot take: E5M2, or E4M3 without a `quantization_config`.
    #[error("tensor `{name}` is FP8 ({actual}) but {problem}")]
    Fp8Unsupported {
        /// The tensor's checkpoint name.
        name: String,
        /// Its stored dtype.
        actual: String,
        /// Why it cannot be read.
        problem: String,
    },

    /// FP8 weight data holds a NaN code (0x7F / 0xFF): the checkpoint is corrupt.
    #[error("FP8 tensor `{name}` holds NaN (code {code:#04x} at flat index {index}): the checkpoint is corrupt")]
    Fp8Nan {
        /// The tensor's checkpoint name.
        name: String,
        /// Flat index of the first NaN code.
        index: usize,
        /// The code.
        code: u8,
    },

    /// The checkpoint holds tensors that no part of the model uses.
    #[error("{} unexpected tensor(s) in the checkpoint, e.g. {}: the config and the checkpoint disagree (pass `allow_unused` to ignore)", names.len(), names.iter().take(5).cloned().collect::<Vec<_>>().join(", "))]
    UnexpectedTensors {
        /// Their checkpoint names.
        names: Vec<String>,
    },

    /// A LoRA adapter cannot be read, or does not fit the model.
    #[error("adapter `{path}`: {problem}")]
    Adapter {
        /// The adapter directory or file.
        path: PathBuf,
        /// What is wrong, and how to fix it.
        problem: String,
    },

    /// Input to a model call is out of range (token ids, sequence length).
    #[error("invalid input: {0}")]
    Input(String),
}

/// Result alias of the core crate.
pub type Result<T> = std::result::Result<T, DeepSeekError>;

impl DeepSeekError {
    pub(crate) fn config(field: impl Into<String>, problem: impl Into<String>) -> Self {
        Self::Config { field: field.into(), problem: problem.into() }
    }
}
