//! Expert parallelism (DeepSeek-V3 §3.2): the routed experts of every MoE layer spread over `N`
//! ranks (expert `e` on rank `⌊e·N/E⌋`). Each rank routes its own tokens, sends each expert's
//! rows to the rank that owns it (an all-to-all: counts first, then payloads), computes its
//! experts, and returns the results to their origin (the reverse all-to-all); backward runs the
//! same two exchanges in the opposite direction.
//!
//! - [`exchange`]: the [`Exchange`] interface between ranks.
//! - [`local`], [`tcp`], [`nccl`]: its implementations (threads, processes over TCP, CUDA GPUs).
//! - [`rendezvous`]: the multi-process bootstrap (rank, world, master address).
//! - [`group`]: a contiguous group of ranks of a larger exchange.
//! - [`placement`]: [`ExpertParallel`], which experts a rank owns.
//! - [`all_to_all`]: the differentiable all-to-all of rows.

pub mod all_to_all;
mod error;
mod exchange;
mod group;
mod local;
#[cfg(feature = "cuda")]
mod nccl;
mod placement;
mod rendezvous;
mod tcp;

pub use all_to_all::{all_to_all, Route};
pub use error::{ParallelError, Result};
pub use exchange::Exchange;
pub use group::GroupView;
pub use local::LocalExchange;
#[cfg(feature = "cuda")]
pub use nccl::{cuda_device_count, NcclExchange};
pub use placement::ExpertParallel;
pub use rendezvous::{Rendezvous, RendezvousConfig};
pub use tcp::TcpExchange;

/// Installs the all-to-all autodiff node for `Autodiff<B>`. Idempotent.
pub(crate) fn register_autodiff<B: burn::tensor::backend::Backend>() {
    all_to_all::register_autodiff::<B>();
}
