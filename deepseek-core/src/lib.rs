#![doc = include_str!("../README.md")]

pub mod block;
pub mod cache;
pub mod checkpoint;
pub mod config;
pub mod device;
pub mod error;
pub mod fp8;
pub mod hf_config;
pub mod mla;
pub mod mlp;
pub mod model;
pub mod moe;
pub mod mtp;
pub mod norm;
pub mod params;
pub mod rope;

pub use cache::LatentCache;
pub use checkpoint::{load_model, save_model, LoadOptions};
pub use config::{DeepSeekConfig, ScoringFunc, TopkMethod};
pub use error::{DeepSeekError, Result};
pub use model::{AttentionPath, CachedOutput, DeepSeekModel, ForwardOptions, ModelOutput};
pub use params::ParamCount;
