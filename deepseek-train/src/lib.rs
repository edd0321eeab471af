#![doc = include_str!("../README.md")]

pub mod alloc;
pub mod balance;
pub mod checkpoint;
pub mod config;
pub mod corpus;
pub mod data;
pub mod distill;
pub mod distributed;
pub mod error;
pub mod export;
pub mod grpo;
pub mod loss;
pub mod metrics;
pub mod optim;
pub mod pipeline;
pub mod precision;
pub mod pretrain;
pub mod recompute;
pub mod schedule;
pub mod sft;
pub mod sft_data;
pub mod source;
pub mod trainer;

pub use config::{NonFinitePolicy, RunSettings, TrainConfig};
pub use error::{Result, TrainError};
pub use loss::BalanceMode;
pub use trainer::{Event, Trainer};
