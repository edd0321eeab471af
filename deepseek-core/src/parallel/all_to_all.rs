//! The all-to-all of expert parallelism as a Burn tensor operation: rows `[n, D]` split into
//! consecutive blocks, block `j` to rank `j`, and the blocks received from every rank
//! concatenated in rank order. Under autodiff its backward is the reverse all-to-all of the
//! output gradient (each row's gradient returns to the rank the row came from), so a training
//! step runs one all-to-all per direction per MoE layer forward, and the same in backward.
//!
//! Model code is generic over the backend, so the autodiff node is found through a registry keyed
//! by backend type ([`register_autodiff`], called by `deepseek_core::register_autodiff`).
//! Every rank's backward reaches each all-to-all in the same order because the collectives of a
//! step lie on one dependency chain (layer after layer), and Burn runs backward steps in reverse
//! topological order.

use std::sync::Arc;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::Autodiff;
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{DType, Tensor, TensorData, TensorPrimitive};

use super::error::{ParallelError, Result};
use super::exchange::Exchange;

/// Row counts of one all-to-all: `send[j]` rows go to rank `j`, `recv[j]` come from rank `j`.
#[derive(Clone, Debug)]
pub struct Route {
    /// Rows this rank sends to each rank, in rank order.
    pub send: Vec<usize>,
    /// Rows this rank receives from each rank, in rank order.
    pub recv: Vec<usize>,
    /// The ranks.
    pub exchange: Arc<dyn Exchange>,
}

impl Route {
    /// The route back: what was received is sent.
    pub fn reversed(&self) -> Route {
        Route { send: self.recv.clone(), recv: self.send.clone(), exchange: self.exchange.clone() }
    }
}

/// Moves the rows of `x` `[Σ send, D]` along `route` → `[Σ recv, D]`, differentiably.
pub fn all_to_all<B: Backend>(x: Tensor<B, 2>, route: &Route) -> Result<Tensor<B, 2>> {
    if let Some(op) = registered::<B>() {
        return op(x, route);
    }
    if B::ad_enabled(&x.device()) {
        return Err(ParallelError::Config {
            field: "backend",
            problem: "expert parallelism under this autodiff backend needs deepseek_core::register_autodiff::<Inner>() (gradient checkpointing is not supported)".into(),
        });
    }
    Ok(float(move_rows::<B>(x.into_primitive().tensor(), route)?))
}

static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// How many all-to-alls of rows this process has run (forward and backward): a way to check
/// that a run took the expert-parallel path.
pub fn calls() -> usize {
    CALLS.load(std::sync::atomic::Ordering::Relaxed)
}

/// The data movement on primitives of a non-autodiff backend, through host memory. The result
/// keeps the input's dtype and device.
fn move_rows<B: Backend>(x: FloatTensor<B>, route: &Route) -> Result<FloatTensor<B>> {
    let x: Tensor<B, 2> = float(x);
    let [rows, d] = x.dims();
    let rank = route.exchange.rank();
    let total: usize = route.send.iter().sum();
    if total != rows {
        return Err(ParallelError::Mismatch {
            rank,
            problem: format!("all-to-all of {rows} rows routed as {total}"),
        });
    }
    let (device, dtype) = (x.device(), x.dtype());
    let values: Vec<f32> = x
        .into_data()
        .convert::<f32>()
        .into_vec()
        .map_err(|e| ParallelError::Mismatch { rank, problem: format!("{e:?}") })?;
    let mut send = Vec::with_capacity(route.send.len());
    let mut start = 0;
    for &n in &route.send {
        send.push(values[start * d..(start + n) * d].to_vec());
        start += n;
    }
    let recv_lens: Vec<usize> = route.recv.iter().map(|n| n * d).collect();
    let received = route.exchange.all_to_all(send, &recv_lens)?;
    CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let out_rows: usize = route.recv.iter().sum();
    let out = Tensor::<B, 2>::from_data(TensorData::new(received.concat(), [out_rows, d]), &device); // [Σ recv, D]
    let out = if dtype == DType::F32 { out } else { out.cast(dtype) };
    Ok(out.into_primitive().tensor())
}

fn float<B: Backend, const D: usize>(t: FloatTensor<B>) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(t))
}

type AllToAllFn<B> = fn(Tensor<B, 2>, &Route) -> Result<Tensor<B, 2>>;

static REGISTRY: crate::registry::OpRegistry = crate::registry::OpRegistry::new();

/// Installs the all-to-all autodiff node for `Autodiff<B>`. Idempotent.
pub(crate) fn register_autodiff<B: Backend>() {
    let op: AllToAllFn<Autodiff<B>> = autodiff_all_to_all::<B>;
    REGISTRY.insert::<Autodiff<B>, _>(op);
}

fn registered<B: Backend>() -> Option<AllToAllFn<B>> {
    REGISTRY.get::<B, AllToAllFn<B>>()
}

#[derive(Debug)]
struct AllToAllBackward;

impl<B: Backend> Backward<B, 1> for AllToAllBackward {
    type State = Route;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        // Always exchange, even without a parent to receive the result: the peers wait for it.
        let dx = move_rows::<B>(grad, &ops.state.reversed())
            .unwrap_or_else(|e| panic!("expert-parallel backward: {e}"));
        if let Some(node) = node {
            grads.register::<B>(node.id, dx);
        }
    }
}

fn autodiff_all_to_all<B: Backend>(
    x: Tensor<Autodiff<B>, 2>,
    route: &Route,
) -> Result<Tensor<Autodiff<B>, 2>> {
    let x = x.into_primitive().tensor();
    let out = move_rows::<B>(x.primitive.clone(), route)?;
    let out = match AllToAllBackward
        .prepare::<NoCheckpointing>([x.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish(route.clone(), out),
        OpsKind::UnTracked(prep) => prep.finish(out),
    };
    Ok(float(out))
}
