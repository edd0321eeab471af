//! Few-row products on Flex: the GEMV of decoding, read at memory bandwidth.
//!
//! Decoding multiplies one token (or a handful: a speculative verification, a small serving
//! batch) by every weight it reads, so each product's time is the time to stream the weight
//! from memory. Flex hands these to the `gemm` crate, which (measured on the 2-core machine of
//! `docs/benchmarks.md`, where one core reads about 25 GB/s and two about 29.5):
//! - runs a one-row product on its single-threaded GEMV whatever parallelism it is given, at
//!   17–22 GB/s: the other core waits, even for the 1024 × 32000 output head;
//! - runs two to eight rows through its blocked GEMM, which packs the weight first: 8 GB/s, so
//!   two rows cost three times one;
//! - and Flex widens bf16 weights to f32 on every call.
//!
//! Here each weight row is read once for all the input rows (`y_r += x_{r,k} · W_k`, in f32 with
//! fused multiply-adds), half-precision weights are widened as they are read, and a weight of at
//! least [`MIN_SPLIT`] elements is cut along `k` into one contiguous part per thread whose partial
//! sums are added at the end: 27–30 GB/s for a 1024 × 1024 product with one or two rows.
//!
//! Splitting the columns over the threads instead (each thread reading half of every weight row)
//! measured 11–15 GB/s: the hardware prefetchers lose the stream.
//!
//! A weight wider than the column block (the output head, 1024 × 32000: its partial sums would
//! not stay in the L1 cache) is read four rows at a time per block, each output value still
//! taking its multiply-adds in row order: 12–19 → 20–22 GB/s (`cargo bench -p deepseek-core
//! --bench few_rows`). Narrower weights stay one row at a time, a single sequential stream,
//! which interleaving four rows slowed (about 24 → 15 GB/s on a 1024 × 512 half-precision
//! expert).
//!
//! [`routed_experts`] runs a whole routed-expert layer for a few tokens on the same kernel.
//!
//! The sums run in another order than `gemm`'s, so results agree with the plain product to f32
//! rounding (the plain-tensor twin tests check it); for a given thread count they are
//! deterministic. The functions answer `None` where they do not apply (another backend, other
//! dtypes, more than [`MAX_ROWS`] rows, an input that is not contiguous, a weight whose rows are
//! not), and the caller runs its usual operations. Autodiff backends never come here; in
//! training only the forward of the routed experts' segmented node, which runs on the inner
//! backend, takes [`matmul`] for an expert with at most [`MAX_ROWS`] rows.

use burn::tensor::backend::Backend;
use burn::tensor::Tensor;

use crate::fp8::block::Fp8Layout;
use burn::tensor::Int;

/// Most rows of `x` taken here; beyond this `gemm`'s blocked kernel wins.
pub const MAX_ROWS: usize = 8;
/// Fewest weight elements split over threads (256 KiB at f32, about 10 µs of reading on one
/// core); smaller weights run on the calling thread, where a fork-join would cost more than it
/// saves. On the pool's threads ([`crate::pool`]) a split is a `join`, cheap enough that
/// lowering this from 2¹⁸ took `small`'s batch-1 decoding from about 1,750 to 1,975 tokens/s
/// (medians of 6 interleaved runs).
pub const MIN_SPLIT: usize = 1 << 16;

/// `x · w` over the last two dimensions of `w`, whose leading dimensions must all be 1 (a matrix,
/// or one expert's view of a stack); `None` where this path does not apply.
///
/// # Shapes
/// `x`: `[..., k]`, `w`: `[1, ..., 1, k, n]` → `[..., n]`.
#[cfg(feature = "flex")]
pub fn matmul<B: Backend, const D: usize, const R: usize>(
    x: &Tensor<B, D>,
    w: &Tensor<B, R>,
) -> Option<Tensor<B, D>> {
    flex::matmul(x, w)
}

/// Without Flex compiled in there is nothing to take.
#[cfg(not(feature = "flex"))]
pub fn matmul<B: Backend, const D: usize, const R: usize>(
    _x: &Tensor<B, D>,
    _w: &Tensor<B, R>,
) -> Option<Tensor<B, D>> {
    None
}

/// The SwiGLU MLP `down(silu(x · gate) ⊙ (x · up))` of a few rows in one pass (the dense MLP and
/// the shared experts when decoding): three products on the kernel of [`matmul`], the hidden
/// activations kept in f32, instead of five tensor operations. `None` where it does not apply.
///
/// # Shapes
/// `x`: `[..., d]`, `gate`, `up`: `[d, hidden]`, `down`: `[hidden, d_out]` → `[..., d_out]`.
#[cfg(feature = "flex")]
pub fn swiglu<B: Backend, const D: usize>(
    x: &Tensor<B, D>,
    gate: &Tensor<B, 2>,
    up: &Tensor<B, 2>,
    down: &Tensor<B, 2>,
) -> Option<Tensor<B, D>> {
    flex::swiglu(x, gate, up, down)
}

/// Without Flex compiled in there is nothing to take.
#[cfg(not(feature = "flex"))]
pub fn swiglu<B: Backend, const D: usize>(
    _x: &Tensor<B, D>,
    _gate: &Tensor<B, 2>,
    _up: &Tensor<B, 2>,
    _down: &Tensor<B, 2>,
) -> Option<Tensor<B, D>> {
    None
}

/// The routed experts of a few tokens in one pass (decoding's MoE): for each expert chosen by
/// any token, its rows `x_e` go through `h = x_e · W_gate_up[e]`, `a = silu(h_gate) ⊙ h_up` and
/// `a · W_down[e]` with the kernel of [`matmul`] (`h` and `a` stay f32), and token `t` adds
/// `gate_{t,j}` times its row. The experts run on the thread pool when their weights are large
/// ([`MIN_SPLIT`]). What this replaces is some thirty small tensor operations per layer and step
/// (dispatch plan, gathers, a product per expert and projection, the gate weights' scatter-add),
/// each a few microseconds on Flex. `None` where it does not apply (another backend, other
/// dtypes, more than [`MAX_ROWS`] tokens, layouts it does not read).
///
/// # Shapes
/// `x`: `[T, D]`, `gate_up`: `[E, D, 2I]` (gate columns first), `down`: `[E, I, D]`, `experts`:
/// `T·K` indices, token-major, `gates`: `[T, K]` (read to the host only on Flex) → `[T, D]`.
#[cfg(feature = "flex")]
pub fn routed_experts<B: Backend>(
    x: &Tensor<B, 2>,
    gate_up: &Tensor<B, 3>,
    down: &Tensor<B, 3>,
    experts: &[i64],
    gates: &Tensor<B, 2>,
) -> Option<Tensor<B, 2>> {
    flex::routed_experts(x, gate_up, down, experts, gates)
}

/// Without Flex compiled in there is nothing to take.
#[cfg(not(feature = "flex"))]
pub fn routed_experts<B: Backend>(
    _x: &Tensor<B, 2>,
    _gate_up: &Tensor<B, 3>,
    _down: &Tensor<B, 3>,
    _experts: &[i64],
    _gates: &Tensor<B, 2>,
) -> Option<Tensor<B, 2>> {
    None
}

/// `x · W_eᵀ` for expert `e` of an FP8-resident weight on Flex, reading each code once for all
/// rows and decoding it in registers (E4M3 widened through f16 with `vcvtph2ps`); `None` where
/// it does not apply (another backend, more than [`MAX_ROWS`] rows, a layout it does not read).
///
/// # Shapes
/// `x`: `[rows, d_in]` → `[rows, d_out]`.
#[cfg(feature = "flex")]
pub fn fp8_matmul<B: Backend>(
    x: &Tensor<B, 2>,
    codes: &Tensor<B, 2, Int>,
    scales: &Tensor<B, 2>,
    layout: Fp8Layout,
    expert: usize,
) -> Option<Tensor<B, 2>> {
    flex::fp8_matmul(x, codes, scales, layout, expert)
}

/// Without Flex compiled in there is nothing to take.
#[cfg(not(feature = "flex"))]
pub fn fp8_matmul<B: Backend>(
    _x: &Tensor<B, 2>,
    _codes: &Tensor<B, 2, Int>,
    _scales: &Tensor<B, 2>,
    _layout: Fp8Layout,
    _expert: usize,
) -> Option<Tensor<B, 2>> {
    None
}

/// Experts `first..first + count` of an FP8-resident weight dequantized to f32 on the host, on
/// the thread pool (Flex only; `None` elsewhere).
///
/// # Shapes
/// → `[count · d_out, d_in]`.
#[cfg(feature = "flex")]
pub fn fp8_dequantize<B: Backend>(
    codes: &Tensor<B, 2, Int>,
    scales: &Tensor<B, 2>,
    layout: Fp8Layout,
    first: usize,
    count: usize,
) -> Option<Tensor<B, 2>> {
    flex::fp8_dequantize(codes, scales, layout, first, count)
}

/// Without Flex compiled in there is nothing to take.
#[cfg(not(feature = "flex"))]
pub fn fp8_dequantize<B: Backend>(
    _codes: &Tensor<B, 2, Int>,
    _scales: &Tensor<B, 2>,
    _layout: Fp8Layout,
    _first: usize,
    _count: usize,
) -> Option<Tensor<B, 2>> {
    None
}

/// An FP8-resident stack of expert matrices as [`fp8_routed_experts`] reads it.
pub struct Fp8Stack<'a, B: Backend> {
    /// `u32` words of E4M3 codes ([`crate::fp8::Fp8Weight::codes`]).
    pub codes: &'a Tensor<B, 2, Int>,
    /// Block scales ([`crate::fp8::Fp8Weight::scales`]).
    pub scales: &'a Tensor<B, 2>,
    /// Their shape.
    pub layout: Fp8Layout,
}

/// [`routed_experts`] with FP8-resident experts: each chosen expert's gate/up and down products
/// on the FP8 kernel of [`fp8_matmul`], the hidden activations in f32, gates combined in expert
/// order. `None` where it does not apply.
///
/// # Shapes
/// `x`: `[T, D]`, `gate_up`: `E × [2I, D]` (gate rows first), `down`: `E × [D, I]`, `experts`:
/// `T·K` indices, token-major, `gates`: `[T, K]` → `[T, D]`.
#[cfg(feature = "flex")]
pub fn fp8_routed_experts<B: Backend>(
    x: &Tensor<B, 2>,
    gate_up: Fp8Stack<'_, B>,
    down: Fp8Stack<'_, B>,
    experts: &[i64],
    gates: &Tensor<B, 2>,
) -> Option<Tensor<B, 2>> {
    flex::fp8_routed_experts(x, gate_up, down, experts, gates)
}

/// Without Flex compiled in there is nothing to take.
#[cfg(not(feature = "flex"))]
pub fn fp8_routed_experts<B: Backend>(
    _x: &Tensor<B, 2>,
    _gate_up: Fp8Stack<'_, B>,
    _down: Fp8Stack<'_, B>,
    _experts: &[i64],
    _gates: &Tensor<B, 2>,
) -> Option<Tensor<B, 2>> {
    None
}

#[cfg(feature = "flex")]
mod flex {
    use std::any::{Any, TypeId};

    use burn::backend::Flex;
    use burn::tensor::backend::Backend;
    use burn::tensor::{DType, Tensor, TensorData, TensorPrimitive};
    use burn_flex::FlexTensor;
    use half::slice::HalfFloatSliceExt;
    use half::{bf16, f16};
    use rayon::prelude::*;

    use super::{Fp8Stack, MAX_ROWS, MIN_SPLIT};
    use crate::fp8::block::Fp8Layout;
    use burn::tensor::Int;

    /// Output columns accumulated per pass over the weight rows: the `rows` accumulators of a
    /// block stay in the L2 cache (8 rows × 8 KiB).
    const BLOCK: usize = 2048;

    /// Moves a value whose concrete type the caller has checked with `TypeId`.
    fn cast<T: 'static, U: 'static>(value: T) -> U {
        let boxed: Box<dyn Any> = Box::new(value);
        *boxed.downcast::<U>().expect("the caller compared TypeIds")
    }

    /// The Flex tensor behind `t` (`B` is `Flex`: the caller checked).
    fn flex_tensor<B: Backend, const D: usize>(t: &Tensor<B, D>) -> FlexTensor {
        cast(t.clone().into_primitive().tensor())
    }

    pub(super) fn matmul<B: Backend, const D: usize, const R: usize>(
        x: &Tensor<B, D>,
        w: &Tensor<B, R>,
    ) -> Option<Tensor<B, D>> {
        if TypeId::of::<B>() != TypeId::of::<Flex>() {
            return None;
        }
        let (x_dims, w_dims) = (x.dims(), w.dims());
        let (k, n) = (w_dims[R - 2], w_dims[R - 1]);
        let rows: usize = x_dims[..D - 1].iter().product();
        if rows == 0
            || rows > MAX_ROWS
            || k == 0
            || x_dims[D - 1] != k
            || w_dims[..R - 2].iter().any(|&d| d != 1)
        {
            return None;
        }
        let (xf, wf) = (flex_tensor(x), flex_tensor(w));
        if xf.dtype() != wf.dtype() {
            return None;
        }
        let out = match xf.dtype() {
            DType::F32 => product::<f32>(&xf, &wf, rows, k, n)?,
            DType::F16 => product::<f16>(&xf, &wf, rows, k, n)?,
            DType::BF16 => product::<bf16>(&xf, &wf, rows, k, n)?,
            _ => return None,
        };
        let mut shape = x_dims;
        shape[D - 1] = n;
        let y: Tensor<B, 2> = Tensor::from_primitive(TensorPrimitive::Float(cast(out)));
        Some(y.reshape(shape))
    }

    pub(super) fn routed_experts<B: Backend>(
        x: &Tensor<B, 2>,
        gate_up: &Tensor<B, 3>,
        down: &Tensor<B, 3>,
        experts: &[i64],
        gates: &Tensor<B, 2>,
    ) -> Option<Tensor<B, 2>> {
        if TypeId::of::<B>() != TypeId::of::<Flex>() {
            return None;
        }
        let ([tokens, d], [n_experts, gu_d, two_i], [_, i, down_d]) =
            (x.dims(), gate_up.dims(), down.dims());
        if tokens == 0 || tokens > MAX_ROWS || (gu_d, down_d, two_i) != (d, d, 2 * i) {
            return None;
        }
        let (experts, gates) = routing(experts, n_experts, tokens, gates)?;
        let (xf, gu, dn) = (flex_tensor(x), flex_tensor(gate_up), flex_tensor(down));
        if gu.dtype() != xf.dtype() || dn.dtype() != xf.dtype() {
            return None;
        }
        let shape = [tokens, d, i];
        let out = match xf.dtype() {
            DType::F32 => experts_pass::<f32>(&xf, &gu, &dn, shape, &experts, &gates)?,
            DType::F16 => experts_pass::<f16>(&xf, &gu, &dn, shape, &experts, &gates)?,
            DType::BF16 => experts_pass::<bf16>(&xf, &gu, &dn, shape, &experts, &gates)?,
            _ => return None,
        };
        Some(Tensor::from_primitive(TensorPrimitive::Float(cast(out))))
    }

    /// One expert's stacked weight `[E, k, n]` read as expert `e`'s `[k, n]`; `None` unless the
    /// rows are contiguous and the strides non-negative.
    fn expert_view<'a, T: Float>(w: &'a FlexTensor, e: usize) -> Option<Weight<'a, T>> {
        let [_, k, n] = w.layout().shape().dims::<3>();
        let expert_stride = usize::try_from(w.layout().strides()[0]).ok()?;
        matrix_view_at(w, e * expert_stride, k, n)
    }

    fn experts_pass<T: Float>(
        x: &FlexTensor,
        gate_up: &FlexTensor,
        down: &FlexTensor,
        [tokens, d, i]: [usize; 3],
        experts: &[usize],
        gates: &[f32],
    ) -> Option<FlexTensor> {
        let top_k = experts.len() / tokens;
        let xs = widened_rows::<T>(x, tokens * d)?;
        // The chosen experts in ascending order, each with its (token, slot) pairs.
        let mut chosen: Vec<(usize, Vec<(usize, usize)>)> = Vec::new();
        let mut by_expert: Vec<Vec<(usize, usize)>> = vec![Vec::new(); gate_up.layout().shape()[0]];
        for (at, &e) in experts.iter().enumerate() {
            by_expert[e].push((at / top_k, at));
        }
        for (e, rows) in by_expert.into_iter().enumerate() {
            if !rows.is_empty() {
                chosen.push((e, rows));
            }
        }
        // Check every view before any thread starts.
        for &(e, _) in &chosen {
            expert_view::<T>(gate_up, e)?;
            expert_view::<T>(down, e)?;
        }
        let one = |(e, rows): &(usize, Vec<(usize, usize)>)| -> Vec<f32> {
            let (gu, dn) = (expert_view::<T>(gate_up, *e), expert_view::<T>(down, *e));
            let (gu, dn) = (gu.expect("checked"), dn.expect("checked"));
            let r = rows.len();
            let mut xe = Vec::with_capacity(r * d);
            for &(t, _) in rows {
                xe.extend_from_slice(&xs[t * d..(t + 1) * d]);
            }
            let mut h = vec![0f32; r * 2 * i];
            gu.accumulate(&xe, 0..d, &mut h);
            // SwiGLU: silu(gate) ⊙ up, gate in the first I columns of each row.
            let mut act = vec![0f32; r * i];
            for (a, h) in act.chunks_exact_mut(i).zip(h.chunks_exact(2 * i)) {
                for ((a, &g), &u) in a.iter_mut().zip(&h[..i]).zip(&h[i..]) {
                    *a = silu(g) * u;
                }
            }
            let mut out = vec![0f32; r * d];
            dn.accumulate(&act, 0..i, &mut out);
            out
        };
        let weight_elements = chosen.len() * 3 * d * i;
        let outputs: Vec<Vec<f32>> = if weight_elements >= MIN_SPLIT && chosen.len() > 1 {
            chosen.par_iter().map(one).collect()
        } else {
            chosen.iter().map(one).collect()
        };
        // Combine in expert order, whatever thread computed what.
        let mut y = vec![0f32; tokens * d];
        for ((_, rows), out) in chosen.iter().zip(&outputs) {
            for (&(t, at), row) in rows.iter().zip(out.chunks_exact(d)) {
                let gate = gates[at];
                for (y, v) in y[t * d..(t + 1) * d].iter_mut().zip(row) {
                    *y += gate * v;
                }
            }
        }
        let y: Vec<T> = y.into_iter().map(T::from_f32).collect();
        Some(FlexTensor::from_data(TensorData::new(y, [tokens, d])))
    }

    /// A float type stored in Flex tensors, computed in f32.
    trait Float: burn::tensor::Element + bytemuck::Pod {
        /// `y += a · x`, `x` widened to f32 as it is read (a separate widening pass into a
        /// buffer halved the bf16 kernel's throughput: 12.6 against 21.5 GB/s on one core).
        fn axpy(y: &mut [f32], a: f32, x: &[Self]);
        /// [`Float::axpy`] with AVX2, FMA and F16C instructions.
        ///
        /// # Safety
        /// Only from code compiled for those features (it is inlined there), on a CPU that has
        /// them.
        #[cfg(target_arch = "x86_64")]
        unsafe fn axpy_avx2(y: &mut [f32], a: f32, x: &[Self]);
        /// `y += a₀·x₀ + a₁·x₁ + a₂·x₂ + a₃·x₃` elementwise, added in that order (so the same
        /// values as four [`Float::axpy`]s), with `y` loaded and stored once instead of four
        /// times.
        fn axpy4(y: &mut [f32], a: [f32; 4], x: [&[Self]; 4]);
        /// [`Float::axpy4`] with AVX2, FMA and F16C instructions.
        ///
        /// # Safety
        /// As [`Float::axpy_avx2`].
        #[cfg(target_arch = "x86_64")]
        unsafe fn axpy4_avx2(y: &mut [f32], a: [f32; 4], x: [&[Self]; 4]);
        /// `dst = src` in f32.
        fn widen(src: &[Self], dst: &mut [f32]);
        fn from_f32(v: f32) -> Self;
    }

    /// Whether the CPU has AVX2, FMA and F16C (every x86 CPU with AVX2 has the other two).
    #[cfg(target_arch = "x86_64")]
    fn avx2_fma() -> bool {
        std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c")
    }

    /// Whether the plain loops fuse their multiply-adds: where the baseline has FMA (aarch64, or a
    /// build for such a CPU). Elsewhere `f32::mul_add` is a call to libm's `fmaf` per element, so
    /// the fallback of an x86 CPU without FMA multiplies and adds.
    const PLAIN_FUSED: bool = cfg!(any(target_arch = "aarch64", target_feature = "fma"));

    /// `y += a · get(x)` elementwise, fused (one rounding) or not.
    #[inline(always)]
    fn axpy_with<T, const FUSED: bool>(y: &mut [f32], a: f32, x: &[T], get: impl Fn(&T) -> f32) {
        for (y, x) in y.iter_mut().zip(x) {
            let x = get(x);
            *y = if FUSED { a.mul_add(x, *y) } else { a * x + *y };
        }
    }

    /// [`Float::axpy4`]: per element, four multiply-adds in row order (fused or not).
    #[inline(always)]
    fn axpy4_with<T, const FUSED: bool>(
        y: &mut [f32],
        a: [f32; 4],
        x: [&[T]; 4],
        get: impl Fn(&T) -> f32,
    ) {
        let n = y.len();
        // Equal lengths up front, so the loop below has no bounds checks and vectorizes.
        let (x0, x1, x2, x3) = (&x[0][..n], &x[1][..n], &x[2][..n], &x[3][..n]);
        let madd = |a: f32, x: f32, y: f32| if FUSED { a.mul_add(x, y) } else { a * x + y };
        for j in 0..n {
            let mut v = y[j];
            v = madd(a[0], get(&x0[j]), v);
            v = madd(a[1], get(&x1[j]), v);
            v = madd(a[2], get(&x2[j]), v);
            v = madd(a[3], get(&x3[j]), v);
            y[j] = v;
        }
    }

    impl Float for f32 {
        #[inline(always)]
        fn axpy(y: &mut [f32], a: f32, x: &[Self]) {
            axpy_with::<_, PLAIN_FUSED>(y, a, x, |v| *v);
        }
        #[cfg(target_arch = "x86_64")]
        #[inline(always)]
        unsafe fn axpy_avx2(y: &mut [f32], a: f32, x: &[Self]) {
            // The plain loop, vectorized and fused by the caller's target features.
            axpy_with::<_, true>(y, a, x, |v| *v);
        }
        #[inline(always)]
        fn axpy4(y: &mut [f32], a: [f32; 4], x: [&[Self]; 4]) {
            axpy4_with::<_, PLAIN_FUSED>(y, a, x, |v| *v);
        }
        #[cfg(target_arch = "x86_64")]
        #[inline(always)]
        unsafe fn axpy4_avx2(y: &mut [f32], a: [f32; 4], x: [&[Self]; 4]) {
            axpy4_with::<_, true>(y, a, x, |v| *v);
        }
        fn widen(src: &[Self], dst: &mut [f32]) {
            dst.copy_from_slice(src);
        }
        fn from_f32(v: f32) -> Self {
            v
        }
    }

    impl Float for bf16 {
        #[inline(always)]
        fn axpy(y: &mut [f32], a: f32, x: &[Self]) {
            axpy_with::<_, PLAIN_FUSED>(y, a, x, widen_bf16);
        }
        #[cfg(target_arch = "x86_64")]
        #[inline(always)]
        unsafe fn axpy_avx2(y: &mut [f32], a: f32, x: &[Self]) {
            axpy_with::<_, true>(y, a, x, widen_bf16);
        }
        #[inline(always)]
        fn axpy4(y: &mut [f32], a: [f32; 4], x: [&[Self]; 4]) {
            axpy4_with::<_, PLAIN_FUSED>(y, a, x, widen_bf16);
        }
        #[cfg(target_arch = "x86_64")]
        #[inline(always)]
        unsafe fn axpy4_avx2(y: &mut [f32], a: [f32; 4], x: [&[Self]; 4]) {
            axpy4_with::<_, true>(y, a, x, widen_bf16);
        }
        fn widen(src: &[Self], dst: &mut [f32]) {
            src.convert_to_f32_slice(dst);
        }
        fn from_f32(v: f32) -> Self {
            bf16::from_f32(v)
        }
    }

    /// A bf16 is the top half of an f32.
    #[inline(always)]
    fn widen_bf16(v: &bf16) -> f32 {
        f32::from_bits(u32::from(v.to_bits()) << 16)
    }

    impl Float for f16 {
        #[inline(always)]
        fn axpy(y: &mut [f32], a: f32, x: &[Self]) {
            axpy_with::<_, PLAIN_FUSED>(y, a, x, |v| v.to_f32());
        }
        /// Eight halves at a time with `vcvtph2ps` (`half` converts element by element).
        #[cfg(target_arch = "x86_64")]
        #[inline(always)]
        unsafe fn axpy_avx2(y: &mut [f32], a: f32, x: &[Self]) {
            use std::arch::x86_64::*;
            let n = y.len().min(x.len());
            let whole = n / 8 * 8;
            // SAFETY (all blocks): the caller runs with AVX2, FMA and F16C; `i + 8 <= n` keeps
            // the unaligned loads and stores within both slices.
            let a8 = unsafe { _mm256_set1_ps(a) };
            for i in (0..whole).step_by(8) {
                unsafe {
                    let w = _mm256_cvtph_ps(_mm_loadu_si128(x.as_ptr().add(i) as *const __m128i));
                    let acc = _mm256_loadu_ps(y.as_ptr().add(i));
                    _mm256_storeu_ps(y.as_mut_ptr().add(i), _mm256_fmadd_ps(a8, w, acc));
                }
            }
            axpy_with::<_, true>(&mut y[whole..n], a, &x[whole..n], |v| v.to_f32());
        }
        #[inline(always)]
        fn axpy4(y: &mut [f32], a: [f32; 4], x: [&[Self]; 4]) {
            axpy4_with::<_, PLAIN_FUSED>(y, a, x, |v| v.to_f32());
        }
        #[cfg(target_arch = "x86_64")]
        #[inline(always)]
        unsafe fn axpy4_avx2(y: &mut [f32], a: [f32; 4], x: [&[Self]; 4]) {
            use std::arch::x86_64::*;
            let n = y.len();
            let x = x.map(|x| &x[..n]);
            let whole = n / 8 * 8;
            // SAFETY (all blocks): the caller runs with AVX2, FMA and F16C; every `x[r]` has `n`
            // elements and `i + 8 <= n` keeps the unaligned loads and stores within them.
            let a8 = a.map(|a| unsafe { _mm256_set1_ps(a) });
            let load = |r: usize, i: usize| unsafe {
                _mm256_cvtph_ps(_mm_loadu_si128(x[r].as_ptr().add(i) as *const __m128i))
            };
            for i in (0..whole).step_by(8) {
                unsafe {
                    let mut acc = _mm256_loadu_ps(y.as_ptr().add(i));
                    for (r, a8) in a8.iter().enumerate() {
                        acc = _mm256_fmadd_ps(*a8, load(r, i), acc);
                    }
                    _mm256_storeu_ps(y.as_mut_ptr().add(i), acc);
                }
            }
            let tail = x.map(|x| &x[whole..]);
            axpy4_with::<_, true>(&mut y[whole..], a, tail, |v| v.to_f32());
        }
        fn widen(src: &[Self], dst: &mut [f32]) {
            src.convert_to_f32_slice(dst);
        }
        fn from_f32(v: f32) -> Self {
            f16::from_f32(v)
        }
    }

    /// `y = x · w` for `rows` rows; `None` unless `x` is contiguous and `w`'s rows are.
    fn product<T: Float>(
        x: &FlexTensor,
        w: &FlexTensor,
        rows: usize,
        k: usize,
        n: usize,
    ) -> Option<FlexTensor> {
        let weight = matrix_view::<T>(w, k, n)?;
        let xs = widened_rows::<T>(x, rows * k)?;
        let y: Vec<T> = weight.times(&xs).into_iter().map(T::from_f32).collect();
        Some(FlexTensor::from_data(TensorData::new(y, [rows, n])))
    }

    /// The `len` values of a contiguous `x`, in f32.
    fn widened_rows<T: Float>(x: &FlexTensor, len: usize) -> Option<Vec<f32>> {
        let (start, end) = x.layout().contiguous_offsets()?;
        if end - start != len {
            return None;
        }
        let data: &[T] = x.storage();
        let mut xs = vec![0f32; len];
        T::widen(&data[start..end], &mut xs);
        Some(xs)
    }

    /// The last two dimensions of `w` as a `[k, n]` weight; `None` unless its rows are
    /// contiguous.
    fn matrix_view<T: Float>(w: &FlexTensor, k: usize, n: usize) -> Option<Weight<'_, T>> {
        matrix_view_at(w, 0, k, n)
    }

    /// [`matrix_view`] of the matrix `skip` elements past `w`'s start (another expert's).
    fn matrix_view_at<T: Float>(
        w: &FlexTensor,
        skip: usize,
        k: usize,
        n: usize,
    ) -> Option<Weight<'_, T>> {
        let strides = w.layout().strides();
        let (w_rs, w_cs) = (strides[strides.len() - 2], strides[strides.len() - 1]);
        if w_cs != 1 || (k > 1 && w_rs < n as isize) {
            return None;
        }
        let row_stride = w_rs.max(n as isize) as usize;
        let start = w.layout().start_offset() + skip;
        let data: &[T] = w.storage();
        let data = data.get(start..start + (k - 1) * row_stride + n)?;
        Some(Weight { data, row_stride, k, n })
    }

    /// `[SwiGLU](crate::mlp)` for a few rows: `down(silu(x · gate) ⊙ (x · up))`, the hidden
    /// activations in f32.
    pub(super) fn swiglu<B: Backend, const D: usize>(
        x: &Tensor<B, D>,
        gate: &Tensor<B, 2>,
        up: &Tensor<B, 2>,
        down: &Tensor<B, 2>,
    ) -> Option<Tensor<B, D>> {
        if TypeId::of::<B>() != TypeId::of::<Flex>() {
            return None;
        }
        let x_dims = x.dims();
        let ([d, hidden], [up_d, up_hidden], [down_hidden, d_out]) =
            (gate.dims(), up.dims(), down.dims());
        let rows: usize = x_dims[..D - 1].iter().product();
        if rows == 0
            || rows > MAX_ROWS
            || x_dims[D - 1] != d
            || (up_d, up_hidden, down_hidden) != (d, hidden, hidden)
        {
            return None;
        }
        let xf = flex_tensor(x);
        let (g, u, dn) = (flex_tensor(gate), flex_tensor(up), flex_tensor(down));
        if [g.dtype(), u.dtype(), dn.dtype()].iter().any(|&dt| dt != xf.dtype()) {
            return None;
        }
        let shape = [rows, d, hidden, d_out];
        let out = match xf.dtype() {
            DType::F32 => swiglu_pass::<f32>(&xf, [&g, &u, &dn], shape)?,
            DType::F16 => swiglu_pass::<f16>(&xf, [&g, &u, &dn], shape)?,
            DType::BF16 => swiglu_pass::<bf16>(&xf, [&g, &u, &dn], shape)?,
            _ => return None,
        };
        let mut out_shape = x_dims;
        out_shape[D - 1] = d_out;
        let y: Tensor<B, 2> = Tensor::from_primitive(TensorPrimitive::Float(cast(out)));
        Some(y.reshape(out_shape))
    }

    fn swiglu_pass<T: Float>(
        x: &FlexTensor,
        [gate, up, down]: [&FlexTensor; 3],
        [rows, d, hidden, d_out]: [usize; 4],
    ) -> Option<FlexTensor> {
        let (gate, up) = (matrix_view::<T>(gate, d, hidden)?, matrix_view::<T>(up, d, hidden)?);
        let down = matrix_view::<T>(down, hidden, d_out)?;
        let xs = widened_rows::<T>(x, rows * d)?;
        let (g, u) = (gate.times(&xs), up.times(&xs));
        let act: Vec<f32> = g.iter().zip(&u).map(|(&g, &u)| silu(g) * u).collect();
        let y: Vec<T> = down.times(&act).into_iter().map(T::from_f32).collect();
        Some(FlexTensor::from_data(TensorData::new(y, [rows, d_out])))
    }

    /// `x · sigmoid(x)` in f32.
    #[inline(always)]
    fn silu(x: f32) -> f32 {
        x / (1.0 + (-x).exp())
    }

    /// A weight `[k, n]` whose rows are contiguous, `row_stride` elements apart.
    struct Weight<'a, T> {
        data: &'a [T],
        row_stride: usize,
        k: usize,
        n: usize,
    }

    impl<T: Float> Weight<'_, T> {
        /// `xs · W` for the rows of `xs` (`[rows, k]`, f32) → `[rows, n]` in f32. A weight of at
        /// least [`MIN_SPLIT`] elements is cut along `k` into one contiguous range of rows per
        /// thread, whose partial sums are added in range order.
        fn times(&self, xs: &[f32]) -> Vec<f32> {
            let (k, n) = (self.k, self.n);
            let rows = xs.len() / k;
            let parts = rayon::current_num_threads().min((k * n) / MIN_SPLIT).clamp(1, k);
            if parts == 1 {
                let mut acc = vec![0f32; rows * n];
                self.accumulate(xs, 0..k, &mut acc);
                return acc;
            }
            let chunk = k.div_ceil(parts);
            let partial: Vec<Vec<f32>> = (0..parts)
                .into_par_iter()
                .map(|p| {
                    let mut acc = vec![0f32; rows * n];
                    self.accumulate(xs, p * chunk..((p + 1) * chunk).min(k), &mut acc);
                    acc
                })
                .collect();
            let mut parts = partial.into_iter();
            let mut y = parts.next().expect("at least one part");
            for part in parts {
                y.iter_mut().zip(&part).for_each(|(a, b)| *a += b);
            }
            y
        }

        /// `acc[r] += Σ_{i ∈ range} xs[r, i] · W[i]` for every row `r` of `xs` (`[rows, k]`).
        fn accumulate(&self, xs: &[f32], range: std::ops::Range<usize>, acc: &mut [f32]) {
            // The CPU's features are checked once per product, not per weight row: the rows of
            // a decoding step's small products are a few hundred floats each.
            #[cfg(target_arch = "x86_64")]
            if avx2_fma() {
                // SAFETY: the CPU has the features `accumulate_avx2` is compiled for.
                return unsafe { self.accumulate_avx2(xs, range, acc) };
            }
            self.accumulate_with(xs, range, acc, T::axpy, T::axpy4);
        }

        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2,fma,f16c")]
        fn accumulate_avx2(&self, xs: &[f32], range: std::ops::Range<usize>, acc: &mut [f32]) {
            // SAFETY: this function runs with the features `axpy_avx2` and `axpy4_avx2` need.
            self.accumulate_with(
                xs,
                range,
                acc,
                |y, a, x| unsafe { T::axpy_avx2(y, a, x) },
                |y, a, x| unsafe { T::axpy4_avx2(y, a, x) },
            );
        }

        /// [`Weight::accumulate`] on the given kernels: four weight rows at a time (`axpy4`)
        /// where that pays, else row by row (`axpy`). An output value takes its multiply-adds
        /// in weight-row order either way, so the grouping does not change a bit of the result.
        #[inline(always)]
        fn accumulate_with(
            &self,
            xs: &[f32],
            range: std::ops::Range<usize>,
            acc: &mut [f32],
            axpy: impl Fn(&mut [f32], f32, &[T]),
            axpy4: impl Fn(&mut [f32], [f32; 4], [&[T]; 4]),
        ) {
            let (k, n) = (self.k, self.n);
            let rows = xs.len() / k;
            for col in (0..n).step_by(BLOCK) {
                let width = BLOCK.min(n - col);
                let w_row = |i: usize| &self.data[i * self.row_stride + col..][..width];
                // Four rows at a time only where the columns are cut into blocks (the output
                // head): there each row's block is a short run of memory, and reading four
                // at once keeps the prefetchers busy. A narrower weight is one sequential
                // stream row after row, which interleaving four rows slows down (the
                // `few_rows` bench: 24 → 15 GB/s for a 1024 × 512 bf16 expert).
                let fours = if n > BLOCK { range.start + range.len() / 4 * 4 } else { range.start };
                for i in (range.start..fours).step_by(4) {
                    let w = [w_row(i), w_row(i + 1), w_row(i + 2), w_row(i + 3)];
                    for r in 0..rows {
                        let a = [
                            xs[r * k + i],
                            xs[r * k + i + 1],
                            xs[r * k + i + 2],
                            xs[r * k + i + 3],
                        ];
                        axpy4(&mut acc[r * n + col..][..width], a, w);
                    }
                }
                for i in fours..range.end {
                    for r in 0..rows {
                        axpy(&mut acc[r * n + col..][..width], xs[r * k + i], w_row(i));
                    }
                }
            }
        }
    }

    /// The expert ids of a few tokens' routing, checked against `n_experts`, and the gate weights
    /// on the host; `None` unless each of the `tokens` has the same number of them.
    fn routing<B: Backend>(
        experts: &[i64],
        n_experts: usize,
        tokens: usize,
        gates: &Tensor<B, 2>,
    ) -> Option<(Vec<usize>, Vec<f32>)> {
        if experts.is_empty()
            || !experts.len().is_multiple_of(tokens)
            || gates.dims().iter().product::<usize>() != experts.len()
        {
            return None;
        }
        let ids = experts
            .iter()
            .map(|&e| usize::try_from(e).ok().filter(|&e| e < n_experts))
            .collect::<Option<_>>()?;
        let gates = gates.clone().into_data().convert::<f32>().into_vec().ok()?;
        Some((ids, gates))
    }

    /// The `len` values of a contiguous float `x` in f32.
    fn input_rows(x: &FlexTensor, len: usize) -> Option<Vec<f32>> {
        match x.dtype() {
            DType::F32 => widened_rows::<f32>(x, len),
            DType::F16 => widened_rows::<f16>(x, len),
            DType::BF16 => widened_rows::<bf16>(x, len),
            _ => None,
        }
    }

    /// f32 results as a tensor of `dtype` (f32, f16 or bf16).
    fn output<B: Backend>(y: Vec<f32>, dtype: DType, shape: [usize; 2]) -> Tensor<B, 2> {
        let data = match dtype {
            DType::F16 => TensorData::new(y.into_iter().map(f16::from_f32).collect(), shape),
            DType::BF16 => TensorData::new(y.into_iter().map(bf16::from_f32).collect(), shape),
            _ => TensorData::new(y, shape),
        };
        Tensor::from_primitive(TensorPrimitive::Float(cast(FlexTensor::from_data(data))))
    }

    /// The codes (as bytes) and scales of an FP8-resident weight on Flex; `None` unless both are
    /// contiguous (they always are as loaded) and the words are little-endian.
    fn fp8_storage<B: Backend>(
        codes: &Tensor<B, 2, Int>,
        scales: &Tensor<B, 2>,
    ) -> Option<(FlexTensor, FlexTensor)> {
        if !cfg!(target_endian = "little") {
            return None;
        }
        let codes: FlexTensor = cast(codes.clone().into_primitive());
        let scales = flex_tensor(scales);
        (codes.dtype() == DType::U32 && scales.dtype() == DType::F32).then_some((codes, scales))
    }

    /// A contiguous tensor's values.
    fn contiguous<T: burn::tensor::Element + bytemuck::Pod>(t: &FlexTensor) -> Option<&[T]> {
        let (start, end) = t.layout().contiguous_offsets()?;
        Some(&t.storage::<T>()[start..end])
    }

    /// The decoded value of every E4M3 code times `factor` (a power of two: exact; NaN codes,
    /// refused at load, as 0).
    fn e4m3_table(factor: f32) -> [f32; 256] {
        crate::fp8::e4m3::decode_table().map(|v| v * factor)
    }

    pub(super) fn fp8_matmul<B: Backend>(
        x: &Tensor<B, 2>,
        codes: &Tensor<B, 2, Int>,
        scales: &Tensor<B, 2>,
        l: Fp8Layout,
        expert: usize,
    ) -> Option<Tensor<B, 2>> {
        if TypeId::of::<B>() != TypeId::of::<Flex>() {
            return None;
        }
        let [rows, k] = x.dims();
        if rows == 0 || rows > MAX_ROWS || k != l.d_in || expert >= l.experts {
            return None;
        }
        let xf = flex_tensor(x);
        let xs = input_rows(&xf, rows * k)?;
        let (codes, scales) = fp8_storage(codes, scales)?;
        let (codes, scales) = (contiguous::<u32>(&codes)?, contiguous::<f32>(&scales)?);
        let y = Fp8Matrix::of(codes, scales, l, expert)?.times(&xs, rows);
        Some(output(y, xf.dtype(), [rows, l.d_out]))
    }

    pub(super) fn fp8_dequantize<B: Backend>(
        codes: &Tensor<B, 2, Int>,
        scales: &Tensor<B, 2>,
        l: Fp8Layout,
        first: usize,
        count: usize,
    ) -> Option<Tensor<B, 2>> {
        if TypeId::of::<B>() != TypeId::of::<Flex>() {
            return None;
        }
        let (codes, scales) = fp8_storage(codes, scales)?;
        let (codes, scales) = (contiguous::<u32>(&codes)?, contiguous::<f32>(&scales)?);
        let codes = bytemuck::cast_slice::<u32, u8>(codes);
        let (stride, [gr, gc], [_, bc]) = (l.words() * 4, l.grid(), l.block);
        let table = e4m3_table(1.0);
        let mut out = vec![0f32; count * l.d_out * l.d_in];
        out.par_chunks_mut(l.d_in).enumerate().for_each(|(i, row)| {
            let (e, j) = (first + i / l.d_out, i % l.d_out);
            let code_row = &codes[(e * l.d_out + j) * stride..][..l.d_in];
            let scale_row = &scales[(e * gr + l.scale_row(j)) * gc..][..gc];
            for (c, (v, &q)) in row.iter_mut().zip(code_row).enumerate() {
                *v = table[q as usize] * scale_row[c / bc];
            }
        });
        let data = TensorData::new(out, [count * l.d_out, l.d_in]);
        Some(Tensor::from_primitive(TensorPrimitive::Float(cast(FlexTensor::from_data(data)))))
    }

    pub(super) fn fp8_routed_experts<B: Backend>(
        x: &Tensor<B, 2>,
        gate_up: Fp8Stack<'_, B>,
        down: Fp8Stack<'_, B>,
        experts: &[i64],
        gates: &Tensor<B, 2>,
    ) -> Option<Tensor<B, 2>> {
        if TypeId::of::<B>() != TypeId::of::<Flex>() {
            return None;
        }
        let [tokens, d] = x.dims();
        let (gl, dl) = (gate_up.layout, down.layout);
        let i = dl.d_in;
        if tokens == 0
            || tokens > MAX_ROWS
            || (gl.d_in, gl.d_out, gl.parts, dl.d_out) != (d, 2 * i, 2, d)
            || gl.experts != dl.experts
        {
            return None;
        }
        let (experts, gates) = routing(experts, gl.experts, tokens, gates)?;
        let xf = flex_tensor(x);
        let xs = input_rows(&xf, tokens * d)?;
        let (gu_codes, gu_scales) = fp8_storage(gate_up.codes, gate_up.scales)?;
        let (dn_codes, dn_scales) = fp8_storage(down.codes, down.scales)?;
        let stacks = [
            (contiguous::<u32>(&gu_codes)?, contiguous::<f32>(&gu_scales)?, gl),
            (contiguous::<u32>(&dn_codes)?, contiguous::<f32>(&dn_scales)?, dl),
        ];
        let matrix = |which: usize, e: usize| {
            let (codes, scales, l) = stacks[which];
            Fp8Matrix::of(codes, scales, l, e)
        };
        let top_k = experts.len() / tokens;
        let mut chosen = experts.clone();
        chosen.sort_unstable();
        chosen.dedup();
        let mut y = vec![0f32; tokens * d];
        for e in chosen {
            // The tokens routed to `e` and their gates, in token order.
            let routed: Vec<(usize, f32)> = (0..tokens * top_k)
                .filter(|&s| experts[s] == e)
                .map(|s| (s / top_k, gates[s]))
                .collect();
            let n = routed.len();
            let xe: Vec<f32> =
                routed.iter().flat_map(|&(t, _)| xs[t * d..(t + 1) * d].iter().copied()).collect();
            let h = matrix(0, e)?.times(&xe, n); // [n, 2I]
            let act: Vec<f32> = (0..n * i)
                .map(|k| {
                    let (r, c) = (k / i, k % i);
                    silu(h[r * 2 * i + c]) * h[r * 2 * i + i + c]
                })
                .collect();
            let out = matrix(1, e)?.times(&act, n); // [n, D]
            for (r, &(t, gate)) in routed.iter().enumerate() {
                for (acc, v) in y[t * d..(t + 1) * d].iter_mut().zip(&out[r * d..(r + 1) * d]) {
                    *acc += gate * v;
                }
            }
        }
        Some(output(y, xf.dtype(), [tokens, d]))
    }

    /// One FP8 matrix in place: codes `[d_out, d_in]` with rows `stride` bytes apart, and its
    /// scale grid.
    struct Fp8Matrix<'a> {
        codes: &'a [u8],
        scales: &'a [f32],
        stride: usize,
        layout: Fp8Layout,
    }

    impl<'a> Fp8Matrix<'a> {
        /// Matrix `e` of a stack: its codes (as `u32` words) and scales.
        fn of(codes: &'a [u32], scales: &'a [f32], layout: Fp8Layout, e: usize) -> Option<Self> {
            let (stride, [gr, gc]) = (layout.words() * 4, layout.grid());
            Some(Fp8Matrix {
                codes: bytemuck::cast_slice::<u32, u8>(codes).get(e * layout.d_out * stride..)?,
                scales: scales.get(e * gr * gc..)?,
                stride,
                layout,
            })
        }

        /// `xs · Wᵀ` for the rows of `xs` (`[rows, d_in]`, f32) → `[rows, d_out]` in f32. The
        /// output rows are cut into one contiguous range per thread when the matrix is large:
        /// each thread streams its own rows of codes, and no partial sums need adding.
        fn times(&self, xs: &[f32], rows: usize) -> Vec<f32> {
            let (n, k) = (self.layout.d_out, self.layout.d_in);
            let parts = rayon::current_num_threads().min((k * n) / (2 * MIN_SPLIT)).clamp(1, n);
            let chunk = n.div_ceil(parts);
            let ranges: Vec<_> = (0..n).step_by(chunk).map(|j| j..(j + chunk).min(n)).collect();
            let out: Vec<Vec<f32>> = if ranges.len() == 1 {
                vec![self.range(xs, rows, ranges[0].clone())]
            } else {
                ranges.par_iter().map(|r| self.range(xs, rows, r.clone())).collect()
            };
            // Each range's outputs are output-row-major, `[len, rows]`.
            let mut y = vec![0f32; rows * n];
            for (range, part) in ranges.iter().zip(&out) {
                for (jj, values) in part.chunks_exact(rows).enumerate() {
                    for (r, v) in values.iter().enumerate() {
                        y[r * n + range.start + jj] = *v;
                    }
                }
            }
            y
        }

        /// Output rows `range` → `[len, rows]`. Row `j` is `Σ_c xs[r, c] · s[b(j), c / bc] ·
        /// decode(q[j, c])`: the input rows are scaled once per block row `b` (they change every
        /// `br` output rows), so the inner loop is a plain dot product with the decoded codes.
        /// The codes are decoded through f16 (an E4M3 code `seeeemmm` is the f16
        /// `s0eeeemmm0000000` divided by 2^8, subnormals included), so the scaled inputs carry
        /// the factor 2^8.
        fn range(&self, xs: &[f32], rows: usize, range: std::ops::Range<usize>) -> Vec<f32> {
            let l = self.layout;
            let (k, gc, bc) = (l.d_in, l.grid()[1], l.block[1]);
            let mut out = vec![0f32; range.len() * rows];
            let mut scaled = vec![0f32; rows * k];
            let mut current = usize::MAX;
            #[cfg(target_arch = "x86_64")]
            let avx2 = avx2_fma();
            #[cfg(not(target_arch = "x86_64"))]
            let avx2 = false;
            let table = if avx2 { [0.0; 256] } else { e4m3_table(1.0 / 256.0) };
            for (jj, j) in range.enumerate() {
                let b = l.scale_row(j);
                if b != current {
                    let s = &self.scales[b * gc..][..gc];
                    for (r, row) in scaled.chunks_exact_mut(k).enumerate() {
                        for (c, v) in row.iter_mut().enumerate() {
                            *v = xs[r * k + c] * (s[c / bc] * 256.0);
                        }
                    }
                    current = b;
                }
                let codes = &self.codes[j * self.stride..][..k];
                let out = &mut out[jj * rows..][..rows];
                #[cfg(target_arch = "x86_64")]
                if avx2 {
                    // SAFETY: the CPU has AVX2, FMA and F16C.
                    unsafe { fp8_dots_avx2(codes, &scaled, out) };
                    continue;
                }
                for (r, o) in out.iter_mut().enumerate() {
                    let x = &scaled[r * k..][..k];
                    *o = codes.iter().zip(x).map(|(&q, &x)| table[q as usize] * x).sum();
                }
            }
            out
        }
    }

    /// `out[r] = Σ_c decode(codes[c]) / 2^8 · xs[r, c]` for every row `r` of `xs`, the rows
    /// counted at compile time so their accumulators stay in registers.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn fp8_dots_avx2(codes: &[u8], xs: &[f32], out: &mut [f32]) {
        // One or two rows: four accumulators per row, so the multiply-adds of a row do not wait
        // on each other (an FMA's latency is four cycles); more rows have chains enough.
        match out.len() {
            1 => fp8_dots::<1, 4>(codes, xs, out),
            2 => fp8_dots::<2, 4>(codes, xs, out),
            3 => fp8_dots::<3, 2>(codes, xs, out),
            4 => fp8_dots::<4, 2>(codes, xs, out),
            5 => fp8_dots::<5, 2>(codes, xs, out),
            6 => fp8_dots::<6, 2>(codes, xs, out),
            7 => fp8_dots::<7, 2>(codes, xs, out),
            _ => fp8_dots::<8, 2>(codes, xs, out),
        }
    }

    /// `N` rows, `A` accumulators of eight lanes per row (`A` even): `8·A` codes per step.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn fp8_dots<const N: usize, const A: usize>(codes: &[u8], xs: &[f32], out: &mut [f32]) {
        use std::arch::x86_64::*;
        let k = codes.len();
        assert!(xs.len() >= N * k && out.len() >= N, "xs holds N rows of the codes' width");
        let step = 8 * A;
        let whole = k / step * step;
        let mut acc = [[_mm256_setzero_ps(); A]; N];
        let (low7, sign) = (_mm256_set1_epi16(0x7F), _mm256_set1_epi16(0x80));
        for c in (0..whole).step_by(step) {
            // SAFETY: `c + 8·A <= k` keeps the loads within `codes` and each row of `xs`.
            unsafe {
                let mut w = [_mm256_setzero_ps(); A];
                for g in 0..A / 2 {
                    let q = _mm256_cvtepu8_epi16(_mm_loadu_si128(
                        codes.as_ptr().add(c + 16 * g) as *const __m128i
                    ));
                    let h = _mm256_or_si256(
                        _mm256_slli_epi16(_mm256_and_si256(q, low7), 7),
                        _mm256_slli_epi16(_mm256_and_si256(q, sign), 8),
                    );
                    w[2 * g] = _mm256_cvtph_ps(_mm256_castsi256_si128(h));
                    w[2 * g + 1] = _mm256_cvtph_ps(_mm256_extracti128_si256(h, 1));
                }
                for (r, acc) in acc.iter_mut().enumerate() {
                    let x = xs.as_ptr().add(r * k + c);
                    for a in 0..A {
                        acc[a] = _mm256_fmadd_ps(w[a], _mm256_loadu_ps(x.add(8 * a)), acc[a]);
                    }
                }
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            let mut total = acc[0];
            for v in &acc[1..] {
                total = _mm256_add_ps(total, *v);
            }
            let mut lanes = [0f32; 8];
            // SAFETY: `lanes` holds eight floats.
            unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), total) };
            let mut sum: f32 = lanes.iter().sum();
            for c in whole..k {
                let q = u16::from(codes[c]);
                let h = ((q & 0x7F) << 7) | ((q & 0x80) << 8);
                sum = f16::from_bits(h).to_f32().mul_add(xs[r * k + c], sum);
            }
            out[r] = sum;
        }
    }
}

#[cfg(all(test, feature = "flex"))]
mod tests {
    use burn::backend::Flex;
    use burn::tensor::{DType, Distribution, FloatDType, Tensor};

    fn values<const D: usize>(t: Tensor<Flex, D>) -> Vec<f32> {
        t.into_data().convert::<f32>().into_vec().unwrap()
    }

    /// The largest difference from the plain f64 product, relative to the largest output.
    fn error_against_f64(x: &[f32], w: &[f32], y: &[f32], k: usize, n: usize) -> f64 {
        let rows = x.len() / k;
        let mut worst: f64 = 0.0;
        let mut scale: f64 = 0.0;
        for r in 0..rows {
            for j in 0..n {
                let want: f64 = (0..k).map(|i| x[r * k + i] as f64 * w[i * n + j] as f64).sum();
                // NaN counts as the largest error (`max` would skip it).
                let d = (y[r * n + j] as f64 - want).abs();
                worst = if d.is_nan() { f64::INFINITY } else { worst.max(d) };
                scale = scale.max(want.abs());
            }
        }
        worst / scale
    }

    #[test]
    fn few_row_products_equal_the_plain_product() {
        let device = Default::default();
        // One and several rows; a weight split over threads and one that is not; a width that is
        // not a multiple of the column block or of a SIMD register.
        for (rows, k, n) in [(1, 700, 2500), (3, 700, 2500), (8, 96, 40), (2, 1024, 512)] {
            let x =
                Tensor::<Flex, 3>::random([1, rows, k], Distribution::Normal(0.0, 1.0), &device);
            let w = Tensor::<Flex, 2>::random([k, n], Distribution::Normal(0.0, 1.0), &device);
            let y = super::matmul(&x, &w).expect("f32 on Flex with few rows is taken");
            assert_eq!(y.dims(), [1, rows, n]);
            let plain = x.clone().matmul(w.clone().unsqueeze::<3>());
            let (y, plain) = (values(y), values(plain));
            let (xv, wv) = (values(x), values(w));
            let ours = error_against_f64(&xv, &wv, &y, k, n);
            let gemm = error_against_f64(&xv, &wv, &plain, k, n);
            // f32 accumulation over k terms: both within a few ulps of the exact sum.
            assert!(ours < 1e-5, "rows {rows}, {k} x {n}: {ours:e} (gemm {gemm:e})");
        }
    }

    #[test]
    fn an_experts_view_of_a_stack_is_read_in_place() {
        let device = Default::default();
        let (experts, k, n) = (3, 640, 520);
        let stack =
            Tensor::<Flex, 3>::random([experts, k, n], Distribution::Normal(0.0, 1.0), &device);
        let x = Tensor::<Flex, 2>::random([2, k], Distribution::Normal(0.0, 1.0), &device);
        for e in 0..experts {
            let w = stack.clone().narrow(0, e, 1); // [1, k, n], an offset view
            let y = values(super::matmul(&x, &w).expect("a view of one expert is taken"));
            let w2 = values(w.reshape([k, n]));
            assert!(error_against_f64(&values(x.clone()), &w2, &y, k, n) < 1e-5, "expert {e}");
        }
    }

    #[test]
    fn half_precision_accumulates_in_f32() {
        let device = Default::default();
        // Row by row, and four rows at a time (a width beyond the column block) with rows left
        // over (k = 1023, in two parts) and a width that is not a multiple of a SIMD register.
        for (rows, k, n) in [(2, 1024, 600), (3, 1023, 2061)] {
            half_precision_case(rows, k, n, &device);
        }
    }

    fn half_precision_case(
        rows: usize,
        k: usize,
        n: usize,
        device: &burn::backend::flex::FlexDevice,
    ) {
        let x = Tensor::<Flex, 2>::random([rows, k], Distribution::Normal(0.0, 1.0), device);
        let w = Tensor::<Flex, 2>::random([k, n], Distribution::Normal(0.0, 1.0), device);
        for dtype in [FloatDType::F16, FloatDType::BF16] {
            let (xh, wh) = (x.clone().cast(dtype), w.clone().cast(dtype));
            let y = super::matmul(&xh, &wh).expect("half precision is taken");
            assert_eq!(y.dtype(), DType::from(dtype));
            // Against the exact product of the rounded inputs: only the output's rounding
            // (2^-8 relative for bf16, 2^-11 for f16) remains.
            let err = error_against_f64(&values(xh), &values(wh), &values(y), k, n);
            let bound = if dtype == FloatDType::BF16 { 2f64.powi(-8) } else { 2f64.powi(-11) };
            assert!(err < bound, "{dtype:?}, {rows} × {k} × {n}: {err:e}");
        }
    }

    #[test]
    fn the_routed_experts_of_a_few_tokens_equal_their_plain_twin() {
        use burn::tensor::activation::silu;
        let device = Default::default();
        let (tokens, d, i, n_experts, top_k) = (3, 96, 40, 6, 2);
        let normal = Distribution::Normal(0.0, 1.0);
        let x = Tensor::<Flex, 2>::random([tokens, d], normal, &device);
        let gate_up = Tensor::<Flex, 3>::random([n_experts, d, 2 * i], normal, &device);
        let down = Tensor::<Flex, 3>::random([n_experts, i, d], normal, &device);
        // Tokens 0 and 2 share expert 4; token 1 chooses 0 and 5; experts 1 and 3 idle.
        let experts = [4i64, 2, 0, 5, 4, 0];
        let gates = [0.7f32, 0.3, 0.6, 0.4, 0.9, 0.1];
        let gate_tensor = Tensor::<Flex, 2>::from_data(
            burn::tensor::TensorData::new(gates.to_vec(), [tokens, top_k]),
            &device,
        );
        let y = super::routed_experts(&x, &gate_up, &down, &experts, &gate_tensor).expect("taken");
        // The twin: per token and slot, the SwiGLU expert with plain tensor ops.
        let expert = |t: usize, e: usize| {
            let xt = x.clone().narrow(0, t, 1); // [1, D]
            let gu = gate_up.clone().narrow(0, e, 1).reshape([d, 2 * i]);
            let h = xt.matmul(gu); // [1, 2I]
            let act = silu(h.clone().narrow(1, 0, i)) * h.narrow(1, i, i);
            act.matmul(down.clone().narrow(0, e, 1).reshape([i, d])) // [1, D]
        };
        let rows: Vec<Tensor<Flex, 2>> = (0..tokens)
            .map(|t| {
                (0..top_k)
                    .map(|j| expert(t, experts[t * top_k + j] as usize) * gates[t * top_k + j])
                    .reduce(|a, b| a + b)
                    .unwrap()
            })
            .collect();
        let want = values(Tensor::cat(rows, 0));
        let got = values(y);
        let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        let worst = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, |m, d| {
            if d.is_nan() {
                f32::INFINITY
            } else {
                m.max(d)
            }
        });
        assert!(worst < 1e-5 * scale, "worst {worst} against {scale}");
        // Not taken: an expert index out of range, or more tokens than MAX_ROWS.
        let bad = [4, 2, 0, 6, 4, 0];
        assert!(super::routed_experts(&x, &gate_up, &down, &bad, &gate_tensor).is_none());
    }

    #[test]
    fn a_few_rows_swiglu_equals_its_plain_twin() {
        use burn::tensor::activation::silu;
        let device = Default::default();
        let normal = Distribution::Normal(0.0, 1.0);
        // A hidden width split over threads (700 · 400 > MIN_SPLIT) and one that is not.
        for (d, hidden) in [(700, 400), (64, 48)] {
            let x = Tensor::<Flex, 3>::random([1, 2, d], normal, &device);
            let gate = Tensor::<Flex, 2>::random([d, hidden], normal, &device);
            let up = Tensor::<Flex, 2>::random([d, hidden], normal, &device);
            let down = Tensor::<Flex, 2>::random([hidden, d], normal, &device);
            let y = super::swiglu(&x, &gate, &up, &down).expect("taken");
            assert_eq!(y.dims(), [1, 2, d]);
            let g = silu(x.clone().matmul(gate.unsqueeze::<3>()));
            let want = values((g * x.matmul(up.unsqueeze::<3>())).matmul(down.unsqueeze::<3>()));
            let got = values(y);
            let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
            let worst = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, |m, d| {
                if d.is_nan() {
                    f32::INFINITY
                } else {
                    m.max(d)
                }
            });
            assert!(worst < 1e-5 * scale, "{d} x {hidden}: worst {worst} against {scale}");
        }
    }

    #[test]
    fn what_is_not_taken_falls_back() {
        let device = Default::default();
        let w = Tensor::<Flex, 2>::random([64, 32], Distribution::Default, &device);
        let many = Tensor::<Flex, 2>::random([9, 64], Distribution::Default, &device);
        assert!(super::matmul(&many, &w).is_none(), "more than MAX_ROWS rows");
        let x = Tensor::<Flex, 2>::random([1, 32], Distribution::Default, &device);
        let transposed = w.clone().transpose(); // [32, 64] with column stride 32
        assert!(super::matmul(&x, &transposed).is_none(), "weight rows not contiguous");
        let wrong = Tensor::<Flex, 2>::random([1, 63], Distribution::Default, &device);
        assert!(super::matmul(&wrong, &w).is_none(), "inner sizes differ");
    }
}
