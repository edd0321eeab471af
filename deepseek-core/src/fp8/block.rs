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
    /// Rows of the matrix.
    pub rows: usize,
    /// Columns of the matrix.
    pub cols: usize,
    /// `[block_rows, block_cols]`: `[1, 128]` for activations, `[128, 128]` for weights.
    pub block: [usize; 2],
    /// E4M3 codes, row-major `[rows, cols]`.
    pub codes: Vec<u8>,
    /// Row-major `scale_grid(rows, cols, block)`.
    pub scales: Vec<f32>,
}

/// The shape of an FP8-resident weight: `experts` matrices of `[d_out, d_in]`, each made of
/// `parts` checkpoint tensors of `d_out / parts` rows stacked, in `block` scale blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fp8Layout {
    /// Matrices stacked along the rows (1, or the routed experts of a block).
    pub experts: usize,
    /// Checkpoint tensors concatenated along the rows of each matrix (2 for the experts' fused
    /// gate/up), each with its own scale grid.
    pub parts: usize,
    /// Output width of a matrix (all parts).
    pub d_out: usize,
    /// Input width.
    pub d_in: usize,
    /// `[block_rows, block_cols]` of the scales (`weight_block_size`).
    pub block: [usize; 2],
}

impl Fp8Layout {
    /// Rows of one part.
    pub fn part_rows(&self) -> usize {
        self.d_out / self.parts
    }

    /// `[scale rows, scale columns]` of one matrix: each part's grid, stacked.
    pub fn grid(&self) -> [usize; 2] {
        [self.parts * self.part_rows().div_ceil(self.block[0]), self.d_in.div_ceil(self.block[1])]
    }

    /// The scale row of row `j` of a matrix.
    pub fn scale_row(&self, j: usize) -> usize {
        let h = self.part_rows();
        (j / h) * h.div_ceil(self.block[0]) + (j % h) / self.block[0]
    }

    /// `u32` words per row of codes (four codes each, rows padded to whole words).
    pub fn words(&self) -> usize {
        self.d_in.div_ceil(4)
    }
}

/// Shape of the scale grid: `[ceil(rows / br), ceil(cols / bc)]`.
pub fn scale_grid(rows: usize, cols: usize, block: [usize; 2]) -> [usize; 2] {
    [rows.div_ceil(block[0]), cols.div_ceil(block[1])]
}

/// Quantizes row-major `x` (`[rows, cols]`) block by block.
pub fn quantize_blocks(
    x: &[f32],
    rows: usize,
    cols: usize,
    block: [usize; 2],
    format: ScaleFormat,
) -> BlockQuant {
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

/// `dequantize_blocks(quantize_blocks(x))` in place, without materializing the codes: the values
/// an FP8 GEMM sees. Large inputs are split by block rows over the available cores.
pub fn fake_quantize_blocks(x: &mut [f32], rows: usize, cols: usize, block: [usize; 2]) {
    assert_eq!(x.len(), rows * cols, "x must hold rows × cols values");
    assert!(block[0] > 0 && block[1] > 0, "blocks are at least 1 × 1");
    let band = block[0] * cols; // one row of blocks
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    if threads > 1 && x.len() >= 1 << 16 && rows > block[0] {
        let bands_per_thread = rows.div_ceil(block[0]).div_ceil(threads);
        std::thread::scope(|scope| {
            for chunk in x.chunks_mut(bands_per_thread * band) {
                scope.spawn(move || fake_quantize_band(chunk, cols, block));
            }
        });
    } else {
        fake_quantize_band(x, cols, block);
    }
}

/// [`fake_quantize_blocks`] of whole rows of blocks (the last may be partial).
fn fake_quantize_band(x: &mut [f32], cols: usize, block: [usize; 2]) {
    let lut = decode_table();
    let rows = x.len() / cols;
    for r0 in (0..rows).step_by(block[0]) {
        let r1 = (r0 + block[0]).min(rows);
        for c0 in (0..cols).step_by(block[1]) {
            let c1 = (c0 + block[1]).min(cols);
            let mut amax = 0f32;
            for r in r0..r1 {
                for &v in &x[r * cols + c0..r * cols + c1] {
                    amax = if v.is_nan() || amax.is_nan() { f32::NAN } else { amax.max(v.abs()) };
                }
            }
            let scale = if amax.is_nan() { f32::NAN } else { amax.max(1e-4) / E4M3_MAX };
            for r in r0..r1 {
                for v in &mut x[r * cols + c0..r * cols + c1] {
                    *v = lut[encode(*v / scale) as usize] * scale;
                }
            }
        }
    }
}

/// The value of every E4M3 code.
fn decode_table() -> &'static [f32; 256] {
    static TABLE: std::sync::OnceLock<[f32; 256]> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| std::array::from_fn(|c| decode(c as u8)))
}

/// Packs row-major `[rows, cols]` codes four to a `u32`, little-endian, each row padded with
/// zero codes to a whole word: the layout of the device kernels (`[rows, ceil(cols / 4)]`).
pub fn pack_words(codes: &[u8], rows: usize, cols: usize) -> Vec<u32> {
    assert_eq!(codes.len(), rows * cols, "codes must hold rows × cols values");
    let words = cols.div_ceil(4);
    let mut out = vec![0u32; rows * words];
    for r in 0..rows {
        for (c, &code) in codes[r * cols..(r + 1) * cols].iter().enumerate() {
            out[r * words + c / 4] |= (code as u32) << (8 * (c % 4));
        }
    }
    out
}

/// The inverse of [`pack_words`]: row-major `[rows, cols]` codes.
pub fn unpack_words(words: &[u32], rows: usize, cols: usize) -> Vec<u8> {
    let per_row = cols.div_ceil(4);
    assert_eq!(words.len(), rows * per_row, "words must hold rows × ceil(cols / 4) values");
    (0..rows * cols)
        .map(|i| (words[(i / cols) * per_row + (i % cols) / 4] >> (8 * (i % cols % 4))) as u8)
        .collect()
}

/// The block-scaled FP8 GEMM `a · bᵀ` as DeepSeek-V3 computes it (§3.3), on the host: for each
/// 128-wide block of K, the products of decoded codes are summed in f32 (exact for up to 128
/// products of 4-bit-mantissa values of similar range, which is the point of promoting every
/// N_C = 128 elements), then scaled by `a_scale[m, kb] · b_scale[n / bn, kb]` and added to an f32
/// accumulator. `a` is `[m, k]` in `[1, 128]` tiles, `b` is `[n, k]` in `[bn, 128]` blocks; the
/// result is row-major `[m, n]`. This is the twin of the GEMM kernel.
pub fn reference_gemm(a: &BlockQuant, b: &BlockQuant) -> Vec<f32> {
    assert_eq!(a.block, [1, 128], "a is quantized in 1 × 128 tiles");
    assert_eq!(b.block[1], 128, "b is quantized in blocks 128 wide along K");
    assert_eq!(a.cols, b.cols, "inner dimensions agree");
    let (m, n, k) = (a.rows, b.rows, a.cols);
    let k_blocks = k.div_ceil(128);
    let a_vals: Vec<f32> = a.codes.iter().map(|&c| decode(c)).collect();
    let b_vals: Vec<f32> = b.codes.iter().map(|&c| decode(c)).collect();
    let mut out = vec![0f32; m * n];
    for i in 0..m {
        for j in 0..n {
            let mut acc = 0f32;
            for kb in 0..k_blocks {
                let (k0, k1) = (kb * 128, ((kb + 1) * 128).min(k));
                let partial: f32 = (k0..k1).map(|t| a_vals[i * k + t] * b_vals[j * k + t]).sum();
                acc += a.scales[i * k_blocks + kb]
                    * b.scales[(j / b.block[0]) * k_blocks + kb]
                    * partial;
            }
            out[i * n + j] = acc;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fake_quantization_equals_quantize_then_dequantize() {
        // Large enough for the threaded path, ragged in both directions.
        let (rows, cols) = (301, 517);
        let x: Vec<f32> = (0..rows * cols)
            .map(|i| {
                ((i * 7919 % 2003) as f32 - 1001.0) / 13.0 * if i % 97 == 0 { 50.0 } else { 1.0 }
            })
            .collect();
        for block in [[1, 128], [128, 128], [32, 48]] {
            let want = dequantize_blocks(&quantize_blocks(&x, rows, cols, block, ScaleFormat::F32));
            let mut got = x.clone();
            fake_quantize_blocks(&mut got, rows, cols, block);
            assert!(got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()), "{block:?}");
        }
    }

    #[test]
    fn packing_round_trips_with_ragged_rows() {
        let codes: Vec<u8> = (0..3 * 7).map(|i| (i * 37 % 256) as u8).collect();
        let words = pack_words(&codes, 3, 7);
        assert_eq!(words.len(), 3 * 2);
        assert_eq!(words[0] & 0xFF, codes[0] as u32);
        assert_eq!(words[1] >> 24, 0, "the padding byte of a row is the code of +0");
        assert_eq!(unpack_words(&words, 3, 7), codes);
    }

    #[test]
    fn reference_gemm_matches_the_dequantized_product() {
        // Block-scaled FP8 GEMM = the f64 product of the dequantized operands, up to f32 rounding.
        let (m, n, k) = (5, 3, 300);
        let a: Vec<f32> = (0..m * k).map(|i| ((i * 7919 % 1013) as f32 - 506.0) / 97.0).collect();
        let b: Vec<f32> =
            (0..n * k).map(|i| ((i * 104_729 % 977) as f32 - 488.0) / 311.0).collect();
        let qa = quantize_blocks(&a, m, k, [1, 128], ScaleFormat::F32);
        let qb = quantize_blocks(&b, n, k, [128, 128], ScaleFormat::F32);
        let (da, db) = (dequantize_blocks(&qa), dequantize_blocks(&qb));
        let c = reference_gemm(&qa, &qb);
        for i in 0..m {
            for j in 0..n {
                let exact: f64 = (0..k).map(|t| da[i * k + t] as f64 * db[j * k + t] as f64).sum();
                assert!(
                    (c[i * n + j] as f64 - exact).abs() <= 1e-5 * (1.0 + exact.abs()),
                    "{} vs {exact}",
                    c[i * n + j]
                );
            }
        }
    }

    #[test]
    fn ragged_blocks_keep_each_value_within_half_a_step() {
        // 130 × 200 with 128 × 128 blocks: a 2 × 2 grid whose last row and column are partial.
        let (rows, cols) = (130, 200);
        let x: Vec<f32> =
            (0..rows * cols).map(|i| ((i * 7919 % 1000) as f32 - 500.0) / 37.0).collect();
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
