//! CubeCL kernels for FP8 block quantization and the block-scaled FP8 GEMM, for every CubeCL
//! runtime (wgpu: Vulkan, Metal, DX12; CUDA). Their twin is the host reference in
//! [`super::block`] (quantization) and [`super::reference_gemm`] (GEMM); `tests/tests/fp8_kernels.rs`
//! checks them against it on random data, ragged sizes and outliers included.
//!
//! # Layout
//! FP8 codes are packed four to a `u32` (wgpu has no byte type), little-endian within the word and
//! row by row: a `[rows, cols]` matrix is stored as `[rows, ceil(cols / 4)]` words, the padding
//! bytes of the last word of a row are zero (the code of +0). On a little-endian host the words'
//! bytes are therefore exactly the row-major E4M3 bytes of a safetensors `F8_E4M3` tensor when
//! `cols` is a multiple of 4. Scales are f32, row-major over the block grid
//! `[ceil(rows / br), ceil(cols / bc)]`.
//!
//! The E4M3 conversion is done with integer operations on the f32 bits, so it is exact on any
//! device and needs no native FP8 type: round to nearest, ties to even, saturation to ±448, NaN
//! kept (see [`super::e4m3`]).

use burn::tensor::DType;
use burn_cubecl::{kernel::into_contiguous, tensor::CubeTensor, CubeRuntime};
use cubecl::prelude::*;

use super::block::ScaleFormat;
use super::Fp8Error;
use crate::cube::{array, empty, grid};

/// Units per cube of the quantization kernel (one cube per block).
const QUANT_UNITS: u32 = 128;
/// Output tile of the GEMM kernel: 64 × 64 per cube, 4 × 4 per unit of a 16 × 16 cube.
const TILE: u32 = 64;
/// Codes staged in shared memory per step along K: 32 (8 words); four steps make a 128 block.
const TILE_K: u32 = 32;

/// A matrix quantized on the device: packed E4M3 codes and their block scales.
#[derive(Debug, Clone)]
pub struct DeviceFp8<R: CubeRuntime> {
    /// `u32` words `[rows, ceil(cols / 4)]`, four codes each.
    pub codes: CubeTensor<R>,
    /// f32 `[ceil(rows / br), ceil(cols / bc)]`.
    pub scales: CubeTensor<R>,
    pub rows: usize,
    pub cols: usize,
    /// `[br, bc]`: `[1, 128]` for activations, `[128, 128]` for weights.
    pub block: [usize; 2],
}

/// E4M3 code of `x` in the low byte (see [`super::e4m3::encode`], which this mirrors).
#[allow(unused_assignments)]
#[cube]
fn encode_e4m3(x: f32) -> u32 {
    let bits = u32::reinterpret(x);
    let sign = (bits >> 24) & 0x80;
    let magnitude = bits & 0x7FFF_FFFF;
    let mut code = 0u32;
    if magnitude > 0x7F80_0000 {
        // NaN keeps its sign.
        code = 0x7F;
    } else if magnitude >= 0x43E0_0000 {
        // 448 and above, infinity included, saturates.
        code = 0x7E;
    } else if magnitude < (121u32 << 23) {
        // Below 2⁻⁶ the codes count steps of 2⁻⁹: scale by 2⁹ (exact) and round the integer
        // part half to even with an exact comparison of the fraction (no reliance on the
        // device's rounding mode).
        let steps = f32::reinterpret(magnitude) * 512.0;
        let whole = f32::floor(steps);
        let fraction = steps - whole;
        let n = u32::cast_from(whole);
        let mut up = 0u32;
        if fraction > 0.5 || (fraction == 0.5 && (n & 1) == 1) {
            up = 1;
        }
        code = n + up;
    } else {
        // Re-bias the exponent (127 → 7) and round the 20 dropped mantissa bits to even.
        let odd = (magnitude >> 20) & 1;
        code = (magnitude - (120u32 << 23) + 0x7FFFF + odd) >> 20;
    }
    sign | code
}

/// The value of the E4M3 code in the low byte of `code`.
#[cube]
fn decode_e4m3(code: u32) -> f32 {
    let exponent = (code >> 3) & 0xF;
    let mantissa = code & 0x7;
    let mut magnitude = f32::reinterpret(((exponent + 120) << 23) | (mantissa << 20));
    if exponent == 0 {
        magnitude = f32::cast_from(mantissa) * (1.0 / 512.0);
    }
    if (code & 0x7F) == 0x7F {
        magnitude = f32::reinterpret(0x7FC0_0000u32);
    }
    if (code & 0x80) != 0 {
        magnitude = -magnitude;
    }
    magnitude
}

/// One cube per block: the block's amax (shared-memory tree reduction), its scale, then its
/// codes, four per word. Needs `bc % 4 == 0` so that no word straddles two blocks.
#[cube(launch)]
fn quantize_kernel(
    x: &Array<f32>,
    codes: &mut Array<u32>,
    scales: &mut Array<f32>,
    rows: u32,
    cols: u32,
    block_rows: u32,
    block_cols: u32,
    grid_cols: u32,
    n_blocks: u32,
    #[comptime] ue8m0: bool,
) {
    let block = CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X;
    if block >= n_blocks {
        terminate!();
    }
    let unit = UNIT_POS_X;
    let r0 = (block / grid_cols) * block_rows;
    let c0 = (block % grid_cols) * block_cols;
    let height = u32::min(block_rows, rows - r0);
    let width = u32::min(block_cols, cols - c0);

    let mut amax = 0.0f32;
    let mut nan = 0u32;
    let mut i = unit;
    while i < height * width {
        let v = x[((r0 + i / width) * cols + c0 + i % width) as usize];
        if f32::is_nan(v) {
            nan = 1;
        }
        amax = f32::max(amax, f32::abs(v));
        i += QUANT_UNITS;
    }
    let mut shared_max = SharedMemory::<f32>::new(QUANT_UNITS as usize);
    let mut shared_nan = SharedMemory::<u32>::new(QUANT_UNITS as usize);
    shared_max[unit as usize] = amax;
    shared_nan[unit as usize] = nan;
    sync_cube();
    let mut stride = CUBE_DIM_X / 2;
    while stride > 0 {
        if unit < stride {
            let other = (unit + stride) as usize;
            shared_max[unit as usize] = f32::max(shared_max[unit as usize], shared_max[other]);
            shared_nan[unit as usize] = shared_nan[unit as usize] | shared_nan[other];
        }
        sync_cube();
        stride /= 2;
    }

    // scale = max(amax, 1e-4) / 448, NaN if the block holds one; UE8M0 rounds it up to a power
    // of two (exact on the bits: a normal positive f32 with a non-zero mantissa goes to the next
    // exponent).
    let mut scale = f32::max(shared_max[0], 1e-4) / 448.0;
    if ue8m0 {
        let bits = u32::reinterpret(scale);
        if (bits & 0x7F_FFFF) != 0 {
            scale = f32::reinterpret((bits & 0x7F80_0000) + 0x80_0000);
        }
    }
    if shared_nan[0] != 0 {
        scale = f32::reinterpret(0x7FC0_0000u32);
    }
    if unit == 0 {
        scales[block as usize] = scale;
    }

    let words_per_row = cols.div_ceil(4);
    let block_words = width.div_ceil(4);
    let mut w = unit;
    while w < height * block_words {
        let r = r0 + w / block_words;
        let c = c0 + (w % block_words) * 4;
        let mut word = 0u32;
        for j in 0..4u32 {
            if c + j < cols {
                let code = encode_e4m3(x[(r * cols + c + j) as usize] / scale);
                word |= code << (8 * j);
            }
        }
        codes[(r * words_per_row + c / 4) as usize] = word;
        w += QUANT_UNITS;
    }
}

/// One unit per value: `decode(q) · scale`.
#[cube(launch)]
fn dequantize_kernel(
    codes: &Array<u32>,
    scales: &Array<f32>,
    out: &mut Array<f32>,
    rows: u32,
    cols: u32,
    block_rows: u32,
    block_cols: u32,
    grid_cols: u32,
) {
    let i = ABSOLUTE_POS_Y * (CUBE_COUNT_X * CUBE_DIM_X) + ABSOLUTE_POS_X;
    if i >= rows * cols {
        terminate!();
    }
    let r = i / cols;
    let c = i % cols;
    let word = codes[(r * cols.div_ceil(4) + c / 4) as usize];
    let code = (word >> (8 * (c % 4))) & 0xFF;
    let scale = scales[((r / block_rows) * grid_cols + c / block_cols) as usize];
    out[i as usize] = decode_e4m3(code) * scale;
}

/// Stages a `TILE × TILE_K` slice of codes (rows `row0..`, codes `k0..`) into shared memory as
/// decoded values, K-major (`tile[kk · TILE + r]`); out-of-range rows and codes read as zero.
#[cube]
fn stage_tile(
    codes: &Array<u32>,
    tile: &mut SharedMemory<f32>,
    row0: u32,
    rows: u32,
    k0: u32,
    k: u32,
    unit: u32,
) {
    let words_per_row = k.div_ceil(4);
    // TILE rows × 8 words = 512 words, two per unit of the 256.
    for half in 0..2u32 {
        let idx = unit + half * 256;
        let r = idx / 8;
        let wk = idx % 8;
        let row = row0 + r;
        let word_col = k0 / 4 + wk;
        let mut word = 0u32;
        if row < rows && word_col < words_per_row {
            word = codes[(row * words_per_row + word_col) as usize];
        }
        for j in 0..4u32 {
            let kk = wk * 4 + j;
            let mut v = 0.0f32;
            if k0 + kk < k {
                v = decode_e4m3((word >> (8 * j)) & 0xFF);
            }
            tile[(kk * TILE + r) as usize] = v;
        }
    }
}

/// `C[m, n] = Σ_kb a_scale[m, kb] · b_scale[n / bn, kb] · Σ_{k ∈ kb} a[m, k] · b[n, k]`: the codes'
/// products are summed exactly as small integers times powers of two in an f32 partial sum per
/// 128-wide K block, which is then scaled and added to the f32 accumulator (DeepSeek-V3 §3.3's
/// promotion to CUDA cores every N_C = 128 elements).
#[cube(launch)]
fn gemm_kernel(
    a: &Array<u32>,
    a_scales: &Array<f32>,
    b: &Array<u32>,
    b_scales: &Array<f32>,
    out: &mut Array<f32>,
    m: u32,
    n: u32,
    k: u32,
    b_block_rows: u32,
) {
    let tx = UNIT_POS_X;
    let ty = UNIT_POS_Y;
    let unit = ty * 16 + tx;
    let row0 = CUBE_POS_Y * TILE;
    let col0 = CUBE_POS_X * TILE;
    let k_blocks = k.div_ceil(128);

    let mut a_tile = SharedMemory::<f32>::new((TILE * TILE_K) as usize);
    let mut b_tile = SharedMemory::<f32>::new((TILE * TILE_K) as usize);
    let mut acc = Array::<f32>::new(16usize);
    let mut partial = Array::<f32>::new(16usize);
    for i in 0..16usize {
        acc[i] = 0.0;
    }

    for kb in 0..k_blocks {
        for i in 0..16usize {
            partial[i] = 0.0;
        }
        for step in 0..4u32 {
            let k0 = kb * 128 + step * TILE_K;
            if k0 < k {
                stage_tile(a, &mut a_tile, row0, m, k0, k, unit);
                stage_tile(b, &mut b_tile, col0, n, k0, k, unit);
                sync_cube();
                for kk in 0..TILE_K {
                    let base = kk * TILE;
                    for i in 0..4u32 {
                        let av = a_tile[(base + ty * 4 + i) as usize];
                        for j in 0..4u32 {
                            let idx = (i * 4 + j) as usize;
                            partial[idx] += av * b_tile[(base + tx * 4 + j) as usize];
                        }
                    }
                }
                sync_cube();
            }
        }
        for i in 0..4u32 {
            let row = row0 + ty * 4 + i;
            let mut sa = 0.0f32;
            if row < m {
                sa = a_scales[(row * k_blocks + kb) as usize];
            }
            for j in 0..4u32 {
                let col = col0 + tx * 4 + j;
                let mut sb = 0.0f32;
                if col < n {
                    sb = b_scales[((col / b_block_rows) * k_blocks + kb) as usize];
                }
                let idx = (i * 4 + j) as usize;
                acc[idx] += sa * sb * partial[idx];
            }
        }
    }

    for i in 0..4u32 {
        let row = row0 + ty * 4 + i;
        for j in 0..4u32 {
            let col = col0 + tx * 4 + j;
            if row < m && col < n {
                out[(row * n + col) as usize] = acc[(i * 4 + j) as usize];
            }
        }
    }
}

fn check_f32_matrix<R: CubeRuntime>(x: &CubeTensor<R>, what: &str) -> Result<[usize; 2], Fp8Error> {
    let shape = x.meta.shape();
    if shape.num_dims() != 2 {
        return Err(Fp8Error::Shape(format!(
            "{what} must be a matrix, got shape {:?}",
            shape.to_vec()
        )));
    }
    if x.dtype != DType::F32 {
        return Err(Fp8Error::Shape(format!("{what} must be f32, got {:?}", x.dtype)));
    }
    let dims = [shape[0], shape[1]];
    if dims[0] == 0 || dims[1] == 0 {
        return Err(Fp8Error::Shape(format!("{what} is empty ({dims:?})")));
    }
    if dims[0] * dims[1] >= u32::MAX as usize {
        return Err(Fp8Error::Shape(format!(
            "{what} has {} values, more than 32-bit indexing allows",
            dims[0] * dims[1]
        )));
    }
    Ok(dims)
}

/// Uploads a row-major f32 `[rows, cols]` matrix to `device`.
pub fn upload<R: CubeRuntime>(
    device: &R::Device,
    values: &[f32],
    shape: [usize; 2],
) -> CubeTensor<R> {
    crate::cube::upload(device, values, &shape, DType::F32)
}

pub use crate::cube::download;

/// Quantizes an f32 matrix block by block (`[1, 128]` for activations, `[128, 128]` for weights;
/// any block whose width is a multiple of 4).
pub fn quantize<R: CubeRuntime>(
    x: CubeTensor<R>,
    block: [usize; 2],
    format: ScaleFormat,
) -> Result<DeviceFp8<R>, Fp8Error> {
    let [rows, cols] = check_f32_matrix(&x, "the matrix to quantize")?;
    if block[0] == 0 || block[1] == 0 || !block[1].is_multiple_of(4) {
        return Err(Fp8Error::Shape(format!(
            "block {block:?}: both sides must be positive and the width a multiple of 4"
        )));
    }
    let x = into_contiguous(x);
    let [grid_rows, grid_cols] = super::scale_grid(rows, cols, block);
    let codes = empty(&x, &[rows, cols.div_ceil(4)], DType::U32);
    let scales = empty(&x, &[grid_rows, grid_cols], DType::F32);
    let n_blocks = (grid_rows * grid_cols) as u32;
    quantize_kernel::launch(
        &x.client,
        grid(n_blocks as usize),
        CubeDim::new_1d(QUANT_UNITS),
        array(&x),
        array(&codes),
        array(&scales),
        rows as u32,
        cols as u32,
        block[0] as u32,
        block[1] as u32,
        grid_cols as u32,
        n_blocks,
        format == ScaleFormat::Ue8m0,
    );
    Ok(DeviceFp8 { codes, scales, rows, cols, block })
}

/// `decode(q) · scale` of every value: an f32 `[rows, cols]` matrix.
pub fn dequantize<R: CubeRuntime>(q: &DeviceFp8<R>) -> Result<CubeTensor<R>, Fp8Error> {
    q.check()?;
    let out = empty(&q.scales, &[q.rows, q.cols], DType::F32);
    let n = (q.rows * q.cols) as u32;
    let units = 256u32;
    dequantize_kernel::launch(
        &q.codes.client,
        grid(n.div_ceil(units) as usize),
        CubeDim::new_1d(units),
        array(&q.codes),
        array(&q.scales),
        array(&out),
        q.rows as u32,
        q.cols as u32,
        q.block[0] as u32,
        q.block[1] as u32,
        q.cols.div_ceil(q.block[1]) as u32,
    );
    Ok(out)
}

impl<R: CubeRuntime> DeviceFp8<R> {
    /// The codes and scales have the shapes and dtypes that `rows`, `cols` and `block` imply.
    pub fn check(&self) -> Result<(), Fp8Error> {
        let words = [self.rows, self.cols.div_ceil(4)];
        let grid = super::scale_grid(self.rows, self.cols, self.block);
        if self.codes.meta.shape().to_vec() != words.to_vec()
            || !matches!(self.codes.dtype, DType::U32 | DType::I32)
            || !self.codes.is_contiguous()
        {
            return Err(Fp8Error::Shape(format!("codes must be contiguous 32-bit words {words:?} for a [{}, {}] matrix, got {:?} {:?}", self.rows, self.cols, self.codes.meta.shape().to_vec(), self.codes.dtype)));
        }
        if self.scales.meta.shape().to_vec() != grid.to_vec()
            || self.scales.dtype != DType::F32
            || !self.scales.is_contiguous()
        {
            return Err(Fp8Error::Shape(format!("scales must be contiguous f32 {grid:?} for a [{}, {}] matrix in {:?} blocks, got {:?} {:?}", self.rows, self.cols, self.block, self.scales.meta.shape().to_vec(), self.scales.dtype)));
        }
        Ok(())
    }
}

/// Quantizes and dequantizes in one go: the values an FP8 GEMM sees (used by FP8 training).
pub fn fake_quantize<R: CubeRuntime>(
    x: CubeTensor<R>,
    block: [usize; 2],
) -> Result<CubeTensor<R>, Fp8Error> {
    dequantize(&quantize(x, block, ScaleFormat::F32)?)
}

/// The block-scaled FP8 GEMM `a · bᵀ`: `a` `[m, k]` quantized in `[1, 128]` tiles, `b` `[n, k]`
/// quantized in `[bn, 128]` blocks (`[128, 128]` for weights); f32 output `[m, n]`.
pub fn gemm<R: CubeRuntime>(a: &DeviceFp8<R>, b: &DeviceFp8<R>) -> Result<CubeTensor<R>, Fp8Error> {
    if a.block != [1, 128] {
        return Err(Fp8Error::Shape(format!(
            "the left operand must be quantized in [1, 128] tiles, got {:?}",
            a.block
        )));
    }
    if b.block[1] != 128 {
        return Err(Fp8Error::Shape(format!(
            "the right operand must be quantized in blocks 128 wide along K, got {:?}",
            b.block
        )));
    }
    a.check()?;
    b.check()?;
    if a.cols != b.cols {
        return Err(Fp8Error::Shape(format!(
            "inner dimensions differ: a is [{}, {}], b is [{}, {}]",
            a.rows, a.cols, b.rows, b.cols
        )));
    }
    if a.rows * b.rows >= u32::MAX as usize {
        return Err(Fp8Error::Shape(format!(
            "the output [{}, {}] is too large for 32-bit indexing",
            a.rows, b.rows
        )));
    }
    let (m, n, k) = (a.rows, b.rows, a.cols);
    let out = empty(&a.scales, &[m, n], DType::F32);
    gemm_kernel::launch(
        &a.codes.client,
        CubeCount::Static(n.div_ceil(TILE as usize) as u32, m.div_ceil(TILE as usize) as u32, 1),
        CubeDim::new_2d(16, 16),
        array(&a.codes),
        array(&a.scales),
        array(&b.codes),
        array(&b.scales),
        array(&out),
        m as u32,
        n as u32,
        k as u32,
        b.block[0] as u32,
    );
    Ok(out)
}
