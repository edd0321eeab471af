//! The routed experts and the token shuffle around them: tokens are sorted by expert, each
//! expert runs once on its contiguous slice, and the weighted outputs are scatter-added back to
//! token order. No expert sees a token not routed to it and no token is dropped.
//!
//! Legend: T tokens, D model dim, E routed experts, K experts per token.

use burn::config::Config;
use burn::module::Module;
use burn::tensor::{backend::Backend, IndexingUpdateOp, Int, Tensor, TensorData};

use crate::mlp::{Mlp, MlpConfig};

/// Builds [`RoutedExperts`].
#[derive(Config, Debug)]
pub struct RoutedExpertsConfig {
    /// Model width `D`.
    pub d_model: usize,
    /// Hidden width of each expert.
    pub d_expert: usize,
    /// Routed experts `E`.
    pub n_experts: usize,
}

impl RoutedExpertsConfig {
    pub fn init<B: Backend>(&self, device: &B::Device) -> RoutedExperts<B> {
        let expert = MlpConfig::new(self.d_model, self.d_expert);
        RoutedExperts { experts: (0..self.n_experts).map(|_| expert.init(device)).collect() }
    }
}

/// `E` SwiGLU experts, stored one by one as in the checkpoints.
#[derive(Module, Debug)]
pub struct RoutedExperts<B: Backend> {
    pub experts: Vec<Mlp<B>>,
}

/// Token order grouped by expert: the host-side plan of one dispatch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DispatchPlan {
    /// `[T·K]` source token of each dispatched row, rows grouped by expert.
    pub token_of_row: Vec<i64>,
    /// `[T·K]` flat index `t·K + k` of each row's gate weight.
    pub slot_of_row: Vec<i64>,
    /// `[E]` rows per expert (the per-expert token counts).
    pub rows_per_expert: Vec<usize>,
}

impl DispatchPlan {
    /// Counting sort of the `[T, K]` expert choices by expert (stable in token order).
    pub fn new(indices: &[i64], top_k: usize, n_experts: usize) -> Self {
        let mut rows_per_expert = vec![0usize; n_experts];
        for &e in indices {
            rows_per_expert[e as usize] += 1;
        }
        let mut offset: Vec<usize> = rows_per_expert
            .iter()
            .scan(0, |acc, &n| {
                let start = *acc;
                *acc += n;
                Some(start)
            })
            .collect();
        let mut token_of_row = vec![0i64; indices.len()];
        let mut slot_of_row = vec![0i64; indices.len()];
        for (slot, &e) in indices.iter().enumerate() {
            let row = &mut offset[e as usize];
            token_of_row[*row] = (slot / top_k) as i64;
            slot_of_row[*row] = slot as i64;
            *row += 1;
        }
        Self { token_of_row, slot_of_row, rows_per_expert }
    }
}

impl<B: Backend> RoutedExperts<B> {
    /// `y_t = Σ_k w_{t,k} · expert_{idx_{t,k}}(x_t)`.
    ///
    /// # Shapes
    /// `x`: `[T, D]`, `indices`: `[T, K]`, `weights`: `[T, K]` → `[T, D]`.
    pub fn forward(&self, x: Tensor<B, 2>, indices: Tensor<B, 2, Int>, weights: Tensor<B, 2>) -> Tensor<B, 2> {
        let [tokens, d_model] = x.dims();
        let [_, top_k] = indices.dims();
        let device = x.device();
        let dtype = x.dtype();
        let ids: Vec<i64> = indices.into_data().convert::<i64>().into_vec().expect("int tensor data");
        let plan = DispatchPlan::new(&ids, top_k, self.experts.len());
        let rows = tokens * top_k;
        let token_of_row = Tensor::<B, 1, Int>::from_data(TensorData::new(plan.token_of_row.clone(), [rows]), &device);
        let slot_of_row = Tensor::<B, 1, Int>::from_data(TensorData::new(plan.slot_of_row.clone(), [rows]), &device);
        let dispatched = x.select(0, token_of_row.clone()); // [T·K, D] grouped by expert
        let mut outputs = Vec::new();
        let mut start = 0;
        for (expert, &n) in self.experts.iter().zip(&plan.rows_per_expert) {
            if n > 0 {
                outputs.push(expert.forward(dispatched.clone().narrow(0, start, n))); // [n, D]
                start += n;
            }
        }
        let expert_out = Tensor::cat(outputs, 0); // [T·K, D]
        let gate = weights.reshape([rows]).select(0, slot_of_row).unsqueeze_dim::<2>(1); // [T·K, 1]
        let weighted = expert_out * gate.cast(dtype);
        Tensor::zeros([tokens, d_model], &device).select_assign(0, token_of_row, weighted, IndexingUpdateOp::Add)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dispatch_plan_groups_rows_by_expert_in_token_order() {
        // T = 3, K = 2: token 0 → {2, 0}, token 1 → {0, 1}, token 2 → {2, 1}; expert 3 idle.
        let plan = DispatchPlan::new(&[2, 0, 0, 1, 2, 1], 2, 4);
        assert_eq!(plan.rows_per_expert, vec![2, 2, 2, 0]);
        assert_eq!(plan.token_of_row, vec![0, 1, 1, 2, 0, 2]);
        assert_eq!(plan.slot_of_row, vec![1, 2, 3, 5, 0, 4]);
    }
}
