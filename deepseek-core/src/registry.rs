//! Custom operations per backend type. Model code is generic over the backend, so an operation
//! that needs its own autodiff node (the FP8 GEMM, the device MoE dispatch/combine, the
//! expert-parallel all-to-all) is installed for `Autodiff<B>` at run time and found by type.

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::sync::{OnceLock, RwLock};

/// One operation (usually a `fn` pointer, or a tuple of them) per backend type.
pub(crate) struct OpRegistry(OnceLock<RwLock<HashMap<TypeId, Box<dyn Any + Send + Sync>>>>);

impl OpRegistry {
    pub const fn new() -> Self {
        Self(OnceLock::new())
    }

    fn map(&self) -> &RwLock<HashMap<TypeId, Box<dyn Any + Send + Sync>>> {
        self.0.get_or_init(Default::default)
    }

    /// Installs `op` for backend `B` (replacing an earlier one: installing is idempotent).
    pub fn insert<B: 'static, T: Any + Send + Sync>(&self, op: T) {
        self.map()
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(TypeId::of::<B>(), Box::new(op));
    }

    /// The operation installed for backend `B`, if any.
    pub fn get<B: 'static, T: Any + Copy>(&self) -> Option<T> {
        self.map()
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&TypeId::of::<B>())
            .and_then(|op| op.downcast_ref::<T>().copied())
    }
}

/// The autodiff backends whose custom operations [`crate::register_autodiff`] installed.
static INSTALLED: OpRegistry = OpRegistry::new();

/// Records that every custom operation of `Autodiff<B>` is installed.
pub(crate) fn mark_installed<B: burn::tensor::backend::Backend>() {
    INSTALLED.insert::<burn::backend::Autodiff<B>, ()>(());
}

/// Whether [`crate::register_autodiff`] ran for the inner backend of `B` (`B` an autodiff
/// backend).
pub(crate) fn installed<B: 'static>() -> bool {
    INSTALLED.get::<B, ()>().is_some()
}

/// Panics, naming the missing call, when `B` records gradients but its custom operations were
/// never installed: training would otherwise go on with other gradients (FP8 straight-through)
/// or another code path (MoE on the host) than it asked for, and nothing would say so. The
/// forward passes that reach this have no error channel; the backend switch
/// ([`crate::device::run_on`]) and the trainer install the operations, so only a hand-built
/// training loop can get here.
pub(crate) fn require_autodiff_ops<B: burn::tensor::backend::Backend>(
    device: &B::Device,
    what: &str,
) {
    if B::ad_enabled(device) && !installed::<B>() {
        panic!(
            "{what} ran on the autodiff backend `{}` whose custom operations are not installed: call \
             `deepseek_core::register_autodiff::<Inner>()` once for its inner backend before training \
             (deepseek_core::device::run_on does it; an autodiff backend with gradient checkpointing \
             has no such operations)",
            std::any::type_name::<B>()
        );
    }
}
