//! CubeCL kernels for MoE dispatch and combine, with no host round trip: the counting sort of
//! the router's `[T, K]` choices by expert (counts, offsets, and the row of every choice, stable
//! in token order as [`super::dispatch::DispatchPlan`]), the permutation of token activations
//! into one buffer grouped by expert, and the weighted combine back to token order, plus the
//! pieces of their gradients. Twins: [`super::dispatch`]; tests: `tests/tests/moe_kernels.rs`.

use burn::tensor::DType;
use burn_cubecl::{kernel::into_contiguous, tensor::CubeTensor, CubeRuntime};
use cubecl::prelude::*;

use crate::cube::{array, empty, grid};

/// Units per cube of the sort kernels (one cube per expert, each unit one chunk of the choices).
const SORT_UNITS: u32 = 256;
/// Units per cube of the element-wise kernels.
const UNITS: u32 = 256;

/// Where every routed choice goes, on the device. Integer tensors are `u32`.
#[derive(Debug, Clone)]
pub struct DeviceDispatch<R: CubeRuntime> {
    /// `[E]` choices per expert.
    pub counts: CubeTensor<R>,
    /// `[E + 1]` first row of each expert, then `T·K`.
    pub offsets: CubeTensor<R>,
    /// `[T·K]` dispatched row of each choice `t·K + k`.
    pub row_of_slot: CubeTensor<R>,
    /// `[T·K]` choice `t·K + k` of each dispatched row.
    pub slot_of_row: CubeTensor<R>,
    pub tokens: usize,
    pub top_k: usize,
    pub n_experts: usize,
}

/// The half-open range of choices that `unit` of `units` scans.
#[cube]
fn chunk(unit: u32, units: u32, n: u32) -> (u32, u32) {
    let size = n.div_ceil(units);
    let start = u32::min(unit * size, n);
    (start, u32::min(start + size, n))
}

/// How many of `ids[start..end]` name `expert`.
#[cube]
fn matches(ids: &Array<u32>, expert: u32, start: u32, end: u32) -> u32 {
    let mut count = 0u32;
    for i in start..end {
        if ids[i as usize] == expert {
            count += 1;
        }
    }
    count
}

/// Per expert (cube): how many choices name it, and, per unit, how many of them lie in the
/// chunks before its own (an exclusive scan, which `place_kernel` starts from). Choices outside
/// `0..E` are counted nowhere.
#[cube(launch)]
fn count_kernel(ids: &Array<u32>, counts: &mut Array<u32>, chunk_prefix: &mut Array<u32>, n: u32) {
    let expert = CUBE_POS_X;
    let unit = UNIT_POS_X;
    let (start, end) = chunk(unit, CUBE_DIM_X, n);
    let mut shared = SharedMemory::<u32>::new(SORT_UNITS as usize);
    shared[unit as usize] = matches(ids, expert, start, end);
    sync_cube();
    if unit == 0 {
        let mut acc = 0u32;
        for u in 0..CUBE_DIM_X {
            chunk_prefix[(expert * CUBE_DIM_X + u) as usize] = acc;
            acc += shared[u as usize];
        }
        counts[expert as usize] = acc;
    }
}

/// Exclusive prefix sum of the counts (one unit: E is at most a few hundred).
#[cube(launch)]
fn offsets_kernel(counts: &Array<u32>, offsets: &mut Array<u32>, n_experts: u32) {
    if UNIT_POS_X == 0 {
        let mut acc = 0u32;
        for e in 0..n_experts {
            offsets[e as usize] = acc;
            acc += counts[e as usize];
        }
        offsets[n_experts as usize] = acc;
    }
}

/// Per expert (cube): each unit writes the rows of its chunk's matches in order, starting after
/// the expert's offset and the matches of the chunks before it: rows follow token order within
/// an expert.
#[cube(launch)]
fn place_kernel(
    ids: &Array<u32>,
    offsets: &Array<u32>,
    chunk_prefix: &Array<u32>,
    row_of_slot: &mut Array<u32>,
    slot_of_row: &mut Array<u32>,
    n: u32,
) {
    let expert = CUBE_POS_X;
    let unit = UNIT_POS_X;
    let (start, end) = chunk(unit, CUBE_DIM_X, n);
    let mut row = offsets[expert as usize] + chunk_prefix[(expert * CUBE_DIM_X + unit) as usize];
    for i in start..end {
        if ids[i as usize] == expert {
            row_of_slot[i as usize] = row;
            slot_of_row[row as usize] = i;
            row += 1;
        }
    }
}

/// `out[row, :] = x[slot_of_row[row] / K, :]`, times `weights[slot_of_row[row]]` if `weighted`:
/// one unit per output value.
#[cube(launch)]
fn dispatch_kernel(
    x: &Array<f32>,
    weights: &Array<f32>,
    slot_of_row: &Array<u32>,
    out: &mut Array<f32>,
    rows: u32,
    d: u32,
    top_k: u32,
    #[comptime] weighted: bool,
) {
    let i = ABSOLUTE_POS_Y * (CUBE_COUNT_X * CUBE_DIM_X) + ABSOLUTE_POS_X;
    if i >= rows * d {
        terminate!();
    }
    let row = i / d;
    let slot = slot_of_row[row as usize];
    let mut v = x[((slot / top_k) * d + i % d) as usize];
    if weighted {
        v *= weights[slot as usize];
    }
    out[i as usize] = v;
}

/// `y[t, :] = Σ_k w[t, k] · rows[row_of_slot[t·K + k], :]` (unit weights unless `weighted`), in
/// `k` order: one unit per output value.
#[cube(launch)]
fn combine_kernel(
    rows: &Array<f32>,
    weights: &Array<f32>,
    row_of_slot: &Array<u32>,
    y: &mut Array<f32>,
    tokens: u32,
    d: u32,
    top_k: u32,
    #[comptime] weighted: bool,
) {
    let i = ABSOLUTE_POS_Y * (CUBE_COUNT_X * CUBE_DIM_X) + ABSOLUTE_POS_X;
    if i >= tokens * d {
        terminate!();
    }
    let t = i / d;
    let j = i % d;
    let mut acc = 0.0f32;
    for k in 0..top_k {
        let slot = t * top_k + k;
        let mut v = rows[(row_of_slot[slot as usize] * d + j) as usize];
        if weighted {
            v *= weights[slot as usize];
        }
        acc += v;
    }
    y[i as usize] = acc;
}

/// `dw[slot] = <dy[slot / K, :], rows[row_of_slot[slot], :]>`: one unit per choice.
#[cube(launch)]
fn gate_grad_kernel(
    dy: &Array<f32>,
    rows: &Array<f32>,
    row_of_slot: &Array<u32>,
    dw: &mut Array<f32>,
    slots: u32,
    d: u32,
    top_k: u32,
) {
    let slot = ABSOLUTE_POS_Y * (CUBE_COUNT_X * CUBE_DIM_X) + ABSOLUTE_POS_X;
    if slot >= slots {
        terminate!();
    }
    let t = slot / top_k;
    let row = row_of_slot[slot as usize];
    let mut acc = 0.0f32;
    for j in 0..d {
        acc += dy[(t * d + j) as usize] * rows[(row * d + j) as usize];
    }
    dw[slot as usize] = acc;
}

/// Cubes for `n` units of `UNITS` each.
fn units(n: usize) -> CubeCount {
    grid(n.div_ceil(UNITS as usize))
}

/// Uploads `[T, K]` expert choices as a `u32` tensor.
pub fn upload_ids<R: CubeRuntime>(
    device: &R::Device,
    ids: &[u32],
    shape: [usize; 2],
) -> CubeTensor<R> {
    crate::cube::upload(device, ids, &shape, DType::U32)
}

/// Sorts the router's choices by expert. `indices`: `[T, K]`, 32-bit integers in `0..E`.
///
/// # Panics
/// If `indices` is not a 2-D 32-bit integer tensor or `E` is 0 (the router guarantees both).
pub fn plan<R: CubeRuntime>(indices: CubeTensor<R>, n_experts: usize) -> DeviceDispatch<R> {
    let dims = indices.meta.shape().to_vec();
    assert!(
        dims.len() == 2 && matches!(indices.dtype, DType::I32 | DType::U32),
        "indices must be [T, K] 32-bit integers, got {dims:?} {:?}",
        indices.dtype
    );
    assert!(n_experts > 0, "at least one expert");
    let (tokens, top_k) = (dims[0], dims[1]);
    let n = tokens * top_k;
    let indices = into_contiguous(indices);
    let counts = empty(&indices, &[n_experts], DType::U32);
    let chunk_prefix = empty(&indices, &[n_experts, SORT_UNITS as usize], DType::U32);
    let offsets = empty(&indices, &[n_experts + 1], DType::U32);
    let row_of_slot = empty(&indices, &[n], DType::U32);
    let slot_of_row = empty(&indices, &[n], DType::U32);
    let client = &indices.client;
    let per_expert = CubeCount::Static(n_experts as u32, 1, 1);
    count_kernel::launch(
        client,
        per_expert.clone(),
        CubeDim::new_1d(SORT_UNITS),
        array(&indices),
        array(&counts),
        array(&chunk_prefix),
        n as u32,
    );
    offsets_kernel::launch(
        client,
        CubeCount::Static(1, 1, 1),
        CubeDim::new_1d(1),
        array(&counts),
        array(&offsets),
        n_experts as u32,
    );
    place_kernel::launch(
        client,
        per_expert,
        CubeDim::new_1d(SORT_UNITS),
        array(&indices),
        array(&offsets),
        array(&chunk_prefix),
        array(&row_of_slot),
        array(&slot_of_row),
        n as u32,
    );
    DeviceDispatch { counts, offsets, row_of_slot, slot_of_row, tokens, top_k, n_experts }
}

/// Dispatch: `x` `[T, D]` → `[T·K, D]` rows grouped by expert, each token once per choice; with
/// `weights` (`[T, K]` f32) each row is scaled by its gate weight (the backward of combine).
pub fn dispatch<R: CubeRuntime>(
    x: CubeTensor<R>,
    plan: &DeviceDispatch<R>,
    weights: Option<CubeTensor<R>>,
) -> CubeTensor<R> {
    let d = x.meta.shape()[1];
    let x = into_contiguous(x);
    let rows = plan.tokens * plan.top_k;
    let out = empty(&x, &[rows, d], DType::F32);
    let weights = weights.map(into_contiguous);
    let weighted = weights.is_some();
    let w = weights.as_ref().unwrap_or(&x);
    dispatch_kernel::launch(
        &x.client,
        units(rows * d),
        CubeDim::new_1d(UNITS),
        array(&x),
        array(w),
        array(&plan.slot_of_row),
        array(&out),
        rows as u32,
        d as u32,
        plan.top_k as u32,
        weighted,
    );
    out
}

/// Combine: `rows` `[T·K, D]` → `[T, D]`, `y[t] = Σ_k w[t, k] · rows[row_of(t, k)]`; without
/// `weights` the plain sum (the backward of dispatch).
pub fn combine<R: CubeRuntime>(
    rows: CubeTensor<R>,
    plan: &DeviceDispatch<R>,
    weights: Option<CubeTensor<R>>,
) -> CubeTensor<R> {
    let d = rows.meta.shape()[1];
    let rows = into_contiguous(rows);
    let y = empty(&rows, &[plan.tokens, d], DType::F32);
    let weights = weights.map(into_contiguous);
    let weighted = weights.is_some();
    let w = weights.as_ref().unwrap_or(&rows);
    combine_kernel::launch(
        &rows.client,
        units(plan.tokens * d),
        CubeDim::new_1d(UNITS),
        array(&rows),
        array(w),
        array(&plan.row_of_slot),
        array(&y),
        plan.tokens as u32,
        d as u32,
        plan.top_k as u32,
        weighted,
    );
    y
}

/// The gradient of combine with respect to the gate weights: `[T, K]`,
/// `dw[t, k] = <dy[t], rows[row_of(t, k)]>`.
pub fn gate_grad<R: CubeRuntime>(
    dy: CubeTensor<R>,
    rows: CubeTensor<R>,
    plan: &DeviceDispatch<R>,
) -> CubeTensor<R> {
    let d = rows.meta.shape()[1];
    let (dy, rows) = (into_contiguous(dy), into_contiguous(rows));
    let slots = plan.tokens * plan.top_k;
    let dw = empty(&rows, &[plan.tokens, plan.top_k], DType::F32);
    gate_grad_kernel::launch(
        &rows.client,
        units(slots),
        CubeDim::new_1d(UNITS),
        array(&dy),
        array(&rows),
        array(&plan.row_of_slot),
        array(&dw),
        slots as u32,
        d as u32,
        plan.top_k as u32,
    );
    dw
}
