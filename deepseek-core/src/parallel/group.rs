//! A contiguous group of ranks (`members`) of a larger exchange, as an [`Exchange`] of its own:
//! the expert-parallel groups of a multi-process run share the one mesh (TCP or NCCL) that also
//! carries the data-parallel all-reduce.
//!
//! Each call is one collective of the whole underlying exchange in which buffers to and from
//! non-members are empty (NCCL skips them; TCP sends a header). So every group must call the
//! same collectives in the same order, which the groups of one training run do: they run the
//! same model, layer by layer.

use std::ops::Range;
use std::sync::Arc;

use super::error::{ParallelError, Result};
use super::exchange::Exchange;

/// This rank's group within `inner`.
#[derive(Debug, Clone)]
pub struct GroupView {
    inner: Arc<dyn Exchange>,
    members: Range<usize>,
}

impl GroupView {
    /// The group `members` of `inner`; this rank must be one of them.
    pub fn new(inner: Arc<dyn Exchange>, members: Range<usize>) -> Result<Self> {
        if !members.contains(&inner.rank()) || members.end > inner.size() {
            return Err(ParallelError::Config {
                field: "group",
                problem: format!(
                    "rank {} of {} is not in the group {members:?}",
                    inner.rank(),
                    inner.size()
                ),
            });
        }
        Ok(Self { inner, members })
    }

    /// Whole-exchange buffers: `own[i]` for member `i`, `fill` for the others.
    fn widen<T: Clone>(&self, own: Vec<Vec<T>>, fill: Vec<T>) -> Vec<Vec<T>> {
        let mut own = own.into_iter();
        (0..self.inner.size())
            .map(|j| {
                if self.members.contains(&j) {
                    own.next().expect("one per member")
                } else {
                    fill.clone()
                }
            })
            .collect()
    }
}

impl Exchange for GroupView {
    fn rank(&self) -> usize {
        self.inner.rank() - self.members.start
    }

    fn size(&self) -> usize {
        self.members.len()
    }

    fn all_to_all_counts(&self, send: Vec<Vec<u64>>) -> Result<Vec<Vec<u64>>> {
        super::exchange::check_send(self.rank(), self.size(), &send, None)?;
        let width = send.first().map_or(0, Vec::len);
        let got = self.inner.all_to_all_counts(self.widen(send, vec![0; width]))?;
        Ok(got[self.members.clone()].to_vec())
    }

    fn all_to_all(&self, send: Vec<Vec<f32>>, recv_lens: &[usize]) -> Result<Vec<Vec<f32>>> {
        super::exchange::check_send(self.rank(), self.size(), &send, Some(recv_lens))?;
        let lens: Vec<usize> = (0..self.inner.size())
            .map(|j| if self.members.contains(&j) { recv_lens[j - self.members.start] } else { 0 })
            .collect();
        let got = self.inner.all_to_all(self.widen(send, Vec::new()), &lens)?;
        Ok(got[self.members.clone()].to_vec())
    }

    fn all_reduce_sum(&self, values: &mut [f64]) -> Result<()> {
        // An all-to-all of the values (as pairs of f32 bit patterns) within the group, summed
        // here in member order.
        let bits: Vec<f32> = values
            .iter()
            .flat_map(|v| {
                let b = v.to_bits();
                [f32::from_bits(b as u32), f32::from_bits((b >> 32) as u32)]
            })
            .collect();
        let send = vec![bits; self.size()];
        let got = self.all_to_all(send, &vec![values.len() * 2; self.size()])?;
        values.fill(0.0);
        for buf in got {
            for (v, pair) in values.iter_mut().zip(buf.chunks_exact(2)) {
                *v += f64::from_bits(pair[0].to_bits() as u64 | (pair[1].to_bits() as u64) << 32);
            }
        }
        Ok(())
    }

    fn bytes_sent(&self) -> u64 {
        self.inner.bytes_sent()
    }
}
