//! Typed errors of expert parallelism and of the exchanges between ranks: each names the rank or
//! setting at fault and what to change.

/// What can go wrong while placing experts or moving data between ranks.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ParallelError {
    /// The routed experts cannot be split evenly over the expert-parallel ranks.
    #[error("{experts} routed experts cannot be split over {ranks} expert-parallel ranks: choose an expert-parallel size that divides {experts}")]
    ExpertsNotDivisible {
        /// Routed experts of the layer.
        experts: usize,
        /// Expert-parallel ranks.
        ranks: usize,
    },

    /// A setting of the parallel layout is out of range.
    #[error("parallel setting `{field}`: {problem}")]
    Config {
        /// The setting.
        field: &'static str,
        /// What is wrong with it.
        problem: String,
    },

    /// A peer did not answer in time: it never joined, or it is stuck.
    #[error("rank {rank} waited {seconds:.0} s for rank {peer} during {during}: the peer never joined or stopped responding (raise the timeout if its step is just slow)")]
    Timeout {
        /// The rank that waited.
        rank: usize,
        /// The rank it waited for.
        peer: usize,
        /// How long it waited.
        seconds: f64,
        /// The operation.
        during: &'static str,
    },

    /// A peer went away (its thread or process ended) while others still needed it.
    #[error("rank {rank} lost rank {peer} during {during}: {reason}")]
    PeerLost {
        /// The rank that noticed.
        rank: usize,
        /// The rank that went away.
        peer: usize,
        /// The operation.
        during: &'static str,
        /// What the transport said.
        reason: String,
    },

    /// Ranks disagree on the shape of a collective (a bug, or ranks running different configs).
    #[error("rank {rank}: {problem}")]
    Mismatch {
        /// The rank that noticed.
        rank: usize,
        /// What disagrees.
        problem: String,
    },

    /// The multi-process rendezvous failed (environment, address, or the master).
    #[error("rendezvous: {0}")]
    Rendezvous(String),

    /// The NCCL library or a CUDA call failed.
    #[error("NCCL: {0}")]
    Nccl(String),
}

/// Result alias of expert parallelism.
pub type Result<T> = std::result::Result<T, ParallelError>;
