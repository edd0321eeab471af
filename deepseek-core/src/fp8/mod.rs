//! FP8 as DeepSeek-V3 uses it (§3.3): E4M3 values with fine-grained f32 scales, 1×128 tiles for
//! activations and 128×128 blocks for weights. This module holds the format, the host-side
//! reference of block quantization and of the block-scaled GEMM (the twins the accelerated paths
//! are tested against), and, with a GPU backend, the CubeCL kernels.

pub mod block;
#[cfg(feature = "kernels")]
pub(crate) mod dispatch;
pub mod e4m3;
/// The CubeCL kernels and their launch wrappers: reached through [`fake_quantize`],
/// [`training::matmul`] and [`Fp8Linear`]; public for the kernel tests and benchmarks only.
#[cfg(feature = "kernels")]
#[doc(hidden)]
pub mod kernels;
pub mod linear;
pub mod resident;
pub mod training;

pub use block::{
    dequantize_blocks, fake_quantize_blocks, pack_words, quantize_blocks, reference_gemm,
    scale_grid, unpack_words, BlockQuant, Fp8Layout, ScaleFormat,
};
pub use e4m3::{decode, encode, E4M3_MAX};
pub use linear::Fp8Linear;
pub use resident::Fp8Weight;
pub(crate) use training::register_autodiff;
pub use training::{fake_quantize, runs_kernels, GemmPrecision};

/// Activation tiles: 1 × 128 along the last dimension.
pub const ACTIVATION_BLOCK: [usize; 2] = [1, 128];
/// Weight blocks: 128 × 128.
pub const WEIGHT_BLOCK: [usize; 2] = [128, 128];

/// A precondition of an FP8 operation that the inputs do not meet.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Fp8Error {
    /// Operand shapes, dtypes or block sizes that the operation cannot take.
    #[error("FP8: {0}")]
    Shape(String),
}
