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
use crate::moe::{ExpertPath, NodeLimit};
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
