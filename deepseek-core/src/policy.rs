//! How a forward pass runs, chosen at run time and held by the model as one value: the GEMM
//! precision of the projections, the path of the routed experts, the expert-parallel exchange
//! and node-limited routing. None of these is a weight or a config field of the checkpoint; a
//! policy changes speed, placement or numerics of the same model (FP8 training, §3.3), never its
//! parameters.
//!
//! The model passes `&ExecutionPolicy` down its forward functions, so modules hold weights only
//! and a new run-time choice is one field here, not a field in every module and a walker to set
//! it.

use crate::fp8::GemmPrecision;
use crate::parallel::ExpertParallel;

/// Run-time choices of a forward pass (see the module docs). `Default` is what a checkpoint
/// runs with unless told otherwise: tensor-precision GEMMs, experts per expert on this rank, no
/// node limit.
#[derive(Debug, Clone, Default)]
pub struct ExecutionPolicy {
    /// How the GEMMs of the projections run: attention, dense and shared MLPs, routed experts
    /// and the MTP projections. The embedding, output head, router, norms and the attention
    /// core keep the tensors' precision, as in DeepSeek-V3's FP8 training (§3.3.1).
    pub gemm: GemmPrecision,
    /// How the routed experts run (a speed choice: every path computes the same function).
    pub expert_path: ExpertPath,
    /// Expert parallelism: which experts this rank computes and the exchange that reaches the
    /// others. `None` computes every expert here.
    pub expert_parallel: Option<ExpertParallel>,
    /// Node-limited routing (DeepSeek-V3 §2.1.2); `None` for off.
    pub node_limit: Option<NodeLimit>,
}

impl ExecutionPolicy {
    /// This policy with `gemm` precision.
    pub fn with_gemm(self, gemm: GemmPrecision) -> Self {
        Self { gemm, ..self }
    }

    /// This policy with the routed experts on `path`.
    pub fn with_expert_path(self, expert_path: ExpertPath) -> Self {
        Self { expert_path, ..self }
    }

    /// This policy with the routed experts spread by `parallel` (`None`: all here).
    pub fn with_expert_parallel(self, expert_parallel: Option<ExpertParallel>) -> Self {
        Self { expert_parallel, ..self }
    }

    /// This policy with node-limited routing (`None`: off).
    pub fn with_node_limit(self, node_limit: Option<NodeLimit>) -> Self {
        Self { node_limit, ..self }
    }
}

/// Which way [`crate::moe::RoutedExperts`] runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ExpertPath {
    /// Per expert on the device kernels where the backend runs them (wgpu, CUDA); elsewhere
    /// grouped when padding at most doubles the rows, else per expert.
    Auto,
    /// Two batched matmuls over all experts, rows padded to the busiest expert (host plan).
    Grouped,
    /// One pair of matmuls per expert that received tokens; sorted, dispatched and combined by
    /// the device kernels where the backend runs them, else by the host plan.
    #[default]
    PerExpert,
    /// [`ExpertPath::PerExpert`] with the host plan on every backend (the indices read back, the
    /// data moved by gather and scatter-add): the baseline of the device kernels.
    HostPerExpert,
}

/// Node-limited routing (DeepSeek-V3 §2.1.2): the experts are split into `nodes` contiguous
/// blocks (the placement of expert parallelism, expert `e` on node `⌊e·nodes/E⌋`), and each token
/// may use experts on at most `max_nodes` of them, the nodes with the highest sums of their
/// `⌈K/max_nodes⌉` best biased scores. This bounds the all-to-all fan-out of every token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NodeLimit {
    /// Blocks the experts are split into (devices or nodes).
    pub nodes: usize,
    /// Most nodes one token's experts may span.
    pub max_nodes: usize,
}

impl NodeLimit {
    /// Checks the limit against a layer of `n_experts` experts choosing `top_k`.
    pub fn check(&self, n_experts: usize, top_k: usize) -> Result<(), String> {
        if self.nodes == 0 || !n_experts.is_multiple_of(self.nodes) {
            return Err(format!("{n_experts} experts cannot be split into {} nodes", self.nodes));
        }
        if self.max_nodes == 0 || self.max_nodes > self.nodes {
            return Err(format!("max_nodes must be in 1..={}, got {}", self.nodes, self.max_nodes));
        }
        if self.max_nodes * (n_experts / self.nodes) < top_k {
            return Err(format!(
                "{} nodes of {} experts hold fewer than the {top_k} experts a token needs",
                self.max_nodes,
                n_experts / self.nodes
            ));
        }
        Ok(())
    }

    /// Scores summed per node: the best `⌈K/M⌉` of each.
    pub(crate) fn per_node(&self, top_k: usize, per_node: usize) -> usize {
        top_k.div_ceil(self.max_nodes).clamp(1, per_node)
    }
}
