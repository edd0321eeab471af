#![doc = include_str!("../README.md")]
#![warn(missing_docs)]

pub mod adapter;
pub mod block;
pub mod cache;
pub mod checkpoint;
pub mod config;
#[cfg(feature = "kernels")]
pub(crate) mod cube;
pub mod device;
pub mod dtype;
pub mod error;
pub mod few_rows;
pub mod finetune;
pub mod fp8;
mod hf_config;
pub mod lora;
pub mod memory;
pub mod mla;
pub mod mlp;
pub mod model;
pub mod moe;
pub mod mtp;
pub mod norm;
pub mod packing;
pub mod parallel;
pub mod params;
pub mod policy;
pub mod pool;
pub mod projection;
mod registry;
pub mod rope;
pub mod slot_cache;

pub use cache::LatentCache;
pub use checkpoint::{load_model, save_model, LoadOptions};
pub use config::{DeepSeekConfig, ScoringFunc, TopkMethod};
pub use dtype::WeightDtype;
pub use error::{DeepSeekError, Result};
pub use lora::{LoraSettings, LoraTargets};
pub use model::{AttentionPath, CachedOutput, DeepSeekModel, ForwardOptions, ModelOutput};
pub use packing::Packing;
pub use params::ParamCount;
pub use policy::ExecutionPolicy;
pub use projection::Projection;
pub use slot_cache::SlotCache;

/// Installs this crate's custom autodiff operations for `Autodiff<B>`: the FP8 training GEMM
/// (quantized Dgrad and Wgrad) and, on GPU backends, the device MoE dispatch/combine. Model code is
/// generic over the backend, so these are found per backend type at run time; call this once for
/// the inner backend of a training run. Idempotent.
pub fn register_autodiff<B: burn::tensor::backend::Backend>() {
    fp8::register_autodiff::<B>();
    moe::register_autodiff::<B>();
    parallel::register_autodiff::<B>();
    registry::mark_installed::<B>();
}

/// Whether [`register_autodiff`] installed this crate's custom operations for `AB`, an autodiff
/// backend (`Autodiff<Inner>`). Training on an autodiff backend without them panics at the first
/// MoE layer or FP8 GEMM, naming the call to make.
pub fn autodiff_ops_installed<AB: burn::tensor::backend::Backend>() -> bool {
    registry::installed::<AB>()
}
