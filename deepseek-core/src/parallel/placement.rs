//! Expert placement for expert parallelism (DeepSeek-V3 §3.2): with `N` ranks and `E` routed
//! experts, expert `e` lives on rank `⌊e·N/E⌋`, so each rank owns a contiguous block of `E/N`
//! experts and the rows of a dispatch, grouped by expert, are already grouped by owner.

use std::ops::Range;
use std::sync::Arc;

use super::error::{ParallelError, Result};
use super::exchange::Exchange;

/// Where the routed experts of an MoE layer run, and the exchange that reaches them. Held by the
/// layer as a setting (not a parameter); cloning shares the exchange.
#[derive(Clone, Debug)]
pub struct ExpertParallel {
    exchange: Arc<dyn Exchange>,
    n_experts: usize,
}

impl ExpertParallel {
    /// Experts `0..n_experts` spread over the ranks of `exchange`.
    pub fn new(exchange: Arc<dyn Exchange>, n_experts: usize) -> Result<Self> {
        let ranks = exchange.size();
        if ranks == 0 || !n_experts.is_multiple_of(ranks) {
            return Err(ParallelError::ExpertsNotDivisible { experts: n_experts, ranks });
        }
        Ok(Self { exchange, n_experts })
    }

    /// The exchange between the expert-parallel ranks.
    pub fn exchange(&self) -> &Arc<dyn Exchange> {
        &self.exchange
    }

    /// Routed experts of the layer.
    pub fn n_experts(&self) -> usize {
        self.n_experts
    }

    /// The rank that owns expert `e`: `⌊e·N/E⌋`.
    pub fn owner(&self, expert: usize) -> usize {
        expert * self.exchange.size() / self.n_experts
    }

    /// The experts of `rank`.
    pub fn experts_of(&self, rank: usize) -> Range<usize> {
        let per_rank = self.n_experts / self.exchange.size();
        rank * per_rank..(rank + 1) * per_rank
    }

    /// The experts this rank computes.
    pub fn local_experts(&self) -> Range<usize> {
        self.experts_of(self.exchange.rank())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parallel::LocalExchange;
    use std::time::Duration;

    #[test]
    fn expert_e_lives_on_rank_e_times_n_over_e() {
        let group = LocalExchange::group(4, Duration::from_secs(1));
        let ep = ExpertParallel::new(Arc::new(group.into_iter().nth(2).unwrap()), 16).unwrap();
        assert_eq!(
            (0..16).map(|e| ep.owner(e)).collect::<Vec<_>>(),
            [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3]
        );
        assert_eq!(ep.local_experts(), 8..12);
        for r in 0..4 {
            assert!(ep.experts_of(r).all(|e| ep.owner(e) == r));
        }
    }

    #[test]
    fn experts_that_do_not_divide_over_the_ranks_are_an_error() {
        let group = LocalExchange::group(3, Duration::from_secs(1));
        let err = ExpertParallel::new(Arc::new(group.into_iter().next().unwrap()), 8).unwrap_err();
        assert!(
            matches!(err, ParallelError::ExpertsNotDivisible { experts: 8, ranks: 3 }),
            "{err}"
        );
        assert!(err.to_string().contains("divides 8"), "{err}");
    }
}
