//! The backends a binary can run on, named as the `--device` flag names them. Which of them
//! exist depends on Cargo features; the binaries turn a choice into a Burn backend type.

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

