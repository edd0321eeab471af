//! Typed errors of the training crate, each naming what to fix.

use std::path::{Path, PathBuf};

use deepseek_core::DeepSeekError;

/// Everything that can stop a training run.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// A model, configuration or checkpoint problem from the core crate.
    #[error(transparent)]
    Model(#[from] DeepSeekError),

    /// A file could not be read or written.
    #[error("`{path}`: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// The corpus or tokenizer is unusable (missing, empty, too short).
    #[error("data: {0}")]
    Data(String),

    /// The training settings contradict each other or the model.
    #[error("training config `{field}`: {problem}")]
    Config { field: String, problem: String },

    /// A checkpoint is corrupt or belongs to another run.
    #[error("checkpoint `{path}`: {problem}")]
    Checkpoint { path: PathBuf, problem: String },

    /// A rank of a parallel run failed (or lost a peer); the message names the cause.
    #[error("rank {rank}: {problem}")]
    Rank { rank: usize, problem: String },

    /// The loss or the gradient norm became NaN or infinite; nothing was written for this step.
    #[error("non-finite {what} ({value}) at step {step}; no checkpoint was written for it (lower the learning rate, or pass `--on-nonfinite skip`)")]
    NonFinite { step: usize, what: &'static str, value: f64 },
}

/// Result alias of the training crate.
pub type Result<T> = std::result::Result<T, TrainError>;

impl TrainError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io { path: path.to_path_buf(), source }
    }

    pub(crate) fn config(field: impl Into<String>, problem: impl Into<String>) -> Self {
        Self::Config { field: field.into(), problem: problem.into() }
    }

    pub(crate) fn checkpoint(path: &Path, problem: impl Into<String>) -> Self {
        Self::Checkpoint { path: path.to_path_buf(), problem: problem.into() }
    }
}
