//! The backends a binary can run on, named as the `--device` flag names them, and the one
//! switch from such a name to a Burn backend type ([`run_on`]). Which backends exist depends on
//! Cargo features; asking for one that was not compiled in is an error that says how to rebuild.
//! The switch installs this crate's custom autodiff operations for the backend it picks, so a
//! binary that goes through it cannot forget them.

use std::fmt;
use std::str::FromStr;

use burn::tensor::backend::Backend;

use crate::error::DeepSeekError;

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

/// Work generic over the backend, run by [`run_on`] on the backend a [`DeviceKind`] names.
/// Rust has no generic closures; this trait is one: the task's state is `self`, its body
/// [`BackendTask::run`]. Train on `Autodiff<B>` inside it: the custom operations are installed.
pub trait BackendTask {
    /// What the task returns.
    type Output;

    /// Runs on `devices` (one or more devices of backend `B`, in the order asked for).
    fn run<B: Backend>(self, devices: Vec<B::Device>) -> Self::Output;
}

/// Runs `task` on the backend `kind` names, on the devices with indices `ids` (empty: the
/// default device), after installing the custom autodiff operations for that backend
/// ([`crate::register_autodiff`]).
///
/// # Errors
/// A backend this build lacks (the message names the Cargo feature), a device index that does
/// not exist, or a wgpu adapter that cannot be opened.
pub fn run_on<T: BackendTask>(
    kind: DeviceKind,
    ids: &[usize],
    task: T,
) -> crate::Result<T::Output> {
    match kind {
        #[cfg(feature = "flex")]
        DeviceKind::Flex => {
            if ids.iter().any(|&i| i != 0) {
                return Err(DeepSeekError::config(
                    "device",
                    "Flex has a single device (flex:0); ranks share it",
                ));
            }
            Ok(start::<burn::backend::Flex, T>(vec![Default::default()], task))
        }
        #[cfg(feature = "wgpu")]
        DeviceKind::Wgpu => {
            use burn::backend::wgpu::WgpuDevice;
            let devices: Vec<WgpuDevice> = match ids {
                [] => vec![WgpuDevice::DefaultDevice],
                ids => ids.iter().map(|&i| WgpuDevice::DiscreteGpu(i)).collect(),
            };
            for (d, id) in devices.iter().zip(ids) {
                probe::<burn::backend::Wgpu>(d, &format!("wgpu:{id}"))?;
            }
            Ok(start::<burn::backend::Wgpu, T>(devices, task))
        }
        #[cfg(feature = "cuda")]
        DeviceKind::Cuda => {
            use burn::backend::cuda::CudaDevice;
            let ids = if ids.is_empty() { vec![0] } else { ids.to_vec() };
            let available = crate::parallel::cuda_device_count();
            if let Some(bad) = ids.iter().find(|&&i| i >= available) {
                return Err(DeepSeekError::config(
                    "device",
                    format!(
                        "cuda:{bad} does not exist: this machine has {available} CUDA device(s)"
                    ),
                ));
            }
            Ok(start::<burn::backend::Cuda, T>(
                ids.iter().map(|&i| CudaDevice::new(i)).collect(),
                task,
            ))
        }
        #[allow(unreachable_patterns)]
        other => Err(DeepSeekError::config(
            "device",
            format!("this build has no {other} backend: rebuild with `--features {other}`"),
        )),
    }
}

fn start<B: Backend, T: BackendTask>(devices: Vec<B::Device>, task: T) -> T::Output {
    crate::register_autodiff::<B>();
    task.run::<B>(devices)
}

/// Checks that `device` can run a tensor operation (a missing adapter panics inside the backend).
#[cfg(feature = "wgpu")]
fn probe<B: Backend>(device: &B::Device, name: &str) -> crate::Result<()> {
    let device = device.clone();
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
        burn::tensor::Tensor::<B, 1>::zeros([1], &device).into_data()
    }))
    .map(|_| ())
    .map_err(|_| {
        DeepSeekError::config("device", format!("{name} does not exist or cannot be opened"))
    })
}
