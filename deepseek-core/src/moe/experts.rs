//! The routed experts and the token shuffle around them: tokens are sorted by expert, each
//! expert runs on its contiguous slice of rows, and the weighted outputs are scatter-added back
//! to token order. No expert sees a token not routed to it and no token is dropped.
//!
//! The experts' weights are stacked, `[E, D, 2I]` for the fused gate and up projections and
//! `[E, I, D]` for down. Two paths compute the same function (a test checks it):
//! - per expert (the default): each expert with tokens runs two matmuls on its slice of rows and
//!   its slice of the stacked weights. Fastest on the CPU (Flex), where many mid-sized GEMMs
//!   parallelize well and padding would be wasted work.
//! - grouped: rows are padded to the busiest expert's count and the layer runs as two batched
//!   matmuls ("grouped GEMM"), two kernel launches instead of 2·E, which suits GPUs.
//!   [`ExpertPath::Auto`] takes it when padding at most doubles the rows.
//!
//! With expert parallelism ([`ExecutionPolicy::expert_parallel`]) the dispatched rows travel to the ranks
//! that own their experts and back (see [`crate::parallel`]); each rank computes only its own
//! experts, per expert.
//!
//! Legend: T tokens, D model dim, E routed experts, K experts per token, I expert width,
//! N expert-parallel ranks, R rows received by this rank.

use super::dispatch::DispatchPlan;
use crate::fp8::GemmPrecision;
use crate::parallel::{all_to_all, ExpertParallel, Route};
use crate::policy::{ExecutionPolicy, ExpertPath};
use crate::projection::{Projection, Weight};
use burn::config::Config;
use burn::module::{Initializer, Module};
use burn::tensor::{activation::silu, backend::Backend, IndexingUpdateOp, Int, Tensor, TensorData};

/// Builds [`RoutedExperts`].
#[derive(Config, Debug)]
pub struct RoutedExpertsConfig {
    /// Model width `D`.
    pub d_model: usize,
    /// Hidden width `I` of each expert.
    pub d_expert: usize,
    /// Routed experts `E`.
    pub n_experts: usize,
}

impl RoutedExpertsConfig {
    /// Fresh experts, drawn lazily with the bound of Burn's `Linear` per expert.
    pub fn init<B: Backend>(&self, device: &B::Device) -> RoutedExperts<B> {
        let (d, i, e) = (self.d_model, self.d_expert, self.n_experts);
        // Same bound as Burn's Linear default (Kaiming uniform with fan_in = input width).
        let uniform = |fan_in: usize| {
            let bound = (1.0 / fan_in as f64).sqrt();
            Initializer::Uniform { min: -bound, max: bound }
        };
        RoutedExperts {
            gate_up: Projection::stacked(uniform(d).init([e, d, 2 * i], device)),
            down: Projection::stacked(uniform(i).init([e, i, d], device)),
        }
    }
}

/// `E` SwiGLU experts `down(silu(gate(x)) ⊙ up(x))` with stacked weights (Burn layout,
/// `[in, out]` per expert).
#[derive(Module, Debug)]
pub struct RoutedExperts<B: Backend> {
    /// `[E, D, 2I]`: columns `0..I` are `gate_proj`, `I..2I` are `up_proj`.
    pub gate_up: Projection<B, 3>,
    /// `[E, I, D]`: `down_proj`.
    pub down: Projection<B, 3>,
}

impl<B: Backend> RoutedExperts<B> {
    /// `y_t = Σ_k w_{t,k} · expert_{idx_{t,k}}(x_t)`, along `policy.expert_path`, with
    /// `policy.gemm` GEMMs, on the ranks of `policy.expert_parallel`.
    ///
    /// # Shapes
    /// `x`: `[T, D]`, `indices`: `[T, K]`, `weights`: `[T, K]` → `[T, D]`.
    ///
    /// # Panics
    /// On an autodiff backend whose custom operations were never installed
    /// ([`crate::register_autodiff`]; the backend switch does it).
    pub fn forward(
        &self,
        x: Tensor<B, 2>,
        indices: Tensor<B, 2, Int>,
        weights: Tensor<B, 2>,
        policy: &ExecutionPolicy,
    ) -> Tensor<B, 2> {
        let [tokens, d_model] = x.dims();
        let [_, top_k] = indices.dims();
        let [n_experts, _, _] = self.gate_up.dims();
        let (path, gemm) = (policy.expert_path, policy.gemm);
        crate::registry::require_autodiff_ops::<B>(&x.device(), "the routed experts");
        if let Some(parallel) = &policy.expert_parallel {
            return self.forward_parallel(x, indices, weights, parallel, gemm);
        }
        #[cfg(feature = "kernels")]
        if matches!(path, ExpertPath::Auto | ExpertPath::PerExpert)
            && x.dtype() == burn::tensor::DType::F32
            && weights.dtype() == burn::tensor::DType::F32
        {
            if let Some(y) = self.on_device(x.clone(), &indices, weights.clone(), n_experts, gemm) {
                return y;
            }
        }
        let device = x.device();
        let dtype = x.dtype();
        let ids: Vec<i64> =
            indices.into_data().convert::<i64>().into_vec().expect("int tensor data");
        // A few tokens (decoding) on Flex: the whole layer in one pass, not some thirty small ops.
        if let Some(y) = self.few_tokens(&x, &ids, &weights, path, gemm) {
            return y;
        }
        let plan = DispatchPlan::new(&ids, top_k, n_experts);
        let rows = tokens * top_k;
        // The FP8 GEMMs are 2-D, and FP8-resident experts dequantize one at a time: both run per
        // expert.
        let grouped = match path {
            _ if gemm == GemmPrecision::Fp8 => false,
            // Grouped would dequantize every expert of the block at once.
            _ if self.gate_up.is_fp8() || self.down.is_fp8() => false,
            ExpertPath::Grouped => true,
            ExpertPath::PerExpert | ExpertPath::HostPerExpert => false,
            ExpertPath::Auto => plan.capacity() * n_experts <= 2 * rows,
        };
        let token_of_row = int_tensor::<B>(plan.token_of_row.clone(), &device);
        let expert_out = if grouped {
            self.grouped(x, &plan, &device)
        } else {
            self.per_expert_rows(x.select(0, token_of_row.clone()), &plan.rows_per_expert, 0, gemm)
        }; // [T·K, D] rows grouped by expert
        let gate = weights
            .reshape([rows])
            .select(0, int_tensor::<B>(plan.slot_of_row.clone(), &device))
            .unsqueeze_dim::<2>(1); // [T·K, 1]
        let weighted = expert_out * gate.cast(dtype);
        Tensor::zeros([tokens, d_model], (&device, dtype)).select_assign(
            0,
            token_of_row,
            weighted,
            IndexingUpdateOp::Add,
        )
    }

    /// [`crate::few_rows::routed_experts`] where it applies: per-expert paths, full-precision
    /// GEMMs, no adapters, few tokens on Flex.
    ///
    /// # Shapes
    /// `x`: `[T, D]`, `ids`: `T·K` expert indices, `weights`: `[T, K]` → `[T, D]`.
    fn few_tokens(
        &self,
        x: &Tensor<B, 2>,
        ids: &[i64],
        weights: &Tensor<B, 2>,
        path: ExpertPath,
        gemm: GemmPrecision,
    ) -> Option<Tensor<B, 2>> {
        let applies = matches!(path, ExpertPath::Auto | ExpertPath::PerExpert)
            && gemm == GemmPrecision::Full
            && self.gate_up.lora.is_none()
            && self.down.lora.is_none()
            && x.dims()[0] <= crate::few_rows::MAX_ROWS;
        if !applies {
            return None;
        }
        if let (Weight::Fp8(gate_up), Weight::Fp8(down)) = (&self.gate_up.weight, &self.down.weight)
        {
            return crate::few_rows::fp8_routed_experts(
                x,
                gate_up.stack(),
                down.stack(),
                ids,
                weights,
            );
        }
        let (gate_up, down) = (self.gate_up.param()?.val(), self.down.param()?.val());
        crate::few_rows::routed_experts(x, &gate_up, &down, ids, weights)
    }

    /// Grouped GEMM: gather rows into `[E, cap, D]` (padding rows repeat token 0 and are never
    /// read back), two batched matmuls, then the real rows in dispatch order.
    fn grouped(&self, x: Tensor<B, 2>, plan: &DispatchPlan, device: &B::Device) -> Tensor<B, 2> {
        let [_, d_model] = x.dims();
        let [n_experts, _, two_i] = self.gate_up.dims();
        let cap = plan.capacity();
        let mut padded_token = vec![0i64; n_experts * cap];
        let mut padded_slot_of_row = Vec::with_capacity(plan.token_of_row.len());
        let mut row = 0;
        for (e, &n) in plan.rows_per_expert.iter().enumerate() {
            for j in 0..n {
                padded_token[e * cap + j] = plan.token_of_row[row];
                padded_slot_of_row.push((e * cap + j) as i64);
                row += 1;
            }
        }
        let xs =
            x.select(0, int_tensor::<B>(padded_token, device)).reshape([n_experts, cap, d_model]); // [E, cap, D]
        let h = self.gate_up.forward_grouped(xs); // [E, cap, 2I]
        let act = silu(h.clone().narrow(2, 0, two_i / 2)) * h.narrow(2, two_i / 2, two_i / 2); // [E, cap, I]
        let y = self.down.forward_grouped(act).reshape([n_experts * cap, d_model]); // [E·cap, D]
        y.select(0, int_tensor::<B>(padded_slot_of_row, device)) // [T·K, D]
    }

    /// Sort, dispatch and combine with the device kernels (wgpu, CUDA); `None` where `B` does not
    /// run them. Experts run per expert on their slices of the dispatched rows.
    #[cfg(feature = "kernels")]
    fn on_device(
        &self,
        x: Tensor<B, 2>,
        indices: &Tensor<B, 2, Int>,
        weights: Tensor<B, 2>,
        n_experts: usize,
        gemm: GemmPrecision,
    ) -> Option<Tensor<B, 2>> {
        let plan = super::device::plan::<B>(&indices.clone().into_primitive(), n_experts)?;
        let rows = super::device::dispatch(x, &plan)?; // [T·K, D] grouped by expert
        let expert_out = self.per_expert_rows(rows, &plan.counts, 0, gemm); // [T·K, D]
        super::device::combine(expert_out, weights, &plan)
    }

    /// Expert parallelism: dispatch here, send each expert's rows to its owner, compute this
    /// rank's experts on the rows every rank sent, send the results back, combine here.
    ///
    /// # Shapes
    /// `x`: `[T, D]`, `indices`: `[T, K]`, `weights`: `[T, K]` → `[T, D]`.
    ///
    /// # Panics
    /// If a peer fails or times out (the message names the rank); the model's forward has no
    /// error channel, and the training driver reports the panic of a rank as its error.
    fn forward_parallel(
        &self,
        x: Tensor<B, 2>,
        indices: Tensor<B, 2, Int>,
        weights: Tensor<B, 2>,
        parallel: &ExpertParallel,
        gemm: GemmPrecision,
    ) -> Tensor<B, 2> {
        let [tokens, d_model] = x.dims();
        let [_, top_k] = indices.dims();
        let device = x.device();
        let exchange = parallel.exchange();
        let ranks = exchange.size();
        let ids: Vec<i64> =
            indices.into_data().convert::<i64>().into_vec().expect("int tensor data");
        let plan = DispatchPlan::new(&ids, top_k, parallel.n_experts());
        let token_of_row = int_tensor::<B>(plan.token_of_row.clone(), &device);
        // Rows grouped by expert are grouped by owner: experts are placed in contiguous blocks.
        let dispatched = x.select(0, token_of_row.clone()); // [T·K, D]
        let counts: Vec<Vec<u64>> = (0..ranks)
            .map(|r| {
                plan.rows_per_expert[parallel.experts_of(r)].iter().map(|&n| n as u64).collect()
            })
            .collect();
        let send: Vec<usize> = counts.iter().map(|c| c.iter().sum::<u64>() as usize).collect();
        let received_counts = exchange
            .all_to_all_counts(counts)
            .unwrap_or_else(|e| panic!("expert-parallel dispatch: {e}"));
        let recv: Vec<usize> =
            received_counts.iter().map(|c| c.iter().sum::<u64>() as usize).collect();
        let route = Route { send, recv, exchange: exchange.clone() };
        let received = all_to_all(dispatched, &route)
            .unwrap_or_else(|e| panic!("expert-parallel dispatch: {e}")); // [R, D] by source rank, then expert

        // Regroup by local expert: row order (expert, source) instead of (source, expert).
        let local = parallel.local_experts();
        let mut source_start = vec![0usize; ranks];
        for r in 1..ranks {
            source_start[r] = source_start[r - 1] + route.recv[r - 1];
        }
        let mut by_expert = Vec::with_capacity(route.recv.iter().sum());
        let mut rows_per_expert = vec![0usize; local.len()];
        for (e, rows) in rows_per_expert.iter_mut().enumerate() {
            for (r, c) in received_counts.iter().enumerate() {
                let before: u64 = c[..e].iter().sum();
                let start = source_start[r] + before as usize;
                by_expert.extend((start..start + c[e] as usize).map(|row| row as i64));
                *rows += c[e] as usize;
            }
        }
        let computed = if by_expert.is_empty() {
            // No rows for this rank's experts: pass the empty buffer on, which keeps this rank's
            // half of the backward exchange on the autodiff graph.
            received
        } else {
            let mut back = vec![0i64; by_expert.len()];
            for (i, &row) in by_expert.iter().enumerate() {
                back[row as usize] = i as i64;
            }
            let grouped = received.select(0, int_tensor::<B>(by_expert, &device)); // [R, D] by expert
            let out = self.per_expert_rows(grouped, &rows_per_expert, local.start, gemm); // [R, D]
            out.select(0, int_tensor::<B>(back, &device)) // [R, D] by source rank again
        };
        let returned = all_to_all(computed, &route.reversed())
            .unwrap_or_else(|e| panic!("expert-parallel combine: {e}")); // [T·K, D]
        let rows = tokens * top_k;
        let gate = weights
            .reshape([rows])
            .select(0, int_tensor::<B>(plan.slot_of_row.clone(), &device))
            .unsqueeze_dim::<2>(1); // [T·K, 1]
        let dtype = returned.dtype();
        let weighted = returned * gate.cast(dtype);
        Tensor::zeros([tokens, d_model], (&device, dtype)).select_assign(
            0,
            token_of_row,
            weighted,
            IndexingUpdateOp::Add,
        )
    }

    /// Each expert with tokens runs on its contiguous slice of the dispatched rows: the rows of
    /// experts `first_expert..`, in order, `rows_per_expert[j]` for expert `first_expert + j`.
    ///
    /// # Shapes
    /// `dispatched`: `[rows, D]` grouped by expert → `[rows, D]`.
    fn per_expert_rows(
        &self,
        dispatched: Tensor<B, 2>,
        rows_per_expert: &[usize],
        first_expert: usize,
        gemm: GemmPrecision,
    ) -> Tensor<B, 2> {
        let [_, i, _] = self.down.dims();
        let (rows, first) = (rows_per_expert, first_expert);
        let h = self.gate_up.forward_segments(dispatched, rows, first, gemm); // [rows, 2I]
        let act = silu(h.clone().narrow(1, 0, i)) * h.narrow(1, i, i); // [rows, I]
        self.down.forward_segments(act, rows, first, gemm) // [rows, D]
    }
}

fn int_tensor<B: Backend>(values: Vec<i64>, device: &B::Device) -> Tensor<B, 1, Int> {
    let n = values.len();
    Tensor::from_data(TensorData::new(values, [n]), device)
}
