//! FP8 as DeepSeek-V3 uses it (§3.3): E4M3 values with fine-grained f32 scales, 1×128 tiles for
//! activations and 128×128 blocks for weights. This module holds the format and the host-side
//! reference of block quantization; it is the twin the accelerated paths are tested against.

pub mod block;
pub mod e4m3;

pub use block::{dequantize_blocks, quantize_blocks, scale_grid, BlockQuant, ScaleFormat};
pub use e4m3::{decode, encode, E4M3_MAX};
