//! Block quantization to E4M3 with one f32 scale per block (DeepSeek-V3 §3.3): 1×128 tiles along
//! the last dimension for activations, 128×128 blocks for weights. Per block,
//! `scale = max(amax, 1e-4) / 448` (or that rounded up to a power of two, the UE8M0 scales of
//! V3.1 checkpoints) and `q = e4m3(x / scale)`; dequantization is `x ≈ decode(q) · scale`. The
//! last block of a dimension may be partial: the scale grid is `ceil(rows/br) × ceil(cols/bc)`.
//! This is the host reference (the twin) of the quantization kernels.

use super::e4m3::{decode, encode, E4M3_MAX};

/// How block scales are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScaleFormat {
    /// Any f32: `amax / 448`.
    F32,
    /// A power of two (`2^ceil(log2(amax / 448))`), as UE8M0 stores it.
    Ue8m0,
}

/// A quantized `[rows, cols]` matrix.
#[derive(Debug, Clone, PartialEq)]
pub struct BlockQuant {
    pub rows: usize,
    pub cols: usize,
    /// `[block_rows, block_cols]`: `[1, 128]` for activations, `[128, 128]` for weights.
    pub block: [usize; 2],
    /// E4M3 codes, row-major `[rows, cols]`.
    pub codes: Vec<u8>,
    /// Row-major `scale_grid(rows, cols, block)`.
    pub scales: Vec<f32>,
}

/// Shape of the scale grid: `[ceil(rows / br), ceil(cols / bc)]`.
pub fn scale_grid(rows: usize, cols: usize, block: [usize; 2]) -> [usize; 2] {
    [rows.div_ceil(block[0]), cols.div_ceil(block[1])]
}

/// Quantizes row-major `x` (`[rows, cols]`) block by block.
pub fn quantize_blocks(x: &[f32], rows: usize, cols: usize, block: [usize; 2], format: ScaleFormat) -> BlockQuant {
    assert_eq!(x.len(), rows * cols, "x must hold rows × cols values");
    assert!(block[0] > 0 && block[1] > 0, "blocks are at least 1 × 1");
    let [gr, gc] = scale_grid(rows, cols, block);
    let mut codes = vec![0u8; x.len()];
    let mut scales = vec![0f32; gr * gc];
    for bi in 0..gr {
        for bj in 0..gc {
            let (r0, r1) = (bi * block[0], ((bi + 1) * block[0]).min(rows));
            let (c0, c1) = (bj * block[1], ((bj + 1) * block[1]).min(cols));
            let mut amax = 0f32;
            for r in r0..r1 {
                for &v in &x[r * cols + c0..r * cols + c1] {
                    // NaN propagates into the scale, as `max` of a NaN tensor does.
                    amax = if v.is_nan() || amax.is_nan() { f32::NAN } else { amax.max(v.abs()) };
                }
            }
            let mut scale = amax.max(1e-4) / E4M3_MAX;
            if amax.is_nan() {
                scale = f32::NAN;
            }
            if format == ScaleFormat::Ue8m0 {
                scale = scale.log2().ceil().exp2();
            }
            scales[bi * gc + bj] = scale;
            for r in r0..r1 {
                for c in c0..c1 {
                    codes[r * cols + c] = encode(x[r * cols + c] / scale);
                }
            }
        }
    }
    BlockQuant { rows, cols, block, codes, scales }
}

/// `decode(q) · scale` of every value.
pub fn dequantize_blocks(q: &BlockQuant) -> Vec<f32> {
    let [_, gc] = scale_grid(q.rows, q.cols, q.block);
    let mut out = Vec::with_capacity(q.codes.len());
    for r in 0..q.rows {
        for c in 0..q.cols {
            let scale = q.scales[(r / q.block[0]) * gc + c / q.block[1]];
            out.push(decode(q.codes[r * q.cols + c]) * scale);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ragged_blocks_keep_each_value_within_half_a_step() {
        // 130 × 200 with 128 × 128 blocks: a 2 × 2 grid whose last row and column are partial.
        let (rows, cols) = (130, 200);
        let x: Vec<f32> = (0..rows * cols).map(|i| ((i * 7919 % 1000) as f32 - 500.0) / 37.0).collect();
        for format in [ScaleFormat::F32, ScaleFormat::Ue8m0] {
            let q = quantize_blocks(&x, rows, cols, [128, 128], format);
            assert_eq!(q.scales.len(), 4);
            let y = dequantize_blocks(&q);
            for (i, (&a, &b)) in x.iter().zip(&y).enumerate() {
                let scale = q.scales[(i / cols / 128) * 2 + (i % cols) / 128];
                // E4M3 keeps 3 mantissa bits: relative error ≤ 2⁻⁴, absolute ≤ 2⁻¹⁰·scale near 0.
                assert!((a - b).abs() <= a.abs() / 16.0 + scale / 1024.0, "{a} → {b}");
            }
            if format == ScaleFormat::Ue8m0 {
                assert!(q.scales.iter().all(|s| s.log2().fract() == 0.0), "powers of two");
            }
        }
    }
}
