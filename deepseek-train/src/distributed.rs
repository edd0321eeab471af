//! Data and expert parallelism for training (DeepSeek-V3 §3.2, scaled down): `R` ranks, each a
//! thread with its own model replica, optimizer and device (round-robin on the device list, so
//! several ranks may share one; Flex has a single device). Ranks form `R/E` data-parallel
//! replicas of `E` expert-parallel ranks: within a replica every MoE layer sends each expert's
//! rows to the rank that owns it ([`deepseek_core::parallel`]).
//!
//! Every step:
//! - each rank takes its `batch_size / R` sequences of the global batch (the global batch is the
//!   same whatever `R` is, so runs are comparable) and scales its loss by `1/R`;
//! - after backward, one all-reduce (sum) through `burn-collective` carries every gradient, the
//!   loss sums and the per-expert token counts of all ranks. Every rank then holds the gradient
//!   of the global batch and the global expert loads, applies the same AdamW step and the same
//!   bias update, and so stays identical to the others;
//! - rank 0 alone writes metrics, evaluates and checkpoints.
//!
//! Parameters are replicated on every rank: expert parallelism here divides the expert compute,
//! not the weight memory. A rank's gradient of an expert it does not own is zero, so the
//! all-reduce also sums each expert's gradient over the data-parallel replicas that own it.
//!
//! The optimizer state is replicated too, unless `--zero1` shards it (ZeRO stage 1, Rajbhandari
//! et al. 2020): the trainable parameters, in visiting order, are cut into `R` contiguous runs
//! of about equal size ([`zero1_owned`]); each rank keeps the AdamW moments of its run only and
//! updates only those parameters, and an all-gather (an all-reduce in which the other ranks
//! add zeros, so exact) hands every rank the updated weights ([`gather_params`]). Checkpoints
//! gather the moments onto rank 0 one parameter at a time and hold the whole state, so any rank
//! count, sharded or not, resumes from them.
//!
//! Several processes (nodes, one rank each, as torchrun starts one process per GPU) meet at a
//! rendezvous and share one exchange (a TCP mesh, or NCCL between CUDA GPUs): the gradient
//! all-reduce runs over all of it, and each expert-parallel group is a [`GroupView`] of it. See
//! `docs/distributed.md`. (`burn-collective`'s global orchestrator was the first choice for the
//! processes' all-reduce; with 0.21 its second all-reduce between two processes never completed,
//! with the ring and the centralized strategies alike.)

use std::sync::{Arc, Mutex};
use std::time::Duration;

use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Tensor, TensorData, TensorPrimitive};
use burn_collective::{CollectiveConfig, PeerId, ReduceOperation};
use deepseek_core::checkpoint::NamedTensor;
use deepseek_core::parallel::{
    Exchange, ExpertParallel, GroupView, LocalExchange, RendezvousConfig, TcpExchange,
};
use deepseek_core::{DeepSeekConfig, DeepSeekModel};

use crate::error::{Result, TrainError};
use crate::optim::AdamW;

/// How the ranks of a run are laid out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// Ranks in this process.
    pub ranks: usize,
    /// Expert-parallel group size `E` (divides `ranks` and the routed experts).
    pub expert_parallel: usize,
    /// A peer that does not answer within this time is an error.
    pub timeout: Duration,
    /// Several processes: this process's place among them.
    pub nodes: Option<Nodes>,
    /// Pipeline stages (`None`: every rank runs the whole model).
    pub pipeline: Option<crate::pipeline::schedule::PipelineLayout>,
    /// Shard the optimizer state over the ranks (ZeRO-1).
    pub zero1: bool,
    /// Values per bucket of the gradient all-reduce ([`GRADIENT_BUCKET`] by default).
    pub gradient_bucket: usize,
}

/// Several processes, one rank each.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nodes {
    /// This process, `0..count`.
    pub node: usize,
    pub count: usize,
    /// `host:port` of node 0's rendezvous.
    pub master: String,
    /// How the processes exchange data.
    pub transport: Transport,
}

/// The exchange between processes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// A TCP mesh (any backend).
    Tcp,
    /// NCCL between CUDA GPUs (feature `cuda`); the GPU is the rank's `--device` index.
    Nccl,
}

impl std::str::FromStr for Transport {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "tcp" => Ok(Self::Tcp),
            "nccl" => Ok(Self::Nccl),
            other => Err(format!("unknown transport `{other}`: choose tcp or nccl")),
        }
    }
}

impl Default for Layout {
    fn default() -> Self {
        Self {
            ranks: 1,
            expert_parallel: 1,
            timeout: Duration::from_secs(600),
            nodes: None,
            pipeline: None,
            zero1: false,
            gradient_bucket: GRADIENT_BUCKET,
        }
    }
}

impl Layout {
    /// Ranks over all processes.
    pub fn world(&self) -> usize {
        self.ranks * self.nodes.as_ref().map_or(1, |n| n.count)
    }

    /// Data-parallel replicas.
    pub fn data_parallel(&self) -> usize {
        self.world() / self.expert_parallel / self.pipeline_stages()
    }

    /// Pipeline stages (1 without pipeline parallelism).
    pub fn pipeline_stages(&self) -> usize {
        self.pipeline.as_ref().map_or(1, |p| p.stages)
    }

    /// Ranks that share each step's global batch (all but the pipeline dimension).
    pub fn batch_ranks(&self) -> usize {
        self.world() / self.pipeline_stages()
    }

    /// Whether this is more than one rank.
    pub fn is_parallel(&self) -> bool {
        self.world() > 1
    }

    /// Checks the layout against the model and the batch.
    pub fn validate(&self, model: &DeepSeekConfig, batch_size: usize) -> Result<()> {
        if self.ranks == 0 {
            return Err(TrainError::config("ranks", "must be at least 1"));
        }
        if self.zero1 && self.world() == 1 {
            return Err(TrainError::config(
                "zero1",
                "--zero1 shards the optimizer state over data-parallel ranks: it needs --ranks 2 or more",
            ));
        }
        if self.zero1 && self.pipeline.is_some() {
            return Err(TrainError::config(
                "zero1",
                "--zero1 under pipeline parallelism is not supported yet",
            ));
        }
        let stages = self.pipeline_stages();
        if stages == 0 || !self.world().is_multiple_of(stages) {
            return Err(TrainError::config(
                "pipeline_parallel",
                format!("{stages} pipeline stages must divide the {} ranks", self.world()),
            ));
        }
        if self.expert_parallel == 0 || !self.batch_ranks().is_multiple_of(self.expert_parallel) {
            let per = if stages > 1 { " of each pipeline stage" } else { "" };
            return Err(TrainError::config(
                "expert_parallel",
                format!(
                    "an expert-parallel group of {} ranks must divide the {} ranks{per}",
                    self.expert_parallel,
                    self.batch_ranks()
                ),
            ));
        }
        if self.expert_parallel > 1
            && (model.n_routed_experts == 0
                || !model.n_routed_experts.is_multiple_of(self.expert_parallel))
        {
            return Err(TrainError::config(
                "expert_parallel",
                format!("{} routed experts cannot be split over {} expert-parallel ranks: choose a size that divides {}", model.n_routed_experts, self.expert_parallel, model.n_routed_experts),
            ));
        }
        if !batch_size.is_multiple_of(self.batch_ranks()) {
            return Err(TrainError::config(
                "batch_size",
                format!(
                    "the global batch of {batch_size} sequences must split evenly over {} ranks",
                    self.batch_ranks()
                ),
            ));
        }
        if let Some(n) = &self.nodes {
            if n.count == 0 || n.node >= n.count {
                return Err(TrainError::config(
                    "node_rank",
                    format!("node {} is outside {} nodes", n.node, n.count),
                ));
            }
            if stages > 1 {
                return Err(TrainError::config("pipeline_parallel", "pipeline stages run as the threads of one process: drop --nodes, or --pipeline-parallel"));
            }
            if self.ranks != 1 {
                return Err(TrainError::config("ranks", "a multi-process run has one rank per process (--ranks 1): start one process per device"));
            }
        }
        Ok(())
    }
}

/// One rank's place in the run, held by its [`crate::Trainer`].
#[derive(Debug, Clone)]
pub struct RankContext {
    /// This rank over all processes, `0..world`.
    pub rank: usize,
    pub world: usize,
    /// How its gradients meet the others'.
    pub reducer: Reducer,
    /// The optimizer state is sharded over the ranks (ZeRO-1).
    pub zero1: bool,
    /// Values per bucket of the gradient all-reduce.
    pub gradient_bucket: usize,
}

/// The all-reduce of a rank's gradients.
#[derive(Debug, Clone)]
pub enum Reducer {
    /// `burn-collective` between the threads of this process (tensors stay on their devices).
    /// `burn-collective` waits without a deadline, so every all-reduce is preceded by a one-value
    /// round on `barrier`, which fails fast when a rank has ended and times out when one is stuck:
    /// the others then stop with an error instead of waiting forever.
    Collective { peer: PeerId, barrier: Arc<dyn Exchange> },
    /// The exchange between processes (through host memory).
    Exchange(Arc<dyn Exchange>),
}

impl RankContext {
    /// Whether this rank writes metrics, evaluates and checkpoints.
    pub fn is_primary(&self) -> bool {
        self.rank == 0
    }
}

/// One exchange between all ranks of this process, for the barrier of [`Reducer::Collective`].
pub fn barriers(layout: &Layout) -> Vec<Arc<dyn Exchange>> {
    LocalExchange::group(layout.ranks, layout.timeout)
        .into_iter()
        .map(|e| Arc::new(e) as Arc<dyn Exchange>)
        .collect()
}

/// The expert-parallel exchanges of this process's ranks: rank `r` joins group `r / E`.
pub fn expert_exchanges(layout: &Layout) -> Vec<Option<Arc<dyn Exchange>>> {
    if layout.expert_parallel <= 1 {
        return vec![None; layout.ranks];
    }
    (0..layout.ranks / layout.expert_parallel)
        .flat_map(|_| LocalExchange::group(layout.expert_parallel, layout.timeout))
        .map(|e| Some(Arc::new(e) as Arc<dyn Exchange>))
        .collect()
}

/// Puts a model replica under expert parallelism.
pub fn with_experts<B: Backend>(
    model: DeepSeekModel<B>,
    exchange: Option<Arc<dyn Exchange>>,
) -> Result<DeepSeekModel<B>> {
    let Some(exchange) = exchange else { return Ok(model) };
    let policy = expert_policy(model.policy().clone(), exchange, model.config.n_routed_experts)?;
    Ok(model.with_policy(policy)?)
}

/// `policy` with the routed experts spread over the ranks of `exchange`.
pub fn expert_policy(
    policy: deepseek_core::policy::ExecutionPolicy,
    exchange: Arc<dyn Exchange>,
    experts: usize,
) -> Result<deepseek_core::policy::ExecutionPolicy> {
    let parallel = ExpertParallel::new(exchange, experts)
        .map_err(|e| TrainError::config("expert_parallel", e.to_string()))?;
    Ok(policy.with_expert_parallel(Some(parallel)))
}

/// `burn-collective` keeps one local server per backend type: runs in one process take turns.
static COLLECTIVE: Mutex<()> = Mutex::new(());

/// Holds the process's collective for the duration of a parallel run.
pub fn collective_lock() -> std::sync::MutexGuard<'static, ()> {
    COLLECTIVE.lock().unwrap_or_else(|p| p.into_inner())
}

/// The `burn-collective` configuration of this process's ranks.
pub fn collective_config(layout: &Layout) -> CollectiveConfig {
    CollectiveConfig::default().with_num_devices(layout.ranks)
}

/// The exchange of a multi-process run: meets the other processes at the rendezvous, then
/// connects the mesh (TCP) or the communicator (NCCL, on GPU `ordinal`).
pub fn connect(nodes: &Nodes, timeout: Duration, ordinal: usize) -> Result<Arc<dyn Exchange>> {
    let config = RendezvousConfig {
        rank: nodes.node,
        world: nodes.count,
        master: nodes.master.clone(),
        timeout,
    };
    let failed = |e: deepseek_core::parallel::ParallelError| TrainError::Rank {
        rank: nodes.node,
        problem: e.to_string(),
    };
    match nodes.transport {
        Transport::Tcp => {
            Ok(Arc::new(TcpExchange::connect(config.join(&[]).map_err(failed)?).map_err(failed)?))
        }
        #[cfg(feature = "cuda")]
        Transport::Nccl => Ok(Arc::new(
            deepseek_core::parallel::NcclExchange::connect(&config, ordinal).map_err(failed)?,
        )),
        #[cfg(not(feature = "cuda"))]
        Transport::Nccl => {
            let _ = ordinal;
            Err(TrainError::config("transport", "NCCL needs a build with `--features cuda`"))
        }
    }
}

/// The expert-parallel group of this rank within the processes' exchange: ranks
/// `⌊rank/E⌋·E .. +E`.
pub fn expert_group(
    world: &Arc<dyn Exchange>,
    expert_parallel: usize,
) -> Result<Option<Arc<dyn Exchange>>> {
    if expert_parallel <= 1 {
        return Ok(None);
    }
    let start = world.rank() / expert_parallel * expert_parallel;
    let view = GroupView::new(world.clone(), start..start + expert_parallel)
        .map_err(|e| TrainError::config("expert_parallel", e.to_string()))?;
    Ok(Some(Arc::new(view)))
}

/// Registers a rank with the collective.
pub fn register<B: Backend>(
    peer: PeerId,
    device: &B::Device,
    config: CollectiveConfig,
) -> Result<()> {
    burn_collective::register::<B>(peer, device.clone(), config)
        .map_err(|e| TrainError::config("collective", format!("registering rank {peer}: {e:?}")))
}

/// Leaves the collective.
pub fn finish<B: Backend>(peer: PeerId) {
    let _ = burn_collective::finish_collective::<B>(peer);
}

/// Values per gradient all-reduce ([`all_reduce`] sums the gradients in buckets of about this
/// many; the memory planner counts them).
pub const GRADIENT_BUCKET: usize = deepseek_core::memory::GRADIENT_BUCKET;

/// Sums `grads` (every trainable parameter of `model`, zeros where this rank has none) and
/// `stats` over all ranks in one all-reduce, and returns both. Every rank gets the same result.
///
/// # Shapes
/// `stats`: `[n]` → `[n]`.
pub fn all_reduce<AB: AutodiffBackend>(
    model: &DeepSeekModel<AB>,
    grads: GradientsParams,
    stats: Tensor<AB::InnerBackend, 1>,
    ctx: &RankContext,
) -> Result<(GradientsParams, Tensor<AB::InnerBackend, 1>)> {
    struct Flatten<'a, B: Backend> {
        grads: &'a mut GradientsParams,
        parts: Vec<Tensor<B, 1>>,
        layout: Vec<(burn::module::ParamId, Vec<usize>)>,
        device: B::Device,
    }
    impl<AB: AutodiffBackend> ModuleVisitor<AB> for Flatten<'_, AB::InnerBackend> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<AB, D>>) {
            if !param.is_require_grad() {
                return;
            }
            let shape = param.shape().dims::<D>().to_vec();
            let n: usize = shape.iter().product();
            let flat = match self.grads.remove::<AB::InnerBackend, D>(param.id) {
                Some(g) => g.reshape([n]),
                None => Tensor::zeros([n], &self.device),
            };
            self.parts.push(flat);
            self.layout.push((param.id, shape));
        }
    }
    let device = model.embed_tokens.weight.val().inner().device();
    let mut grads = grads;
    let mut flatten = Flatten::<AB::InnerBackend> {
        grads: &mut grads,
        parts: Vec::new(),
        layout: Vec::new(),
        device: device.clone(),
    };
    model.visit(&mut flatten);
    let [n_stats] = stats.dims();
    // Buckets of about `ctx.gradient_bucket` values, as PyTorch's DDP all-reduces (the statistics
    // ride in the last): beyond the gradients themselves a rank holds one bucket's flat copy and
    // its reduced copy, not two copies of every gradient.
    let mut out = GradientsParams::new();
    let mut members = flatten.parts.into_iter().zip(flatten.layout).peekable();
    loop {
        let (mut bucket, mut shapes, mut size) = (Vec::new(), Vec::new(), 0);
        while let Some((part, (id, shape))) = members.next_if(|_| size < ctx.gradient_bucket) {
            size += part.dims()[0];
            bucket.push(part);
            shapes.push((id, shape));
        }
        let last = members.peek().is_none();
        if last {
            bucket.push(stats.clone());
        }
        let reduced = reduce_sum(Tensor::cat(bucket, 0), ctx, "gradient")?; // [size (+ stats)]
        let mut start = 0;
        for (id, shape) in shapes {
            let n: usize = shape.iter().product();
            let part = reduced.clone().narrow(0, start, n);
            register_grad::<AB::InnerBackend>(&mut out, id, part, &shape);
            start += n;
        }
        if last {
            return Ok((out, reduced.narrow(0, start, n_stats)));
        }
    }
}

/// Sums `flat` over all ranks (every rank gets the sum); `what` names the exchange in errors.
///
/// # Shapes
/// `flat`: `[n]` → `[n]`.
pub fn reduce_sum<B: Backend>(
    flat: Tensor<B, 1>,
    ctx: &RankContext,
    what: &str,
) -> Result<Tensor<B, 1>> {
    match &ctx.reducer {
        Reducer::Collective { peer, barrier } => {
            barrier.all_reduce_sum(&mut [0.0]).map_err(|e| TrainError::Rank {
                rank: ctx.rank,
                problem: format!("before the {what} all-reduce: {e}"),
            })?;
            let reduced = burn_collective::all_reduce::<B>(
                *peer,
                flat.into_primitive().tensor(),
                ReduceOperation::Sum,
            )
            .map_err(|e| TrainError::Rank {
                rank: ctx.rank,
                problem: format!("{what} all-reduce failed: {e:?}"),
            })?;
            Ok(Tensor::from_primitive(TensorPrimitive::Float(reduced)))
        }
        Reducer::Exchange(exchange) => {
            let (n, device) = (flat.dims()[0], flat.device());
            let mut values: Vec<f64> =
                flat.into_data().convert::<f64>().into_vec().expect("f64 values");
            exchange.all_reduce_sum(&mut values).map_err(|e| TrainError::Rank {
                rank: ctx.rank,
                problem: format!("{what} all-reduce failed: {e}"),
            })?;
            Ok(Tensor::from_data(
                TensorData::new(values.into_iter().map(|v| v as f32).collect::<Vec<f32>>(), [n]),
                &device,
            ))
        }
    }
}

/// ZeRO-1's split: for every float parameter of `model` in visiting order (the optimizer's
/// order), whether rank `rank` of `world` owns it. The trainable parameters are cut into
/// `world` contiguous runs of about equal element count: a parameter belongs to the rank whose
/// share holds its middle element. Frozen parameters belong to no one.
pub fn zero1_owned<B: Backend, M: Module<B>>(model: &M, rank: usize, world: usize) -> Vec<bool> {
    struct Sizes(Vec<usize>);
    impl<B: Backend> ModuleVisitor<B> for Sizes {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            let n = if param.is_require_grad() { param.shape().num_elements() } else { 0 };
            self.0.push(n);
        }
    }
    let mut sizes = Sizes(Vec::new());
    model.visit(&mut sizes);
    let total: usize = sizes.0.iter().sum();
    let mut start = 0;
    sizes
        .0
        .iter()
        .map(|&n| {
            let middle = start + n / 2;
            start += n;
            n > 0 && (middle * world / total.max(1)).min(world - 1) == rank
        })
        .collect()
}

/// ZeRO-1's all-gather: every rank's copy of `model` gets, for each trainable parameter, the
/// value of the rank that updated it (`owned`, from [`zero1_owned`]). An all-reduce per
/// parameter in which the other ranks contribute zeros (`x + 0 = x`, so the values arrive
/// exactly); one parameter at a time, so the old and new copies never coexist beyond it.
pub fn gather_params<AB: AutodiffBackend>(
    model: DeepSeekModel<AB>,
    owned: &[bool],
    ctx: &RankContext,
) -> Result<DeepSeekModel<AB>> {
    struct Gather<'a> {
        owned: &'a [bool],
        ctx: &'a RankContext,
        index: usize,
        failed: Option<TrainError>,
    }
    impl<AB: AutodiffBackend> burn::module::ModuleMapper<AB> for Gather<'_> {
        fn map_float<const D: usize>(
            &mut self,
            param: Param<Tensor<AB, D>>,
        ) -> Param<Tensor<AB, D>> {
            let index = self.index;
            self.index += 1;
            if !param.is_require_grad() || self.failed.is_some() {
                return param;
            }
            let (id, tensor, mapper) = param.consume();
            let shape = tensor.shape();
            let n = shape.num_elements();
            let value = tensor.inner().reshape([n]);
            let mine = if self.owned[index] { value.clone() } else { value.zeros_like() };
            let value = match reduce_sum(mine, self.ctx, "ZeRO-1 parameter") {
                Ok(reduced) => reduced,
                Err(e) => {
                    self.failed = Some(e);
                    value
                }
            };
            Param::from_mapped_value(
                id,
                Tensor::from_inner(value.reshape(shape)).require_grad(),
                mapper,
            )
        }
    }
    let mut gather = Gather { owned, ctx, index: 0, failed: None };
    let model = model.map(&mut gather);
    match gather.failed {
        Some(e) => Err(e),
        None => Ok(model),
    }
}

/// ZeRO-1 at a checkpoint: the whole optimizer state of the sharded `optim`s, on rank 0 (every
/// rank calls this; the others get `None`). One all-reduce per trainable parameter, so no rank
/// ever holds more than one parameter's moments beyond its own share (rank 0 keeps the whole
/// state it returns).
pub fn gather_optimizer<AB: AutodiffBackend>(
    model: &DeepSeekModel<AB>,
    optim: &AdamW<AB::InnerBackend>,
    ctx: &RankContext,
) -> Result<Option<AdamW<AB::InnerBackend>>> {
    /// Per parameter: trainable, elements, held in half precision (so with master weights).
    struct Trainable(Vec<(bool, usize, bool)>);
    impl<B: Backend> ModuleVisitor<B> for Trainable {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            let half = param.val().dtype() != burn::tensor::DType::F32;
            self.0.push((param.is_require_grad(), param.shape().num_elements(), half));
        }
    }
    let mut params = Trainable(Vec::new());
    model.visit(&mut params);
    let device = model.embed_tokens.weight.val().inner().device();
    let mut tensors = Vec::new();
    for (index, &(trainable, n, half)) in params.0.iter().enumerate() {
        if !trainable {
            continue;
        }
        // [present, has master, m (n), v (n), and for half-precision parameters the f32 master
        // weights (n)]: only the owner adds anything.
        let parts = 2 + usize::from(half);
        let part = match optim.moments(index) {
            Some((m, v)) => {
                let master = optim.master(index).filter(|_| half);
                let flags =
                    Tensor::from_floats([1.0, f32::from(u8::from(master.is_some()))], &device);
                let mut pieces = vec![flags, m, v];
                if half {
                    pieces.push(master.unwrap_or_else(|| Tensor::zeros([n], &device)));
                }
                Tensor::cat(pieces, 0)
            }
            None => Tensor::zeros([2 + parts * n], &device),
        };
        let reduced = reduce_sum(part, ctx, "ZeRO-1 optimizer-state")?;
        if !ctx.is_primary() {
            continue;
        }
        let values: Vec<f32> = reduced.into_data().convert::<f32>().into_vec().expect("f32");
        if values[0] > 0.5 {
            let kept = if values[1] > 0.5 { parts } else { 2 };
            for (k, kind) in ["m", "v", "w"].into_iter().take(kept).enumerate() {
                tensors.push(NamedTensor {
                    name: format!("{kind}.{index}"),
                    shape: vec![n],
                    values: values[2 + k * n..2 + (k + 1) * n].to_vec(),
                });
            }
        }
    }
    if !ctx.is_primary() {
        return Ok(None);
    }
    let sizes: Vec<usize> = params.0.iter().map(|&(_, n, _)| n).collect();
    let mut full = AdamW::new(optim.config);
    full.load_state(optim.step, tensors, &sizes, &device)?;
    Ok(Some(full))
}

/// Registers a flat gradient under `id` with its parameter's rank.
fn register_grad<B: Backend>(
    grads: &mut GradientsParams,
    id: burn::module::ParamId,
    flat: Tensor<B, 1>,
    shape: &[usize],
) {
    match shape.len() {
        1 => grads.register::<B, 1>(id, flat.reshape([shape[0]])),
        2 => grads.register::<B, 2>(id, flat.reshape([shape[0], shape[1]])),
        3 => grads.register::<B, 3>(id, flat.reshape([shape[0], shape[1], shape[2]])),
        4 => grads.register::<B, 4>(id, flat.reshape([shape[0], shape[1], shape[2], shape[3]])),
        r => panic!("parameters of rank {r} are not used by this model"),
    }
}

/// A copy of `model` for another rank on `device`. `fork` detaches every parameter into a fresh
/// autodiff leaf, so each rank has its own graph: ranks sharing parameter nodes would share one
/// graph lock, and one rank's backward would block the others' while it waits in an all-to-all.
pub fn replica<AB: AutodiffBackend>(
    model: &DeepSeekModel<AB>,
    device: &AB::Device,
) -> DeepSeekModel<AB> {
    burn::module::Module::fork(model.clone(), device)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::{Autodiff, Flex};

    #[test]
    fn zero1_splits_the_trainable_parameters_into_balanced_disjoint_runs() {
        let model = DeepSeekConfig::tiny().init::<Autodiff<Flex>>(&Default::default());
        struct Trainable(Vec<bool>);
        impl ModuleVisitor<Autodiff<Flex>> for Trainable {
            fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<Autodiff<Flex>, D>>) {
                self.0.push(p.is_require_grad());
            }
        }
        let mut trainable = Trainable(Vec::new());
        model.visit(&mut trainable);
        let trainable = trainable.0;
        // The balancing biases are not trained.
        assert!(trainable.iter().any(|&t| !t));
        let sizes: Vec<usize> = crate::optim::param_sizes(&model)
            .iter()
            .zip(&trainable)
            .map(|(&n, &t)| if t { n } else { 0 })
            .collect();
        let total: usize = sizes.iter().sum();
        let largest = *sizes.iter().max().unwrap();
        for world in [2, 3, 4] {
            let owned: Vec<Vec<bool>> = (0..world).map(|r| zero1_owned(&model, r, world)).collect();
            for i in 0..sizes.len() {
                let owners = owned.iter().filter(|o| o[i]).count();
                let want = trainable[i] as usize;
                assert_eq!(owners, want, "parameter {i} has {owners} owners ({world} ranks)");
            }
            for (rank, o) in owned.iter().enumerate() {
                // Contiguous, and within one parameter of an equal share.
                let first = o.iter().position(|&x| x).unwrap();
                let last = o.iter().rposition(|&x| x).unwrap();
                let run = (first..=last).filter(|&i| trainable[i]);
                assert!(run.clone().all(|i| o[i]), "rank {rank} of {world}: one run");
                let share: usize = sizes.iter().zip(o).filter(|(_, &x)| x).map(|(n, _)| n).sum();
                assert!(
                    share.abs_diff(total / world) <= largest,
                    "rank {rank}: {share} of {total}"
                );
            }
        }
        // Frozen parameters belong to no one.
        let frozen = model.no_grad();
        assert!(zero1_owned(&frozen, 0, 2).iter().all(|&x| !x));
    }
}
