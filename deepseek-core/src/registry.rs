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
        self.map().write().unwrap_or_else(|p| p.into_inner()).insert(TypeId::of::<B>(), Box::new(op));
    }

    /// The operation installed for backend `B`, if any.
    pub fn get<B: 'static, T: Any + Copy>(&self) -> Option<T> {
        self.map().read().unwrap_or_else(|p| p.into_inner()).get(&TypeId::of::<B>()).and_then(|op| op.downcast_ref::<T>().copied())
    }
}
