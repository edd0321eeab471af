//! Choosing a Burn backend at run time. Each backend exists only when its Cargo feature is on;
//! asking for one that was not compiled in is an error that says how to rebuild.

pub use deepseek_core::device::DeviceKind;

/// Calls `$body` with `B` bound to the backend type of `$kind` and `$device` to its default
/// device; a backend not compiled in becomes an `anyhow` error.
#[macro_export]
macro_rules! with_backend {
    ($kind:expr, |$b:ident, $device:ident| $body:expr) => {{
        use $crate::backend::DeviceKind;
        match $kind {
            #[cfg(feature = "flex")]
            DeviceKind::Flex => {
                type $b = burn::backend::Flex;
                let $device: burn::tensor::Device<$b> = Default::default();
                $body
            }
            #[cfg(feature = "wgpu")]
            DeviceKind::Wgpu => {
                type $b = burn::backend::Wgpu;
                let $device: burn::tensor::Device<$b> = Default::default();
                $body
            }
            #[cfg(feature = "cuda")]
            DeviceKind::Cuda => {
                type $b = burn::backend::Cuda;
                let $device: burn::tensor::Device<$b> = Default::default();
                $body
            }
            #[allow(unreachable_patterns)]
            other => Err(anyhow::anyhow!(
                "this binary was built without the `{other}` backend: rebuild with `--features {other}`"
            )),
        }
    }};
}
