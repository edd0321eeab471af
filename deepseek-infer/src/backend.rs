//! Choosing a Burn backend at run time. Each backend exists only when its Cargo feature is on;
//! asking for one that was not compiled in is an error that says how to rebuild.

use std::fmt;
use std::str::FromStr;

/// The backends the `--device` flag names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceKind {
    /// Pure-Rust CPU backend (feature `flex`, on by default).
    Flex,
    /// wgpu: Vulkan, Metal, DX12 (feature `wgpu`).
    Wgpu,
    /// NVIDIA CUDA (feature `cuda`; CUDA and NVRTC are loaded at run time).
    Cuda,
}

impl FromStr for DeviceKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "flex" | "cpu" => Ok(Self::Flex),
            "wgpu" => Ok(Self::Wgpu),
            "cuda" => Ok(Self::Cuda),
            other => Err(format!("unknown device `{other}`: choose flex, wgpu or cuda")),
        }
    }
}

impl fmt::Display for DeviceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Flex => "flex",
            Self::Wgpu => "wgpu",
            Self::Cuda => "cuda",
        })
    }
}

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
