//! Weights that stay FP8 in memory: a projection loaded from a checkpoint in the released FP8
//! format keeps its E4M3 codes (one byte per parameter) and block scales, a quarter of f32 and
//! half of bf16, and computes with f32 (or the model's dtype) activations: `y = x · Wᵀ` with
//! `W[j, c] = decode(q[j, c]) · s[j / br, c / bc]`. The results equal those of the weight
//! dequantized on load (the same products of the same values, in another order), which is what
//! `--dequantize` does; activations are never quantized here.
//!
//! How the product runs:
//! - on Flex with at most [`crate::few_rows::MAX_ROWS`] rows (decoding): a kernel that reads the
//!   codes and decodes them in registers ([`crate::few_rows`]'s FP8 product), so a decoded token
//!   streams a byte per weight;
//! - on Flex with more rows (prefill, scoring): the weight of one matrix (one expert's) is
//!   dequantized on the host into a transient f32 matrix and multiplied by `gemm`;
//! - elsewhere (wgpu, CUDA, autodiff backends, where a LoRA adapter trains on a frozen FP8 base):
//!   dequantized on the device with tensor operations (the codes' bytes index a 256-entry table)
//!   and multiplied.
//!
//! Layout: the checkpoint's `[d_out, d_in]` per matrix; the routed experts of a block stack their
//! matrices along the rows, and the fused gate/up projection of the experts concatenates two
//! checkpoint tensors (`parts = 2`), each with its own scale grid, so a block size that does not
//! divide the expert width (a ragged last block) stays exact.

use burn::module::Module;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, ElementConversion, FloatDType, Int, Tensor, TensorData};

pub use super::block::Fp8Layout;
use super::e4m3::decode_table;
use super::{pack_words, Fp8Error};

/// E4M3 codes and block scales of one weight or of a stack of expert weights.
#[derive(Module, Debug)]
pub struct Fp8Weight<B: Backend> {
    /// `[experts · d_out, ceil(d_in / 4)]` (`u32`): four codes per word, the first in the low
    /// byte, each matrix in the checkpoint's row-major `[d_out, d_in]`.
    pub codes: Tensor<B, 2, Int>,
    /// f32 `[experts · grid rows, grid columns]` ([`Fp8Layout::grid`]; `weight_scale_inv`).
    pub scales: Tensor<B, 2>,
    /// The shape.
    #[module(skip)]
    pub layout: Fp8Layout,
    /// The model's dtype: what [`crate::Projection::weight`] dequantizes into (products take
    /// their input's dtype).
    #[module(skip)]
    pub dtype: FloatDType,
}

impl<B: Backend> Fp8Weight<B> {
    /// From row-major codes (`[experts · d_out, d_in]`) and scales (`[experts · grid rows, grid
    /// columns]`), as the checkpoint stores them (experts and parts concatenated).
    pub fn new(
        codes: &[u8],
        scales: Vec<f32>,
        layout: Fp8Layout,
        device: &B::Device,
    ) -> Result<Self, Fp8Error> {
        let Fp8Layout { experts, parts, d_out, d_in, block } = layout;
        if experts == 0 || parts == 0 || d_out % parts != 0 || block.contains(&0) {
            return Err(Fp8Error::Shape(format!("FP8 weight layout {layout:?}")));
        }
        let rows = experts * d_out;
        if codes.len() != rows * d_in {
            return Err(Fp8Error::Shape(format!(
                "{} codes for {experts} × [{d_out}, {d_in}]",
                codes.len()
            )));
        }
        let [gr, gc] = layout.grid();
        if scales.len() != experts * gr * gc {
            return Err(Fp8Error::Shape(format!(
                "{} scales for {experts} × [{d_out}, {d_in}] in {block:?} blocks ({experts} × [{gr}, {gc}])",
                scales.len()
            )));
        }
        if let Some(i) = codes.iter().position(|c| c & 0x7F == 0x7F) {
            return Err(Fp8Error::Shape(format!(
                "code {:#04x} at flat index {i} is NaN",
                codes[i]
            )));
        }
        let words = pack_words(codes, rows, d_in);
        Ok(Self {
            codes: Tensor::from_data(
                TensorData::new(words, [rows, layout.words()]),
                (device, DType::U32),
            ),
            scales: Tensor::from_data(TensorData::new(scales, [experts * gr, gc]), device),
            layout,
            dtype: FloatDType::F32,
        })
    }

    /// This weight for a model held in `dtype`.
    pub fn with_dtype(self, dtype: FloatDType) -> Self {
        Self { dtype, ..self }
    }

    /// The codes, scales and layout, as the few-row kernels read them.
    pub fn stack(&self) -> crate::few_rows::Fp8Stack<'_, B> {
        crate::few_rows::Fp8Stack { codes: &self.codes, scales: &self.scales, layout: self.layout }
    }

    /// Bytes held: the codes (a byte per parameter, rows padded to whole words) and the scales.
    pub fn weight_bytes(&self) -> usize {
        let l = self.layout;
        l.experts * l.d_out * l.words() * 4 + self.scales.shape().num_elements() * 4
    }

    /// `x · W_eᵀ` for expert `e` (0 for a single matrix), with `x` in the model's dtype.
    ///
    /// # Shapes
    /// `x`: `[rows, d_in]` → `[rows, d_out]`.
    pub fn forward(&self, x: Tensor<B, 2>, expert: usize) -> Tensor<B, 2> {
        let (codes, scales, layout) = (&self.codes, &self.scales, self.layout);
        if let Some(y) = crate::few_rows::fp8_matmul(&x, codes, scales, layout, expert) {
            return y;
        }
        let dtype = x.dtype();
        if let Some(w) = crate::few_rows::fp8_dequantize(codes, scales, layout, expert, 1) {
            // On the host the product runs in f32 whatever the activations' dtype: Flex's
            // half-precision GEMMs would widen the weight again.
            let y = x.cast(FloatDType::F32).matmul(w.transpose()); // [rows, d_out]
            return y.cast(dtype);
        }
        let w = self.dequantize_on_device(expert, 1).cast(dtype); // [d_out, d_in]
        x.matmul(w.transpose())
    }

    /// The weights of experts `first..first + count` in `dtype`, in the checkpoint's layout.
    ///
    /// # Shapes
    /// → `[count · d_out, d_in]`.
    pub fn dequantize(&self, first: usize, count: usize, dtype: FloatDType) -> Tensor<B, 2> {
        if let Some(w) =
            crate::few_rows::fp8_dequantize(&self.codes, &self.scales, self.layout, first, count)
        {
            return w.cast(dtype);
        }
        self.dequantize_on_device(first, count).cast(dtype)
    }

    /// [`Fp8Weight::dequantize`] in f32 with tensor operations, on any backend: the codes'
    /// bytes index a table of the 256 decoded values, times the scales expanded to their blocks.
    ///
    /// # Shapes
    /// → `[count · d_out, d_in]`.
    pub fn dequantize_on_device(&self, first: usize, count: usize) -> Tensor<B, 2> {
        let l = self.layout;
        let (rows, device) = (count * l.d_out, self.scales.device());
        let words = self.codes.clone().narrow(0, first * l.d_out, rows); // [rows, words]
        let bytes: Vec<Tensor<B, 2, Int>> = (0..4)
            .map(|s| {
                words
                    .clone()
                    .bitwise_right_shift_scalar((8 * s).elem())
                    .bitwise_and_scalar(255.elem())
            })
            .collect();
        let bytes = Tensor::stack::<3>(bytes, 2).reshape([rows * l.words() * 4]); // codes in order, rows padded
        let table = decode_table().to_vec();
        let table = Tensor::<B, 1>::from_data(TensorData::new(table, [256]), &device);
        let values = table.select(0, bytes).reshape([rows, l.words() * 4]).narrow(1, 0, l.d_in); // [rows, d_in]
        let [gr, gc] = l.grid();
        let [br, bc] = l.block;
        let per_part = gr / l.parts;
        let scales = self.scales.clone().narrow(0, first * gr, count * gr); // [count·gr, gc]
        let scales = scales
            .reshape([count * gr, gc, 1])
            .expand([count * gr, gc, bc])
            .reshape([count * gr, gc * bc])
            .narrow(1, 0, l.d_in) // [count·gr, d_in]
            .reshape([count * l.parts, per_part, 1, l.d_in])
            .expand([count * l.parts, per_part, br, l.d_in])
            .reshape([count * l.parts, per_part * br, l.d_in])
            .narrow(1, 0, l.part_rows())
            .reshape([rows, l.d_in]);
        values * scales
    }
}

#[cfg(all(test, feature = "flex"))]
mod tests {
    use super::*;
    use crate::fp8::{dequantize_blocks, quantize_blocks, ScaleFormat};
    use burn::backend::Flex;

    /// Experts × parts of quantized `[h, d_in]` tensors, concatenated as the loader stacks them.
    pub(crate) fn stacked(layout: Fp8Layout, seed: usize) -> (Vec<u8>, Vec<f32>, Vec<f32>) {
        let (h, k) = (layout.part_rows(), layout.d_in);
        let (mut codes, mut scales, mut dense) = (Vec::new(), Vec::new(), Vec::new());
        for p in 0..layout.experts * layout.parts {
            let w: Vec<f32> = (0..h * k)
                .map(|i| {
                    let v = ((i + 31 * p + seed) * 104_729 % 977) as f32 - 488.0;
                    // Blocks of different magnitudes, so a misplaced scale shows.
                    v / 3111.0 * (1.0 + ((i / k) / layout.block[0] + p) as f32)
                })
                .collect();
            let q = quantize_blocks(&w, h, k, layout.block, ScaleFormat::F32);
            dense.extend(dequantize_blocks(&q));
            codes.extend(q.codes);
            scales.extend(q.scales);
        }
        (codes, scales, dense)
    }

    #[test]
    fn dequantization_on_the_device_is_the_host_twin_with_parts_and_ragged_blocks() {
        let device = Default::default();
        for layout in [
            Fp8Layout { experts: 1, parts: 1, d_out: 130, d_in: 300, block: [128, 128] },
            Fp8Layout { experts: 3, parts: 2, d_out: 2 * 40, d_in: 70, block: [32, 48] },
        ] {
            let (codes, scales, dense) = stacked(layout, 5);
            let bytes = layout.experts * layout.d_out * layout.words() * 4 + scales.len() * 4;
            let w = Fp8Weight::<Flex>::new(&codes, scales, layout, &device).unwrap();
            assert_eq!(w.weight_bytes(), bytes);
            let all: Vec<f32> =
                w.dequantize_on_device(0, layout.experts).into_data().into_vec().unwrap();
            assert_eq!(all, dense, "{layout:?}");
            let host: Vec<f32> =
                w.dequantize(0, layout.experts, FloatDType::F32).into_data().into_vec().unwrap();
            assert_eq!(host, dense, "{layout:?} on the host");
            let last = layout.experts - 1;
            let one: Vec<f32> =
                w.dequantize(last, 1, FloatDType::F32).into_data().into_vec().unwrap();
            let n = layout.d_out * layout.d_in;
            assert_eq!(one, dense[last * n..].to_vec(), "{layout:?}: the last expert");
        }
    }

    /// `x · W_eᵀ` in f64 from the dequantized weights.
    fn reference(x: &[f32], dense: &[f32], layout: Fp8Layout, e: usize) -> Vec<f64> {
        let (n, k) = (layout.d_out, layout.d_in);
        let rows = x.len() / k;
        let w = &dense[e * n * k..][..n * k];
        (0..rows * n)
            .map(|i| {
                let (r, j) = (i / n, i % n);
                (0..k).map(|c| x[r * k + c] as f64 * w[j * k + c] as f64).sum()
            })
            .collect()
    }

    #[test]
    fn products_equal_the_dequantized_weight_times_the_input() {
        let device = Default::default();
        // Widths that are not multiples of the kernel's 16 codes, ragged blocks, the experts'
        // two parts, and a matrix large enough to be split over the threads.
        for layout in [
            Fp8Layout { experts: 1, parts: 1, d_out: 130, d_in: 300, block: [128, 128] },
            Fp8Layout { experts: 3, parts: 2, d_out: 2 * 40, d_in: 70, block: [32, 48] },
            Fp8Layout { experts: 2, parts: 1, d_out: 1100, d_in: 517, block: [128, 128] },
        ] {
            let (codes, scales, dense) = stacked(layout, 11);
            let w = Fp8Weight::<Flex>::new(&codes, scales, layout, &device).unwrap();
            for rows in [1, 2, 3, 8, 9] {
                let k = layout.d_in;
                let x: Vec<f32> =
                    (0..rows * k).map(|i| ((i * 7919 % 1013) as f32 - 506.0) / 97.0).collect();
                let e = layout.experts - 1;
                let input =
                    Tensor::<Flex, 2>::from_data(TensorData::new(x.clone(), [rows, k]), &device);
                let y: Vec<f32> = w.forward(input, e).into_data().into_vec().unwrap();
                let want = reference(&x, &dense, layout, e);
                let size = want.iter().fold(0f64, |a, v| a.max(v.abs()));
                // NaN counts as the largest error (`max` would skip it).
                let err = y.iter().zip(&want).fold(0f64, |a, (y, w)| {
                    let d = (*y as f64 - w).abs();
                    if d.is_nan() {
                        f64::INFINITY
                    } else {
                        a.max(d)
                    }
                });
                assert!(err <= 1e-5 * size, "{layout:?}, {rows} rows: error {err} of {size}");
            }
        }
    }

    #[test]
    fn half_precision_inputs_give_their_dtype() {
        let device = Default::default();
        let layout = Fp8Layout { experts: 1, parts: 1, d_out: 64, d_in: 200, block: [128, 128] };
        let (codes, scales, dense) = stacked(layout, 3);
        let w = Fp8Weight::<Flex>::new(&codes, scales, layout, &device).unwrap();
        let x: Vec<f32> = (0..2 * 200).map(|i| ((i * 31 % 17) as f32 - 8.0) / 8.0).collect();
        let want = reference(&x, &dense, layout, 0);
        for dtype in [FloatDType::BF16, FloatDType::F16] {
            let input = Tensor::<Flex, 2>::from_data(TensorData::new(x.clone(), [2, 200]), &device)
                .cast(dtype);
            let y = w.forward(input, 0);
            assert_eq!(y.dtype(), dtype.into());
            let y: Vec<f32> = y.into_data().convert::<f32>().into_vec().unwrap();
            let size = want.iter().fold(0f64, |a, v| a.max(v.abs()));
            // The inputs are exact in both dtypes; the outputs are rounded once.
            let tol = if dtype == FloatDType::BF16 { 8e-3 } else { 1e-3 };
            for (y, w) in y.iter().zip(&want) {
                assert!((*y as f64 - w).abs() <= tol * size, "{dtype:?}: {y} against {w}");
            }
        }
    }

    #[test]
    fn malformed_weights_are_errors() {
        let device = Default::default();
        let layout = Fp8Layout { experts: 1, parts: 1, d_out: 3, d_in: 4, block: [128, 128] };
        let new = |codes: &[u8], scales: Vec<f32>, layout| {
            Fp8Weight::<Flex>::new(codes, scales, layout, &device).unwrap_err().to_string()
        };
        assert!(new(&[0; 11], vec![1.0], layout).contains("11 codes"));
        assert!(new(&[0; 12], vec![1.0; 2], layout).contains("2 scales"));
        assert!(new(&[0, 0xFF, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], vec![1.0], layout).contains("NaN"));
        assert!(new(&[0; 12], vec![1.0], Fp8Layout { parts: 2, ..layout }).contains("layout"));
    }
}
