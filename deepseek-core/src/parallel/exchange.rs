//! The one interface through which ranks move data: an all-to-all of per-peer buffers (counts
//! first, then payloads, as DeepSeek-V3's dispatch does) and a small all-reduce. Three
//! implementations: [`super::LocalExchange`] (threads of one process, any Burn devices),
//! [`super::TcpExchange`] (processes on one or several hosts, after a [`super::Rendezvous`]) and,
//! with the `cuda` feature, [`super::NcclExchange`] (CUDA GPUs through NCCL).
//!
//! Every rank of a group calls the same collectives in the same order with buffers sized by the
//! counts it received; a peer that never answers is an error after the exchange's timeout, never
//! a hang.

use std::fmt::Debug;
use std::sync::atomic::{AtomicU64, Ordering};

use super::error::Result;

/// Data movement between the ranks of one group.
pub trait Exchange: Send + Sync + Debug {
    /// This rank, `0..size()`.
    fn rank(&self) -> usize;

    /// Ranks in the group.
    fn size(&self) -> usize;

    /// `send[j]` goes to rank `j`; returns what each rank sent to this one. Every inner vector has
    /// the same length on every rank (checked). The counts of an all-to-all travel here first so
    /// that receivers can size the payload buffers.
    fn all_to_all_counts(&self, send: Vec<Vec<u64>>) -> Result<Vec<Vec<u64>>>;

    /// `send[j]` goes to rank `j`; returns the buffer from each rank, whose lengths the caller
    /// knows from the counts (`recv_lens[j]` values from rank `j`; checked).
    fn all_to_all(&self, send: Vec<Vec<f32>>, recv_lens: &[usize]) -> Result<Vec<Vec<f32>>>;

    /// Element-wise sum over the ranks, identical on every rank (summed in rank order).
    fn all_reduce_sum(&self, values: &mut [f64]) -> Result<()>;

    /// Bytes this rank has sent to other ranks so far (a rank's buffer to itself is not traffic).
    fn bytes_sent(&self) -> u64;
}

/// A byte counter for [`Exchange::bytes_sent`].
#[derive(Debug, Default)]
pub(crate) struct Traffic(AtomicU64);

impl Traffic {
    pub fn add(&self, bytes: usize) {
        self.0.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Checks the shape of an all-to-all request against the group.
pub(crate) fn check_send<T>(
    rank: usize,
    size: usize,
    send: &[Vec<T>],
    recv_lens: Option<&[usize]>,
) -> Result<()> {
    if send.len() != size {
        return Err(super::ParallelError::Mismatch {
            rank,
            problem: format!("all-to-all with {} buffers in a group of {size}", send.len()),
        });
    }
    if let Some(lens) = recv_lens {
        if lens.len() != size {
            return Err(super::ParallelError::Mismatch {
                rank,
                problem: format!(
                    "all-to-all expecting {} buffers in a group of {size}",
                    lens.len()
                ),
            });
        }
    }
    Ok(())
}

/// Checks that the buffer from `peer` has the announced length.
pub(crate) fn check_len(
    rank: usize,
    peer: usize,
    got: usize,
    expected: usize,
    what: &str,
) -> Result<()> {
    if got != expected {
        return Err(super::ParallelError::Mismatch {
            rank,
            problem: format!("{what} from rank {peer} holds {got} values, {expected} announced"),
        });
    }
    Ok(())
}
