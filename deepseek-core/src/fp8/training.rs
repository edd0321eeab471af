//! FP8 mixed-precision GEMMs for training (DeepSeek-V3 §3.3, Figure 6): the three GEMMs of a
//! linear layer take FP8 operands and accumulate in f32, while master weights, optimizer states
//! and every other operator stay in f32.
//!
//! For `y = x · W` (`x` `[M, K]`, `W` `[K, N]` in Burn's `[in, out]` layout):
//! - forward (Fprop): `y = Q₁ₓ₁₂₈(x) · Q₁₂₈ₓ₁₂₈(W)`;
//! - input gradient (Dgrad): `dx = Q₁ₓ₁₂₈(dy) · Q₁₂₈ₓ₁₂₈(W)ᵀ`;
//! - weight gradient (Wgrad): `dW = Q₁₂₈ₓ₁(x)ᵀ · Q₁₂₈ₓ₁(dy)`, both operands tiled along the token
//!   dimension that this GEMM contracts.
//!
//! `Q_b` is block quantization to E4M3 followed by dequantization ([`fake_quantize`]): the values
//! an FP8 tensor core multiplies, after which an f32 GEMM computes the same block-scaled sums as
//! the FP8 GEMM up to f32 summation order. Tiles always run along the contracted dimension, as
//! the paper's fine-grained scheme requires for the scales to factor out of each block's sum.
//!
//! The quantized backward needs its own autodiff node. Model code is generic over `B: Backend`,
//! so the node is reached through a registry keyed by the backend type: the backend switch
//! ([`crate::device::run_on`]) or the trainer calls [`crate::register_autodiff`] for the inner
//! backend once, and [`matmul`] looks it up. An autodiff backend without the node (nobody
//! registered it, or one with gradient checkpointing, for which there is none) panics naming the
//! call, rather than training with other gradients than it was asked for.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::Autodiff;
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{Tensor, TensorData, TensorPrimitive};

use super::{fake_quantize_blocks, ACTIVATION_BLOCK, WEIGHT_BLOCK};

/// How the GEMMs of linear layers run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GemmPrecision {
    /// The tensors' own precision (f32 in training).
    #[default]
    Full,
    /// FP8 operands with fine-grained scales and f32 accumulation (forward and backward).
    Fp8,
}

/// Block quantization to E4M3 and back: what an FP8 GEMM sees of `x`. On wgpu and CUDA this is
/// the quantization kernel pair; elsewhere the host twin (a read back and an upload).
///
/// # Shapes
/// `x`: `[rows, cols]` → `[rows, cols]`, blocks of `block` (`[1, 128]` tiles along `cols`,
/// `[128, 128]` blocks).
pub fn fake_quantize<B: Backend>(x: Tensor<B, 2>, block: [usize; 2]) -> Tensor<B, 2> {
    if x.shape().num_elements() == 0 {
        return x;
    }
    #[cfg(feature = "kernels")]
    if block[1].is_multiple_of(4) && x.dtype() == burn::tensor::DType::F32 {
        let primitive = x.into_primitive().tensor();
        match super::dispatch::fake_quantize::<B>(&primitive, block) {
            Some(out) => return Tensor::from_primitive(TensorPrimitive::Float(out)),
            None => {
                return fake_quantize_host(
                    Tensor::from_primitive(TensorPrimitive::Float(primitive)),
                    block,
                )
            }
        }
    }
    fake_quantize_host(x, block)
}

/// Whether [`fake_quantize`] runs the CubeCL kernels on `B` (wgpu and CUDA, with or without
/// fusion) rather than the host twin.
pub fn runs_kernels<B: Backend>() -> bool {
    #[cfg(feature = "kernels")]
    return super::dispatch::runs_kernels::<B>();
    #[cfg(not(feature = "kernels"))]
    false
}

fn fake_quantize_host<B: Backend>(x: Tensor<B, 2>, block: [usize; 2]) -> Tensor<B, 2> {
    let [rows, cols] = x.dims();
    let device = x.device();
    let mut values: Vec<f32> =
        x.into_data().convert::<f32>().into_vec().expect("float tensor data");
    fake_quantize_blocks(&mut values, rows, cols, block);
    Tensor::from_data(TensorData::new(values, [rows, cols]), &device)
}

/// `Q₁ₓ₁₂₈(x) · Q₁₂₈ₓ₁₂₈(w)`, the FP8 forward GEMM, with no autodiff node of its own.
fn forward<B: Backend>(x: Tensor<B, 2>, w: Tensor<B, 2>) -> Tensor<B, 2> {
    fake_quantize(x, ACTIVATION_BLOCK).matmul(fake_quantize(w, WEIGHT_BLOCK))
}

/// FP8 GEMM `x · w` for training: FP8 forward and, on an autodiff backend, FP8 input- and
/// weight-gradient GEMMs through the node [`register_autodiff`] installed.
///
/// # Panics
/// On an autodiff backend without that node (see the module docs).
///
/// # Shapes
/// `x`: `[m, k]`, `w`: `[k, n]` → `[m, n]`.
pub fn matmul<B: Backend>(x: Tensor<B, 2>, w: Tensor<B, 2>) -> Tensor<B, 2> {
    if let Some(op) = REGISTRY.get::<B, MatmulFn<B>>() {
        return op(x, w);
    }
    // Installing the operations installs this node, so an autodiff backend reaches this point
    // only without them.
    crate::registry::require_autodiff_ops::<B>(&x.device(), "the FP8 GEMM");
    forward(x, w)
}

type MatmulFn<B> = fn(Tensor<B, 2>, Tensor<B, 2>) -> Tensor<B, 2>;

static REGISTRY: crate::registry::OpRegistry = crate::registry::OpRegistry::new();

/// Installs the FP8 backward (quantized Dgrad and Wgrad) for `Autodiff<B>`. Idempotent.
pub(crate) fn register_autodiff<B: Backend>() {
    let op: MatmulFn<Autodiff<B>> = autodiff_matmul::<B>;
    REGISTRY.insert::<Autodiff<B>, _>(op);
}

/// Whether [`matmul`] on `B` has the FP8 backward node ([`register_autodiff`] was called for it).
pub fn has_autodiff_node<B: Backend>() -> bool {
    REGISTRY.get::<B, MatmulFn<B>>().is_some()
}

#[derive(Debug)]
struct Fp8MatmulBackward;

impl<B: Backend> Backward<B, 2> for Fp8MatmulBackward {
    /// The f32 operands: their quantizations are recomputed in backward (cheap next to the GEMMs,
    /// and the master copies are needed by the optimizer anyway).
    type State = (FloatTensor<B>, FloatTensor<B>);

    fn backward(
        self,
        ops: Ops<Self::State, 2>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let [node_x, node_w] = ops.parents;
        let grad = float::<B>(grads.consume::<B>(&ops.node)); // [m, n]
        let (x, w) = ops.state;
        let (x, w) = (float::<B>(x), float::<B>(w)); // [m, k], [k, n]
        if let Some(node) = node_x {
            // Dgrad contracts n: dy in 1 × 128 tiles along n, W in 128 × 128 blocks.
            let dx = fake_quantize(grad.clone(), ACTIVATION_BLOCK)
                .matmul(fake_quantize(w, WEIGHT_BLOCK).transpose());
            grads.register::<B>(node.id, dx.into_primitive().tensor());
        }
        if let Some(node) = node_w {
            // Wgrad contracts m (tokens): xᵀ and dyᵀ in 1 × 128 tiles along m.
            let xt = fake_quantize(x.transpose(), ACTIVATION_BLOCK); // [k, m]
            let gt = fake_quantize(grad.transpose(), ACTIVATION_BLOCK); // [n, m]
            grads.register::<B>(node.id, xt.matmul(gt.transpose()).into_primitive().tensor());
        }
    }
}

fn float<B: Backend>(t: FloatTensor<B>) -> Tensor<B, 2> {
    Tensor::from_primitive(TensorPrimitive::Float(t))
}

fn autodiff_matmul<B: Backend>(
    x: Tensor<Autodiff<B>, 2>,
    w: Tensor<Autodiff<B>, 2>,
) -> Tensor<Autodiff<B>, 2> {
    let (x, w) = (x.into_primitive().tensor(), w.into_primitive().tensor());
    let out = match Fp8MatmulBackward
        .prepare::<burn::backend::autodiff::checkpoint::strategy::NoCheckpointing>([
            x.node.clone(),
            w.node.clone(),
        ])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => {
            let y = forward(float::<B>(x.primitive.clone()), float::<B>(w.primitive.clone()));
            prep.finish((x.primitive, w.primitive), y.into_primitive().tensor())
        }
        OpsKind::UnTracked(prep) => prep.finish(
            forward(float::<B>(x.primitive), float::<B>(w.primitive)).into_primitive().tensor(),
        ),
    };
    Tensor::from_primitive(TensorPrimitive::Float(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fp8::{dequantize_blocks, quantize_blocks, ScaleFormat};
    use burn::backend::Flex;

    type Ad = Autodiff<Flex>;

    fn data(n: usize, seed: u64) -> Vec<f32> {
        (0..n as u64)
            .map(|i| {
                (((i + seed) * 2_654_435_761 % 10_007) as f32 / 10_007.0 - 0.5)
                    * if i % 53 == 0 { 40.0 } else { 1.0 }
            })
            .collect()
    }

    /// Host twin: `Q_block(a)` of a row-major `[rows, cols]` matrix.
    fn q(a: &[f32], rows: usize, cols: usize, block: [usize; 2]) -> Vec<f32> {
        dequantize_blocks(&quantize_blocks(a, rows, cols, block, ScaleFormat::F32))
    }

    fn transpose(a: &[f32], rows: usize, cols: usize) -> Vec<f32> {
        (0..rows * cols).map(|i| a[(i % rows) * cols + i / rows]).collect()
    }

    /// f64 product of row-major `[m, k]` and `[k, n]`.
    fn mm(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f64> {
        let mut out = vec![0f64; m * n];
        for i in 0..m {
            for t in 0..k {
                for j in 0..n {
                    out[i * n + j] += a[i * k + t] as f64 * b[t * n + j] as f64;
                }
            }
        }
        out
    }

    fn assert_close(got: &[f32], want: &[f64], what: &str) {
        let scale = want.iter().fold(0f64, |m, v| m.max(v.abs()));
        let worst = got.iter().zip(want).map(|(g, w)| (*g as f64 - w).abs()).fold(0f64, f64::max);
        assert!(worst <= 1e-5 * scale, "{what}: max error {worst} against max |value| {scale}");
    }

    #[test]
    fn fp8_gemms_forward_and_backward_match_the_recipe() {
        register_autodiff::<Flex>();
        let (m, k, n) = (37, 300, 130);
        let device = Default::default();
        let (xv, wv, gv) = (data(m * k, 1), data(k * n, 2), data(m * n, 3));
        let x =
            Tensor::<Ad, 2>::from_data(TensorData::new(xv.clone(), [m, k]), &device).require_grad();
        let w =
            Tensor::<Ad, 2>::from_data(TensorData::new(wv.clone(), [k, n]), &device).require_grad();
        let upstream = Tensor::<Ad, 2>::from_data(TensorData::new(gv.clone(), [m, n]), &device);
        let y = matmul(x.clone(), w.clone());
        let grads = (y.clone() * upstream).sum().backward();
        let got = |t: Tensor<Flex, 2>| t.into_data().into_vec::<f32>().unwrap();

        // Fprop: Q1x128(x) · Q128x128(W).
        assert_close(
            &got(y.inner()),
            &mm(&q(&xv, m, k, [1, 128]), &q(&wv, k, n, [128, 128]), m, k, n),
            "forward",
        );
        // Dgrad: Q1x128(dy) · Q128x128(W)ᵀ.
        let wq_t = transpose(&q(&wv, k, n, [128, 128]), k, n);
        assert_close(
            &got(x.grad(&grads).unwrap()),
            &mm(&q(&gv, m, n, [1, 128]), &wq_t, m, n, k),
            "dx",
        );
        // Wgrad: Q128x1(x)ᵀ · Q128x1(dy), i.e. the transposes tiled 1 × 128 along the tokens.
        let xt = q(&transpose(&xv, m, k), k, m, [1, 128]);
        let g = transpose(&q(&transpose(&gv, m, n), n, m, [1, 128]), n, m);
        let dw = got(w.grad(&grads).unwrap());
        assert_close(&dw, &mm(&xt, &g, k, m, n), "dW");
        // And the quantized backward differs from a straight-through one by more than the
        // tolerance: the test tells them apart.
        let straight = mm(&transpose(&q(&xv, m, k, [1, 128]), m, k), &gv, k, m, n);
        let diff =
            dw.iter().zip(&straight).map(|(a, b)| (*a as f64 - b).abs()).fold(0f64, f64::max);
        assert!(diff > 1e-3, "{diff}");
    }
}
