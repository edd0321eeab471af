//! DeepSeekMoE (DeepSeek-V3 §2.1.2): always-active shared experts plus fine-grained routed
//! experts, `y = shared(x) + Σ_k w_k · expert_{idx_k}(x)`.
//!
//! Legend used in this module's shape comments: T tokens, D model dim, E routed experts,
//! K experts per token, G expert groups.

#[cfg(feature = "kernels")]
mod device;
pub mod dispatch;
pub mod experts;
/// The CubeCL sort, dispatch and combine kernels: reached through [`RoutedExperts::forward`];
/// public for the kernel tests only.
#[cfg(feature = "kernels")]
#[doc(hidden)]
pub mod kernels;
pub mod router;
pub mod segmented;

use burn::config::Config;
use burn::module::Module;
use burn::tensor::{backend::Backend, Int, Tensor};

use crate::config::DeepSeekConfig;
use crate::mlp::{Mlp, MlpConfig};
use crate::policy::ExecutionPolicy;
pub use crate::policy::{ExpertPath, NodeLimit};
pub use dispatch::DispatchPlan;
pub use experts::{RoutedExperts, RoutedExpertsConfig};
pub use router::{Router, RouterConfig, Routing};

/// How many MoE dispatches of this process ran on the device kernels (0 without GPU backends).
pub fn device_dispatches() -> usize {
    #[cfg(feature = "kernels")]
    return device::device_dispatches();
    #[cfg(not(feature = "kernels"))]
    0
}

/// Installs the autodiff nodes of the routed experts for `Autodiff<B>`: the per-expert GEMM over
/// grouped rows ([`segmented`]) and, with GPU backends, the device dispatch/combine (routed
/// experts then train on the device kernels). Idempotent.
pub(crate) fn register_autodiff<B: burn::tensor::backend::Backend>() {
    segmented::register_autodiff::<B>();
    #[cfg(feature = "kernels")]
    device::register_autodiff::<B>();
}

/// Builds a [`Moe`] layer.
#[derive(Config, Debug)]
pub struct MoeConfig {
    /// Router settings.
    pub router: RouterConfig,
    /// Routed experts.
    pub experts: RoutedExpertsConfig,
    /// Hidden width of the fused shared experts (`n_shared · moe_intermediate`); 0 for none.
    pub d_shared: usize,
}

impl MoeConfig {
    /// The MoE layer a DeepSeek config describes.
    pub fn from_model(cfg: &DeepSeekConfig) -> Self {
        let d = cfg.hidden_size;
        Self {
            router: RouterConfig::new(
                d,
                cfg.n_routed_experts,
                cfg.num_experts_per_tok,
                cfg.n_group,
                cfg.topk_group,
                cfg.scoring_func,
                cfg.topk_method,
                cfg.norm_topk_prob,
                cfg.routed_scaling_factor,
            ),
            experts: RoutedExpertsConfig::new(d, cfg.moe_intermediate_size, cfg.n_routed_experts),
            d_shared: cfg.n_shared_experts * cfg.moe_intermediate_size,
        }
    }

    /// A fresh MoE layer (weights drawn lazily).
    pub fn init<B: Backend>(&self, device: &B::Device) -> Moe<B> {
        Moe {
            gate: self.router.init(device),
            experts: self.experts.init(device),
            shared_experts: (self.d_shared > 0)
                .then(|| MlpConfig::new(self.router.d_model, self.d_shared).init(device)),
        }
    }
}

/// Shared + routed experts; field names follow the checkpoints (`mlp.gate`, `mlp.experts`,
/// `mlp.shared_experts`).
#[derive(Module, Debug)]
pub struct Moe<B: Backend> {
    /// The router.
    pub gate: Router<B>,
    /// The routed experts, stacked.
    pub experts: RoutedExperts<B>,
    /// The shared experts fused into one MLP, if any.
    pub shared_experts: Option<Mlp<B>>,
}

impl<B: Backend> Moe<B> {
    /// Shared plus routed experts, run as `policy` says.
    ///
    /// # Shapes
    /// `x`: `[batch, seq, D]` → `[batch, seq, D]`, and the routing of the `T = batch·seq` tokens.
    pub fn forward(&self, x: Tensor<B, 3>, policy: &ExecutionPolicy) -> (Tensor<B, 3>, Routing<B>) {
        self.forward_replayed(x, policy, None)
    }

    /// [`Moe::forward`] with each token sent to the experts `replay` names (see
    /// [`Router::route`]) when given.
    ///
    /// # Shapes
    /// `x`: `[batch, seq, D]`, `replay`: `[batch·seq, K]` → `[batch, seq, D]`.
    pub fn forward_replayed(
        &self,
        x: Tensor<B, 3>,
        policy: &ExecutionPolicy,
        replay: Option<Tensor<B, 2, Int>>,
    ) -> (Tensor<B, 3>, Routing<B>) {
        let [batch, seq, d_model] = x.dims();
        let tokens = x.reshape([batch * seq, d_model]); // [T, D]
        let routing = self.gate.route(tokens.clone(), policy, replay);
        let mut y = self.experts.forward(
            tokens.clone(),
            routing.indices.clone(),
            routing.weights.clone(),
            policy,
        ); // [T, D]
        if let Some(shared) = &self.shared_experts {
            y = y + shared.forward(tokens, policy.gemm);
        }
        (y.reshape([batch, seq, d_model]), routing)
    }
}
