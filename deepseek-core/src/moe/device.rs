//! The MoE dispatch/combine kernels behind Burn tensors of a generic backend: routed experts on
//! wgpu and CUDA (plain or fused, with or without autodiff) sort, permute and combine on the
//! device, and read back only the `E` per-expert counts (to size each expert's GEMM). Other
//! backends, and autodiff backends nobody registered, keep the host plan of `experts.rs`.
//!
//! Gradients (an autodiff node per operation, installed per backend by [`register_autodiff`]):
//! dispatch's backward is an unweighted combine of the rows' gradients; combine's backward is the
//! output gradient dispatched with the gate weights (for the rows) and the row-wise dot products
//! of the output gradient with the rows (for the gate weights).

use std::any::{Any, TypeId};
use std::sync::Arc;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::Autodiff;
use burn::tensor::backend::Backend;
use burn::tensor::ops::{FloatTensor, IntTensor};
use burn::tensor::{DType, Tensor, TensorMetadata, TensorPrimitive};
use burn_cubecl::{tensor::CubeTensor, CubeBackend, CubeRuntime};
use burn_fusion::{FusionBackend, FusionTensor};

use super::kernels::{self, DeviceDispatch};

/// A device plan of some runtime, type-erased so that autodiff state can hold it.
#[derive(Clone)]
pub(crate) struct Plan {
    device: Arc<dyn Any + Send + Sync>,
    /// Rows per expert, read back once.
    pub counts: Vec<usize>,
}

impl std::fmt::Debug for Plan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plan").field("counts", &self.counts).finish()
    }
}

type Cube<R> = CubeBackend<R, f32, i32, u32>;
type Fused<R> = FusionTensor<<Cube<R> as FusionBackend>::FusionRuntime>;

fn cast<T: 'static, U: 'static>(value: T) -> U {
    let boxed: Box<dyn Any> = Box::new(value);
    *boxed.downcast::<U>().expect("the caller compared TypeIds")
}

/// The device buffer behind primitive `p` if it belongs to runtime `R` (resolving fusion, which
/// flushes what is queued), and whether it was a fusion tensor.
fn to_cube<P: Clone + 'static, R: CubeRuntime>(p: &P, int: bool) -> Option<(CubeTensor<R>, bool)> {
    if TypeId::of::<P>() == TypeId::of::<CubeTensor<R>>() {
        return Some((cast(p.clone()), false));
    }
    if TypeId::of::<P>() == TypeId::of::<Fused<R>>() {
        let fused: Fused<R> = cast(p.clone());
        let client = fused.client.clone();
        let t = if int {
            client.resolve_tensor_int::<Cube<R>>(fused)
        } else {
            client.resolve_tensor_float::<Cube<R>>(fused)
        };
        return Some((t, true));
    }
    None
}

/// Back to the primitive type `P` (registered as a fusion tensor if `fused`).
fn from_cube<P: 'static, R: CubeRuntime>(t: CubeTensor<R>, fused: bool) -> P {
    if !fused {
        return cast(t);
    }
    let out: Fused<R> = crate::fp8::dispatch::register_fused::<Cube<R>>(t);
    cast(out)
}

/// Runs `$body` with `$r` bound to the runtime of this build that `$probe` (a primitive) belongs
/// to, returning its value from the enclosing function.
macro_rules! on_runtime {
    (|$r:ident| $body:expr) => {{
        #[cfg(feature = "wgpu")]
        {
            type $r = burn_wgpu::WgpuRuntime;
            if let Some(out) = $body {
                return Some(out);
            }
        }
        #[cfg(feature = "cuda")]
        {
            type $r = cubecl::cuda::CudaRuntime;
            if let Some(out) = $body {
                return Some(out);
            }
        }
        None
    }};
}

/// Sorts the `[T, K]` choices by expert on the device, if `indices` lives on a CubeCL runtime.
pub(crate) fn plan<B: Backend>(indices: &IntTensor<B>, n_experts: usize) -> Option<Plan> {
    if !matches!(indices.dtype(), DType::I32 | DType::U32) {
        return None;
    }
    fn on<B: Backend, R: CubeRuntime>(indices: &IntTensor<B>, n_experts: usize) -> Option<Plan> {
        let (t, _) = to_cube::<IntTensor<B>, R>(indices, true)?;
        let plan = kernels::plan(t, n_experts);
        let counts: Vec<u32> = crate::fp8::kernels::download(&plan.counts);
        Some(Plan {
            device: Arc::new(plan),
            counts: counts.into_iter().map(|c| c as usize).collect(),
        })
    }
    on_runtime!(|R| on::<B, R>(indices, n_experts))
}

/// Which way rows move: token order → expert order, or back.
#[derive(Clone, Copy)]
enum Direction {
    /// `kernels::dispatch`.
    Dispatch,
    /// `kernels::combine`.
    Combine,
}

/// `kernels::dispatch` or `kernels::combine` on primitives of a non-autodiff backend.
fn move_prim<B: Backend>(
    direction: Direction,
    x: &FloatTensor<B>,
    plan: &Plan,
    weights: Option<&FloatTensor<B>>,
) -> Option<FloatTensor<B>> {
    fn on<B: Backend, R: CubeRuntime>(
        direction: Direction,
        x: &FloatTensor<B>,
        plan: &Plan,
        weights: Option<&FloatTensor<B>>,
    ) -> Option<FloatTensor<B>> {
        let device = plan.device.downcast_ref::<DeviceDispatch<R>>()?;
        let (t, fused) = to_cube::<FloatTensor<B>, R>(x, false)?;
        let w = weights.map(|w| to_cube::<FloatTensor<B>, R>(w, false).expect("same runtime").0);
        let out = match direction {
            Direction::Dispatch => kernels::dispatch(t, device, w),
            Direction::Combine => kernels::combine(t, device, w),
        };
        Some(from_cube(out, fused))
    }
    on_runtime!(|R| on::<B, R>(direction, x, plan, weights))
}

/// `kernels::gate_grad` on primitives of a non-autodiff backend.
fn gate_grad_prim<B: Backend>(
    dy: &FloatTensor<B>,
    rows: &FloatTensor<B>,
    plan: &Plan,
) -> Option<FloatTensor<B>> {
    fn on<B: Backend, R: CubeRuntime>(
        dy: &FloatTensor<B>,
        rows: &FloatTensor<B>,
        plan: &Plan,
    ) -> Option<FloatTensor<B>> {
        let device = plan.device.downcast_ref::<DeviceDispatch<R>>()?;
        let (dy, fused) = to_cube::<FloatTensor<B>, R>(dy, false)?;
        let (rows, _) = to_cube::<FloatTensor<B>, R>(rows, false)?;
        Some(from_cube(kernels::gate_grad(dy, rows, device), fused))
    }
    on_runtime!(|R| on::<B, R>(dy, rows, plan))
}

type DispatchFn<B> = fn(Tensor<B, 2>, &Plan) -> Option<Tensor<B, 2>>;
type CombineFn<B> = fn(Tensor<B, 2>, Tensor<B, 2>, &Plan) -> Option<Tensor<B, 2>>;

static REGISTRY: crate::registry::OpRegistry = crate::registry::OpRegistry::new();

/// Installs the dispatch and combine autodiff nodes for `Autodiff<B>`. Idempotent.
pub fn register_autodiff<B: Backend>() {
    let ops: (DispatchFn<Autodiff<B>>, CombineFn<Autodiff<B>>) =
        (autodiff_dispatch::<B>, autodiff_combine::<B>);
    REGISTRY.insert::<Autodiff<B>, _>(ops);
}

fn registered<B: Backend>() -> Option<(DispatchFn<B>, CombineFn<B>)> {
    REGISTRY.get::<B, (DispatchFn<B>, CombineFn<B>)>()
}

fn float<B: Backend, const D: usize>(t: FloatTensor<B>) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(t))
}

static DEVICE_DISPATCHES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// How many MoE dispatches of this process ran on the device kernels (the rest took the host
/// plan): a way to check which path a backend takes.
pub fn device_dispatches() -> usize {
    DEVICE_DISPATCHES.load(std::sync::atomic::Ordering::Relaxed)
}

/// Dispatch `x` `[T, D]` → `[T·K, D]` grouped by expert, on the device.
pub(crate) fn dispatch<B: Backend>(x: Tensor<B, 2>, plan: &Plan) -> Option<Tensor<B, 2>> {
    let out = match registered::<B>() {
        Some((op, _)) => op(x, plan),
        None => {
            move_prim::<B>(Direction::Dispatch, &x.into_primitive().tensor(), plan, None).map(float)
        }
    };
    if out.is_some() {
        DEVICE_DISPATCHES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    out
}

/// Combine `rows` `[T·K, D]` with gate `weights` `[T, K]` → `[T, D]`, on the device.
pub(crate) fn combine<B: Backend>(
    rows: Tensor<B, 2>,
    weights: Tensor<B, 2>,
    plan: &Plan,
) -> Option<Tensor<B, 2>> {
    if let Some((_, op)) = registered::<B>() {
        return op(rows, weights, plan);
    }
    move_prim::<B>(
        Direction::Combine,
        &rows.into_primitive().tensor(),
        plan,
        Some(&weights.into_primitive().tensor()),
    )
    .map(float)
}

#[derive(Debug)]
struct DispatchBackward;

impl<B: Backend> Backward<B, 1> for DispatchBackward {
    type State = Plan;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        if let Some(node) = node {
            let dx = move_prim::<B>(Direction::Combine, &grad, &ops.state, None)
                .expect("the forward ran on this runtime");
            grads.register::<B>(node.id, dx);
        }
    }
}

fn autodiff_dispatch<B: Backend>(
    x: Tensor<Autodiff<B>, 2>,
    plan: &Plan,
) -> Option<Tensor<Autodiff<B>, 2>> {
    let x = x.into_primitive().tensor();
    let out = move_prim::<B>(Direction::Dispatch, &x.primitive, plan, None)?;
    let out = match DispatchBackward
        .prepare::<NoCheckpointing>([x.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish(plan.clone(), out),
        OpsKind::UnTracked(prep) => prep.finish(out),
    };
    Some(float(out))
}

#[derive(Debug)]
struct CombineBackward;

impl<B: Backend> Backward<B, 2> for CombineBackward {
    /// The dispatched rows, the gate weights, the plan.
    type State = (FloatTensor<B>, FloatTensor<B>, Plan);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_rows, node_weights] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        let (rows, weights, plan) = ops.state;
        if let Some(node) = node_rows {
            let d_rows = move_prim::<B>(Direction::Dispatch, &grad, &plan, Some(&weights))
                .expect("the forward ran on this runtime");
            grads.register::<B>(node.id, d_rows);
        }
        if let Some(node) = node_weights {
            let d_weights =
                gate_grad_prim::<B>(&grad, &rows, &plan).expect("the forward ran on this runtime");
            grads.register::<B>(node.id, d_weights);
        }
    }
}

fn autodiff_combine<B: Backend>(
    rows: Tensor<Autodiff<B>, 2>,
    weights: Tensor<Autodiff<B>, 2>,
    plan: &Plan,
) -> Option<Tensor<Autodiff<B>, 2>> {
    let (rows, weights) = (rows.into_primitive().tensor(), weights.into_primitive().tensor());
    let out = move_prim::<B>(Direction::Combine, &rows.primitive, plan, Some(&weights.primitive))?;
    let out = match CombineBackward
        .prepare::<NoCheckpointing>([rows.node.clone(), weights.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => {
            prep.finish((rows.primitive, weights.primitive, plan.clone()), out)
        }
        OpsKind::UnTracked(prep) => prep.finish(out),
    };
    Some(float(out))
}
