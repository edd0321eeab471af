//! Dispatch and combine of routed tokens (DeepSeekMoE): the `[T, K]` expert choices sorted by
//! expert into one buffer of `T·K` rows (each token copied once per chosen expert), and the
//! weighted sum back to token order. This file holds the host twins: the counting sort
//! ([`DispatchPlan`]) and the data movement with its gradients on plain slices. The CubeCL kernels
//! in [`super::kernels`] are tested against them.
//!
//! Gradients: dispatch is a gather, so its backward is an unweighted combine; combine's backward
//! is a weighted dispatch of the output gradient plus, for the gate weights, the dot product of
//! each output gradient with each dispatched row.

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
        let mut offset = Self::offsets(&rows_per_expert);
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

    /// First row of each expert.
    fn offsets(rows_per_expert: &[usize]) -> Vec<usize> {
        rows_per_expert
            .iter()
            .scan(0, |acc, &n| {
                let start = *acc;
                *acc += n;
                Some(start)
            })
            .collect()
    }

    /// Rows of the busiest expert.
    pub fn capacity(&self) -> usize {
        self.rows_per_expert.iter().copied().max().unwrap_or(0)
    }
}

/// `out[row] = x[token_of_row[row]]`, optionally times the gate weight of the row: `[T·K, D]`
/// from `x` `[T, D]`.
pub fn dispatch_reference(
    x: &[f32],
    d: usize,
    plan: &DispatchPlan,
    weights: Option<&[f32]>,
) -> Vec<f32> {
    let mut out = Vec::with_capacity(plan.token_of_row.len() * d);
    for (row, &t) in plan.token_of_row.iter().enumerate() {
        let w = weights.map_or(1.0, |w| w[plan.slot_of_row[row] as usize]);
        out.extend(x[t as usize * d..(t as usize + 1) * d].iter().map(|v| v * w));
    }
    out
}

/// `y[t] = Σ_k w[t, k] · rows[row_of(t, k)]` (unit weights when `None`): `[T, D]` from `rows`
/// `[T·K, D]`, summed in `k` order.
pub fn combine_reference(
    rows: &[f32],
    d: usize,
    plan: &DispatchPlan,
    weights: Option<&[f32]>,
    top_k: usize,
) -> Vec<f32> {
    let slots = plan.slot_of_row.len();
    let mut row_of_slot = vec![0usize; slots];
    for (row, &slot) in plan.slot_of_row.iter().enumerate() {
        row_of_slot[slot as usize] = row;
    }
    let mut y = vec![0f32; slots / top_k * d];
    for (slot, &row) in row_of_slot.iter().enumerate() {
        let w = weights.map_or(1.0, |w| w[slot]);
        let t = slot / top_k;
        for j in 0..d {
            y[t * d + j] += w * rows[row * d + j];
        }
    }
    y
}

/// Gradient of combine with respect to the gate weights: `dw[t, k] = <dy[t], rows[row_of(t, k)]>`.
pub fn gate_grad_reference(
    dy: &[f32],
    rows: &[f32],
    d: usize,
    plan: &DispatchPlan,
    top_k: usize,
) -> Vec<f32> {
    let mut dw = vec![0f32; plan.slot_of_row.len()];
    for (row, &slot) in plan.slot_of_row.iter().enumerate() {
        let t = slot as usize / top_k;
        dw[slot as usize] = (0..d).map(|j| dy[t * d + j] * rows[row * d + j]).sum();
    }
    dw
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
        assert_eq!(plan.capacity(), 2);
    }

    #[test]
    fn combine_undoes_dispatch_and_the_gate_gradient_is_a_dot_product() {
        // T = 3, K = 2, E = 4 with expert 3 idle; D = 2.
        let plan = DispatchPlan::new(&[2, 0, 0, 1, 2, 1], 2, 4);
        let x = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let rows = dispatch_reference(&x, 2, &plan, None);
        assert_eq!(
            &rows[..4],
            &[1.0, 2.0, 3.0, 4.0],
            "expert 0 holds tokens 0 and 1, in token order"
        );
        // Unit weights: each token comes back K times.
        assert_eq!(
            combine_reference(&rows, 2, &plan, None, 2),
            x.iter().map(|v| 2.0 * v).collect::<Vec<_>>()
        );
        let w = [0.5, 0.25, 1.0, 2.0, 0.0, 3.0];
        let y = combine_reference(&rows, 2, &plan, Some(&w), 2);
        assert_eq!(y, vec![0.75, 1.5, 9.0, 12.0, 15.0, 18.0]);
        let dw = gate_grad_reference(&[1.0, 1.0, 0.0, 1.0, 2.0, 0.0], &rows, 2, &plan, 2);
        assert_eq!(dw, vec![3.0, 3.0, 4.0, 4.0, 10.0, 10.0]);
    }
}
