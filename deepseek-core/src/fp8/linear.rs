//! A linear layer whose weight stays in FP8: E4M3 codes (one byte per parameter, packed four to a
//! `u32`) and f32 scales per 128 × 128 block, the layout of the released DeepSeek-V3 checkpoint
//! (`weight` + `weight_scale_inv`). On wgpu and CUDA the forward pass is the block-scaled FP8 GEMM
//! kernel (activations quantized on the fly in 1 × 128 tiles); on other backends it is the
//! reference: the same quantized activations times the dequantized weight in f32.

use burn::module::Module;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Int, Tensor, TensorData};

use super::training::fake_quantize;
use super::{
    decode, pack_words, quantize_blocks, scale_grid, unpack_words, Fp8Error, ScaleFormat,
    ACTIVATION_BLOCK, WEIGHT_BLOCK,
};

/// `y = x · Wᵀ` with `W` (`[d_out, d_in]`, checkpoint layout) stored as FP8 blocks.
#[derive(Module, Debug)]
pub struct Fp8Linear<B: Backend> {
    /// E4M3 codes of `W`, four per word, rows padded to whole words: `[d_out, ceil(d_in / 4)]`
    /// (dtype `u32`).
    pub codes: Tensor<B, 2, Int>,
    /// f32 block scales `[ceil(d_out / 128), ceil(d_in / 128)]` (`weight_scale_inv`).
    pub scales: Tensor<B, 2>,
    /// Input width.
    #[module(skip)]
    pub d_in: usize,
    /// Output width.
    #[module(skip)]
    pub d_out: usize,
}

impl<B: Backend> Fp8Linear<B> {
    /// From a checkpoint's row-major `[d_out, d_in]` E4M3 bytes and their block scales.
    pub fn from_codes(
        codes: &[u8],
        scales: Vec<f32>,
        [d_out, d_in]: [usize; 2],
        device: &B::Device,
    ) -> Result<Self, Fp8Error> {
        if codes.len() != d_out * d_in {
            return Err(Fp8Error::Shape(format!(
                "{} codes for a [{d_out}, {d_in}] weight",
                codes.len()
            )));
        }
        let grid = scale_grid(d_out, d_in, WEIGHT_BLOCK);
        if scales.len() != grid[0] * grid[1] {
            return Err(Fp8Error::Shape(format!(
                "{} scales for a [{d_out}, {d_in}] weight in 128 × 128 blocks (grid {grid:?})",
                scales.len()
            )));
        }
        if let Some(i) = codes.iter().position(|c| c & 0x7F == 0x7F) {
            return Err(Fp8Error::Shape(format!(
                "code {:#04x} at flat index {i} is NaN",
                codes[i]
            )));
        }
        let words = pack_words(codes, d_out, d_in);
        Ok(Self {
            codes: Tensor::from_data(
                TensorData::new(words, [d_out, d_in.div_ceil(4)]),
                (device, DType::U32),
            ),
            scales: Tensor::from_data(TensorData::new(scales, grid), device),
            d_in,
            d_out,
        })
    }

    /// Quantizes a weight given in Burn's `[d_in, d_out]` layout (that of [`burn::nn::Linear`]).
    pub fn quantize(weight: Tensor<B, 2>) -> Self {
        let [d_in, d_out] = weight.dims();
        let device = weight.device();
        let w: Vec<f32> =
            weight.transpose().into_data().convert::<f32>().into_vec().expect("float tensor data");
        let q = quantize_blocks(&w, d_out, d_in, WEIGHT_BLOCK, ScaleFormat::F32);
        Self::from_codes(&q.codes, q.scales, [d_out, d_in], &device)
            .expect("a fresh quantization is well-formed")
    }

    /// The row-major `[d_out, d_in]` E4M3 bytes.
    pub fn codes_host(&self) -> Vec<u8> {
        let words: Vec<u32> =
            self.codes.clone().into_data().convert::<u32>().into_vec().expect("int tensor data");
        unpack_words(&words, self.d_out, self.d_in)
    }

    /// The weight in f32, Burn layout `[d_in, d_out]`: `decode(q) · scale`.
    pub fn dequantize(&self) -> Tensor<B, 2> {
        let codes = self.codes_host();
        let scales: Vec<f32> =
            self.scales.clone().into_data().convert::<f32>().into_vec().expect("float tensor data");
        let grid_cols = self.d_in.div_ceil(128);
        let values: Vec<f32> = codes
            .iter()
            .enumerate()
            .map(|(i, &c)| {
                decode(c) * scales[(i / self.d_in / 128) * grid_cols + (i % self.d_in) / 128]
            })
            .collect();
        Tensor::<B, 2>::from_data(
            TensorData::new(values, [self.d_out, self.d_in]),
            &self.scales.device(),
        )
        .transpose()
    }

    /// Bytes of the stored weight: codes (one per parameter, plus row padding) and scales.
    pub fn weight_bytes(&self) -> usize {
        self.d_out * self.d_in.div_ceil(4) * 4 + self.scales.shape().num_elements() * 4
    }

    /// # Shapes
    /// `x`: `[..., d_in]` → `[..., d_out]`.
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let dims = x.dims();
        let rows = dims[..D - 1].iter().product();
        let x = x.reshape([rows, self.d_in]); // [rows, d_in]
        let y = self.forward_2d(x); // [rows, d_out]
        let mut out = dims;
        out[D - 1] = self.d_out;
        y.reshape(out)
    }

    fn forward_2d(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        #[cfg(feature = "kernels")]
        if x.dtype() == DType::F32 && self.codes.dtype() == DType::U32 {
            let codes = self.codes.clone().into_primitive();
            let scales = self.scales.clone().into_primitive().tensor();
            let primitive = x.clone().into_primitive().tensor();
            if let Some(y) = super::dispatch::fp8_linear::<B>(
                &primitive,
                &codes,
                &scales,
                [self.d_out, self.d_in],
            ) {
                return Tensor::from_primitive(burn::tensor::TensorPrimitive::Float(y));
            }
        }
        self.forward_reference(x)
    }

    /// The reference forward on any backend: activations through 1 × 128 quantization, times the
    /// dequantized weight in f32 (the same block-scaled sums as the kernel, up to summation order).
    ///
    /// # Shapes
    /// `x`: `[rows, d_in]` → `[rows, d_out]`.
    pub fn forward_reference(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        fake_quantize(x, ACTIVATION_BLOCK).matmul(self.dequantize())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fp8::{dequantize_blocks, reference_gemm};
    use burn::backend::Flex;

    #[test]
    fn reference_forward_is_the_block_scaled_gemm() {
        let device = Default::default();
        let (m, k, n) = (9, 300, 130);
        let x: Vec<f32> = (0..m * k).map(|i| ((i * 7919 % 1013) as f32 - 506.0) / 97.0).collect();
        let w: Vec<f32> =
            (0..n * k).map(|i| ((i * 104_729 % 977) as f32 - 488.0) / 3111.0).collect();
        let qw = quantize_blocks(&w, n, k, WEIGHT_BLOCK, ScaleFormat::F32);
        let layer =
            Fp8Linear::<Flex>::from_codes(&qw.codes, qw.scales.clone(), [n, k], &device).unwrap();
        assert_eq!(layer.codes_host(), qw.codes);
        assert_eq!(layer.weight_bytes(), n * k + 2 * 3 * 4);
        let y: Vec<f32> = layer
            .forward(Tensor::<Flex, 2>::from_data(TensorData::new(x.clone(), [m, k]), &device))
            .into_data()
            .into_vec()
            .unwrap();
        let want =
            reference_gemm(&quantize_blocks(&x, m, k, ACTIVATION_BLOCK, ScaleFormat::F32), &qw);
        let size = want.iter().fold(0f32, |a, v| a.max(v.abs()));
        assert!(y.iter().zip(&want).all(|(a, b)| (a - b).abs() <= 1e-5 * size), "forward");
        // Dequantization is the twin's, in Burn's [in, out] layout.
        let dq: Vec<f32> = layer.dequantize().transpose().into_data().into_vec().unwrap();
        assert_eq!(dq, dequantize_blocks(&qw));
    }

    #[test]
    fn bad_parts_are_rejected() {
        let device = Default::default();
        let err =
            Fp8Linear::<Flex>::from_codes(&[0; 12], vec![1.0; 2], [3, 4], &device).unwrap_err();
        assert!(err.to_string().contains("2 scales"), "{err}");
        let err = Fp8Linear::<Flex>::from_codes(&[0; 11], vec![1.0], [3, 4], &device).unwrap_err();
        assert!(err.to_string().contains("11 codes"), "{err}");
        let err = Fp8Linear::<Flex>::from_codes(&[0, 0x7F, 0, 0], vec![1.0], [1, 4], &device)
            .unwrap_err();
        assert!(err.to_string().contains("NaN"), "{err}");
    }
}
