//! The routed experts' GEMM over rows grouped by expert ("segments"): `y_e = x_e · W_e` for the
//! rows `x_e` of each expert `e` and its weights `W_e` in the stacked `[E, in, out]` tensor, as one
//! autodiff node.
//!
//! Written with plain tensor ops, every expert reads a `narrow` of the stacked parameter and of
//! the rows. Burn's autodiff differentiates a `narrow` by building zeros of the *whole* input and
//! writing the slice's gradient into them, so each projection paid, per step, `E` zero tensors
//! of the full expert stack and `E` of all the rows, their copies and their sums (about 9% of a
//! `small` training step in a profile: `float_zeros`, `slice_assign`, memmove). This node's
//! backward computes the same products and writes each gradient once:
//!
//! `dx_e = dy_e · W_eᵀ` (the rows in order), `dW_e = x_eᵀ · dy_e` (zero for an expert without
//! rows). The products are the batched matmuls Burn's own matmul backward runs, so the values
//! are those of the per-expert path ([`segments`] is its plain-tensor twin, tested against it
//! with gradients).

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::Autodiff;
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{Tensor, TensorPrimitive};

use crate::registry::OpRegistry;

/// `x · W_e` for each expert's rows: `rows[j]` consecutive rows for expert `first + j`.
///
/// # Shapes
/// `x`: `[Σ rows, in]`, `w`: `[E, in, out]` → `[Σ rows, out]`.
pub(crate) fn forward_segments<B: Backend>(
    x: Tensor<B, 2>,
    w: Tensor<B, 3>,
    rows: &[usize],
    first: usize,
) -> Tensor<B, 2> {
    match REGISTRY.get::<B, SegmentsFn<B>>() {
        Some(op) => op(x, w, rows, first),
        None => segments(x, w, rows, first),
    }
}

/// The per-expert products with plain tensor ops (any backend; the twin of the autodiff node).
///
/// # Shapes
/// `x`: `[Σ rows, in]`, `w`: `[E, in, out]` → `[Σ rows, out]`.
pub fn segments<B: Backend>(
    x: Tensor<B, 2>,
    w: Tensor<B, 3>,
    rows: &[usize],
    first: usize,
) -> Tensor<B, 2> {
    let [_, _, d_out] = w.dims();
    let mut outputs = Vec::new();
    let mut start = 0;
    for (j, &n) in rows.iter().enumerate() {
        if n == 0 {
            continue;
        }
        // A batched matmul of one reads the expert's view in place (reshaping the view to 2-D
        // would copy it: Flex copies offset views).
        let w_e = w.clone().narrow(0, first + j, 1); // [1, in, out]
        let x_e = x.clone().narrow(0, start, n).unsqueeze::<3>(); // [1, n, in]
        let y = match crate::few_rows::matmul(&x_e, &w_e) {
            Some(y) => y, // a few rows (decoding) on Flex: split over threads
            None => x_e.matmul(w_e),
        };
        outputs.push(y.reshape([n, d_out]));
        start += n;
    }
    if outputs.is_empty() {
        return Tensor::zeros([0, d_out], (&x.device(), x.dtype()));
    }
    Tensor::cat(outputs, 0)
}

/// `dW = [x_eᵀ · dy_e]_e` for the stacked weights of `experts` experts (zeros where an expert has
/// no rows).
///
/// # Shapes
/// `x`: `[Σ rows, in]`, `dy`: `[Σ rows, out]` → `[experts, in, out]`.
fn weight_grad<B: Backend>(
    x: Tensor<B, 2>,
    dy: Tensor<B, 2>,
    rows: &[usize],
    first: usize,
    experts: usize,
) -> Tensor<B, 3> {
    let ([_, d_in], [_, d_out]) = (x.dims(), dy.dims());
    let zeros = || Tensor::<B, 3>::zeros([1, d_in, d_out], (&dy.device(), dy.dtype()));
    let mut parts = Vec::with_capacity(experts);
    let mut start = 0;
    for e in 0..experts {
        let n = e.checked_sub(first).and_then(|j| rows.get(j)).copied().unwrap_or(0);
        if n == 0 {
            parts.push(zeros());
            continue;
        }
        let x_e = x.clone().narrow(0, start, n).unsqueeze::<3>().swap_dims(1, 2); // [1, in, n]
        let dy_e = dy.clone().narrow(0, start, n).unsqueeze::<3>(); // [1, n, out]
        parts.push(x_e.matmul(dy_e)); // [1, in, out]
        start += n;
    }
    Tensor::cat(parts, 0)
}

type SegmentsFn<B> = fn(Tensor<B, 2>, Tensor<B, 3>, &[usize], usize) -> Tensor<B, 2>;

static REGISTRY: OpRegistry = OpRegistry::new();

/// Installs the node for `Autodiff<B>`. Idempotent.
pub(crate) fn register_autodiff<B: Backend>() {
    let op: SegmentsFn<Autodiff<B>> = autodiff_segments::<B>;
    REGISTRY.insert::<Autodiff<B>, _>(op);
}

fn float<B: Backend, const D: usize>(t: FloatTensor<B>) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(t))
}

#[derive(Debug)]
struct SegmentsBackward;

impl<B: Backend> Backward<B, 2> for SegmentsBackward {
    /// The rows, the stacked weights, the rows per expert and the first expert.
    type State = (FloatTensor<B>, FloatTensor<B>, Vec<usize>, usize);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x, node_w] = ops.parents;
        let dy = float::<B, 2>(grads.consume::<B>(&ops.node));
        let (x, w, rows, first) = ops.state;
        let w = float::<B, 3>(w);
        if let Some(node) = node_w {
            let [experts, _, _] = w.dims();
            let dw = weight_grad(float::<B, 2>(x), dy.clone(), &rows, first, experts);
            grads.register::<B>(node.id, dw.into_primitive().tensor());
        }
        if let Some(node) = node_x {
            let dx = segments(dy, w.swap_dims(1, 2), &rows, first); // [Σ rows, in]
            grads.register::<B>(node.id, dx.into_primitive().tensor());
        }
    }
}

fn autodiff_segments<B: Backend>(
    x: Tensor<Autodiff<B>, 2>,
    w: Tensor<Autodiff<B>, 3>,
    rows: &[usize],
    first: usize,
) -> Tensor<Autodiff<B>, 2> {
    let (x, w) = (x.into_primitive().tensor(), w.into_primitive().tensor());
    let out = segments::<B>(float(x.primitive.clone()), float(w.primitive.clone()), rows, first)
        .into_primitive()
        .tensor();
    let out = match SegmentsBackward
        .prepare::<NoCheckpointing>([x.node.clone(), w.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => {
            prep.finish((x.primitive, w.primitive, rows.to_vec(), first), out)
        }
        OpsKind::UnTracked(prep) => prep.finish(out),
    };
    float(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;
    use burn::tensor::Distribution;

    type AB = Autodiff<Flex>;

    fn values<const D: usize>(t: Tensor<Flex, D>) -> Vec<f32> {
        t.into_data().convert::<f32>().into_vec().unwrap()
    }

    #[test]
    fn the_node_equals_its_plain_twin_with_gradients() {
        register_autodiff::<Flex>();
        let device = Default::default();
        // Experts 1..=4 of 6 hold rows (expert 2 none), as an expert-parallel rank's share would.
        let (rows, first, experts, d_in, d_out) = ([2usize, 0, 3, 1], 1, 6, 5, 7);
        let n: usize = rows.iter().sum();
        let x = Tensor::<Flex, 2>::random([n, d_in], Distribution::Normal(0.0, 1.0), &device);
        let w = Tensor::<Flex, 3>::random(
            [experts, d_in, d_out],
            Distribution::Normal(0.0, 1.0),
            &device,
        );
        let dy = Tensor::<Flex, 2>::random([n, d_out], Distribution::Normal(0.0, 1.0), &device);
        let run = |node: bool| {
            let x = Tensor::<AB, 2>::from_inner(x.clone()).require_grad();
            let w = Tensor::<AB, 3>::from_inner(w.clone()).require_grad();
            let y = match node {
                true => forward_segments(x.clone(), w.clone(), &rows, first),
                false => segments(x.clone(), w.clone(), &rows, first),
            };
            let grads = (y.clone() * Tensor::from_inner(dy.clone())).sum().backward();
            (values(y.inner()), values(x.grad(&grads).unwrap()), values(w.grad(&grads).unwrap()))
        };
        let (plain, node) = (run(false), run(true));
        assert_eq!(node.0, plain.0, "outputs");
        assert_eq!(node.1, plain.1, "row gradients");
        assert_eq!(node.2, plain.2, "weight gradients");
        // Not vacuous: experts 0, 2 and 5 have no rows and zero gradient, the others do.
        let per_expert = d_in * d_out;
        let moved =
            |e: usize| node.2[e * per_expert..(e + 1) * per_expert].iter().any(|&v| v != 0.0);
        assert_eq!(
            (0..experts).map(moved).collect::<Vec<_>>(),
            [false, true, false, true, true, false]
        );
        // And the rows are each expert's own product.
        let w3 = values(w.clone().narrow(0, 3, 1).reshape([d_in, d_out]));
        let x_row = values(x.clone().narrow(0, 2, 1));
        let want: f32 = (0..d_in).map(|k| x_row[k] * w3[k * d_out]).sum();
        assert!((node.0[2 * d_out] - want).abs() < 1e-5, "{} vs {want}", node.0[2 * d_out]);
    }
}
