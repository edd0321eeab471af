//! The one type every learned linear map of the model goes through: the MLA projections, the
//! dense and shared MLPs, the stacked routed experts, the MTP `eh_proj` and the output head.
//!
//! A projection owns how its weight is stored and runs its GEMM under the policy's precision;
//! the modules that use it only call [`Projection::forward`] (or the per-expert forms). The
//! weight is either a dense tensor in Burn's `[in, out]` layout (the transpose of the
//! checkpoints' `[out, in]`), `[E, in, out]` for the experts stacked along a leading axis, or FP8
//! codes and block scales kept as the checkpoint stores them ([`crate::fp8::resident`]), frozen;
//! either way optionally with a LoRA adapter beside it ([`crate::lora`]) whose update is added to
//! the output. MLA, the MLP, the experts and MTP do not know which.

use burn::module::{Module, Param};
use burn::nn::LinearConfig;
use burn::tensor::{backend::Backend, Tensor};

use crate::fp8::training::matmul as fp8_matmul;
use crate::fp8::{Fp8Weight, GemmPrecision};
use crate::lora::Lora;

/// How a projection's weight is held.
#[derive(Module, Debug)]
pub enum Weight<B: Backend, const R: usize> {
    /// A float parameter, `[in, out]`, or `[E, in, out]` for stacked experts.
    Dense(Param<Tensor<B, R>>),
    /// E4M3 codes and block scales in the checkpoint's layout (`[out, in]` per matrix), never
    /// trained: an FP8 checkpoint loaded without `--dequantize`.
    Fp8(Fp8Weight<B>),
}

/// A bias-free linear map `y = x · W`. `R` is the rank of the stored weight: 2 for one matrix,
/// 3 for experts stacked `[E, in, out]`.
#[derive(Module, Debug)]
pub struct Projection<B: Backend, const R: usize = 2> {
    /// The weight, dense or FP8-resident.
    pub weight: Weight<B, R>,
    /// A low-rank adapter whose update `s·x·A·B` is added to the output (one per expert for
    /// stacked experts). Its GEMMs stay at the tensors' precision.
    pub lora: Option<Lora<B, R>>,
}

impl<B: Backend> Projection<B, 2> {
    /// A fresh `[d_in] → [d_out]` map, initialized (lazily) as Burn's `Linear` is.
    pub fn new(d_in: usize, d_out: usize, device: &B::Device) -> Self {
        Self::dense(LinearConfig::new(d_in, d_out).with_bias(false).init(device).weight)
    }

    /// `[d_in, d_out]`.
    pub fn dims(&self) -> [usize; 2] {
        match &self.weight {
            Weight::Dense(w) => w.dims(),
            Weight::Fp8(w) => [w.layout.d_in, w.layout.d_out],
        }
    }

    /// The weight as a float tensor: the parameter, or the FP8 codes dequantized into the
    /// model's dtype (a transient copy).
    ///
    /// # Shapes
    /// `[d_in, d_out]`.
    pub fn weight(&self) -> Tensor<B, 2> {
        match &self.weight {
            Weight::Dense(w) => w.val(),
            Weight::Fp8(w) => w.dequantize(0, 1, w.dtype).transpose(),
        }
    }

    /// `x · W`, the GEMM at `gemm` precision.
    ///
    /// # Shapes
    /// `x`: `[..., d_in]` → `[..., d_out]`.
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>, gemm: GemmPrecision) -> Tensor<B, D> {
        let update =
            self.lora.as_ref().map(|lora| in_dtype_of(lora, x.clone(), |x| lora.forward(x)));
        let y = self.forward_base(x, gemm);
        match update {
            Some(update) => y + update,
            None => y,
        }
    }

    /// The weight the map applies, `W + s·A·B` with an adapter (absorbed attention folds it
    /// into the query, merging writes it back).
    ///
    /// # Shapes
    /// `[d_in, d_out]`.
    pub fn effective_weight(&self) -> Tensor<B, 2> {
        let weight = self.weight();
        match &self.lora {
            Some(lora) => {
                let dtype = weight.dtype();
                weight + lora.delta().cast(dtype)
            }
            None => weight,
        }
    }

    /// `x · W` without the adapter.
    fn forward_base<const D: usize>(&self, x: Tensor<B, D>, gemm: GemmPrecision) -> Tensor<B, D> {
        let weight = match &self.weight {
            Weight::Dense(w) => w,
            // FP8-resident weights multiply the activations as they are: the GEMM precision is a
            // training setting, and these weights do not train.
            Weight::Fp8(w) => {
                let dims = x.dims();
                let rows = dims[..D - 1].iter().product();
                let y = w.forward(x.reshape([rows, w.layout.d_in]), 0); // [rows, d_out]
                let mut out = dims;
                out[D - 1] = w.layout.d_out;
                return y.reshape(out);
            }
        };
        match gemm {
            GemmPrecision::Full => {
                let w = weight.val();
                match crate::few_rows::matmul(&x, &w) {
                    Some(y) => y,
                    None => burn::tensor::module::linear(x, w, None),
                }
            }
            GemmPrecision::Fp8 => {
                let dims = x.dims();
                let d_in = dims[D - 1];
                let rows = dims[..D - 1].iter().product();
                let [_, d_out] = self.dims();
                let y = fp8_matmul(x.reshape([rows, d_in]), weight.val()); // [rows, d_out]
                let mut out = dims;
                out[D - 1] = d_out;
                y.reshape(out)
            }
        }
    }
}

impl<B: Backend> Projection<B, 3> {
    /// Stacked per-expert maps from an existing `[E, in, out]` parameter.
    pub fn stacked(weight: Param<Tensor<B, 3>>) -> Self {
        Self::dense(weight)
    }

    /// `[E, d_in, d_out]`.
    pub fn dims(&self) -> [usize; 3] {
        match &self.weight {
            Weight::Dense(w) => w.dims(),
            Weight::Fp8(w) => [w.layout.experts, w.layout.d_in, w.layout.d_out],
        }
    }

    /// The stacked weights as a float tensor: the parameter, or the FP8 codes dequantized into
    /// the model's dtype (a transient copy of every expert).
    ///
    /// # Shapes
    /// `[E, d_in, d_out]`.
    pub fn weight(&self) -> Tensor<B, 3> {
        match &self.weight {
            Weight::Dense(w) => w.val(),
            Weight::Fp8(w) => {
                let l = w.layout;
                w.dequantize(0, l.experts, w.dtype)
                    .reshape([l.experts, l.d_out, l.d_in])
                    .swap_dims(1, 2)
            }
        }
    }

    /// Expert `e`'s map applied to its rows, at `gemm` precision.
    ///
    /// # Shapes
    /// `x`: `[n, d_in]` → `[n, d_out]`.
    pub fn forward_expert(&self, e: usize, x: Tensor<B, 2>, gemm: GemmPrecision) -> Tensor<B, 2> {
        let [_, d_in, d_out] = self.dims();
        let update = self
            .lora
            .as_ref()
            .map(|lora| in_dtype_of(lora, x.clone(), |x| lora.forward_expert(e, x)));
        let w = match &self.weight {
            Weight::Dense(w) => w.val().narrow(0, e, 1), // [1, d_in, d_out], a view into the stack
            Weight::Fp8(w) => {
                let y = w.forward(x, e);
                return match update {
                    Some(update) => y + update,
                    None => y,
                };
            }
        };
        let y = match gemm {
            // A batched matmul of one reads the view in place; reshaping the view to 2-D first
            // would copy the expert's weights on every call (Flex copies offset views).
            GemmPrecision::Full => {
                let rows = x.dims()[0];
                x.unsqueeze::<3>().matmul(w).reshape([rows, d_out])
            }
            GemmPrecision::Fp8 => fp8_matmul(x, w.reshape([d_in, d_out])),
        };
        match update {
            Some(update) => y + update,
            None => y,
        }
    }

    /// The experts applied to rows grouped by expert: `rows[j]` consecutive rows for expert
    /// `first + j`, at `gemm` precision. Without an adapter and at full precision this is one
    /// autodiff node ([`crate::moe::segmented`]); otherwise [`Projection::forward_expert`] per
    /// expert.
    ///
    /// # Shapes
    /// `x`: `[Σ rows, d_in]` → `[Σ rows, d_out]`.
    pub fn forward_segments(
        &self,
        x: Tensor<B, 2>,
        rows: &[usize],
        first: usize,
        gemm: GemmPrecision,
    ) -> Tensor<B, 2> {
        if let (None, GemmPrecision::Full, Weight::Dense(w)) = (&self.lora, gemm, &self.weight) {
            return crate::moe::segmented::forward_segments(x, w.val(), rows, first);
        }
        let [_, _, d_out] = self.dims();
        let mut outputs = Vec::new();
        let mut start = 0;
        for (j, &n) in rows.iter().enumerate() {
            if n > 0 {
                outputs.push(self.forward_expert(first + j, x.clone().narrow(0, start, n), gemm));
                start += n;
            }
        }
        if outputs.is_empty() {
            return Tensor::zeros([0, d_out], (&x.device(), x.dtype()));
        }
        Tensor::cat(outputs, 0)
    }

    /// Every expert on its own padded block of rows, as one batched matmul ("grouped GEMM"),
    /// at the tensors' precision (the FP8 GEMMs are 2-D: FP8 runs per expert).
    ///
    /// # Shapes
    /// `x`: `[E, cap, d_in]` → `[E, cap, d_out]`.
    pub fn forward_grouped(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        match &self.lora {
            Some(lora) => {
                in_dtype_of(lora, x.clone(), |x| lora.forward_grouped(x)) + x.matmul(self.weight())
            }
            None => x.matmul(self.weight()),
        }
    }
}

impl<B: Backend, const R: usize> Projection<B, R> {
    /// A map with a dense weight and no adapter.
    pub fn dense(weight: Param<Tensor<B, R>>) -> Self {
        Self { weight: Weight::Dense(weight), lora: None }
    }

    /// The dense weight parameter; `None` for FP8-resident weights.
    pub fn param(&self) -> Option<&Param<Tensor<B, R>>> {
        match &self.weight {
            Weight::Dense(w) => Some(w),
            Weight::Fp8(_) => None,
        }
    }

    /// Whether the weight is held as FP8 codes.
    pub fn is_fp8(&self) -> bool {
        matches!(self.weight, Weight::Fp8(_))
    }

    /// Bytes the weight occupies (the adapter excluded).
    pub fn weight_bytes(&self) -> usize {
        match &self.weight {
            Weight::Dense(w) => w.shape().num_elements() * w.dtype().size(),
            Weight::Fp8(w) => w.weight_bytes(),
        }
    }
}

/// An adapter's update `f(x)` computed in the adapter's dtype and returned in `x`'s: f32
/// adapters trained on a frozen bf16 base keep their own precision (as PEFT keeps them).
fn in_dtype_of<B: Backend, const R: usize, const D: usize>(
    lora: &Lora<B, R>,
    x: Tensor<B, D>,
    f: impl FnOnce(Tensor<B, D>) -> Tensor<B, D>,
) -> Tensor<B, D> {
    let (ours, theirs) = (x.dtype(), lora.dtype());
    if ours == theirs {
        f(x)
    } else {
        f(x.cast(theirs)).cast(ours)
    }
}

#[cfg(all(test, feature = "flex"))]
mod tests {
    use super::*;
    use burn::backend::Flex;
    use burn::nn::LinearConfig;
    use burn::tensor::Distribution;

    fn normal<const D: usize>(shape: [usize; D]) -> Tensor<Flex, D> {
        Tensor::random(shape, Distribution::Normal(0.0, 1.0), &Default::default())
    }

    #[test]
    fn full_precision_is_burns_linear_bit_for_bit() {
        let linear = LinearConfig::new(130, 7).with_bias(false).init::<Flex>(&Default::default());
        // Draw the lazy weight before sharing it: a clone of a lazy parameter draws its own.
        let _ = linear.weight.val();
        let projection = Projection::dense(linear.weight.clone());
        let x = normal([2, 3, 130]);
        let ours = projection.forward(x.clone(), GemmPrecision::Full).into_data();
        assert_eq!(ours, linear.forward(x).into_data());
    }

    #[test]
    fn fp8_keeps_leading_dimensions_and_stays_close_to_full_precision() {
        let projection = Projection::<Flex>::new(130, 7, &Default::default());
        let x = normal([2, 3, 130]);
        let y = projection.forward(x.clone(), GemmPrecision::Fp8);
        assert_eq!(y.dims(), [2, 3, 7]);
        let full = projection.forward(x, GemmPrecision::Full);
        // FP8 is close to full precision (3 mantissa bits on each operand), and not equal to it.
        let diff = (y - full.clone()).abs().max().into_scalar();
        let size = full.abs().max().into_scalar();
        assert!(diff > 0.0 && diff < 0.15 * size, "{diff} vs {size}");
    }

    #[test]
    fn a_stacked_expert_is_its_slice_of_the_weight() {
        let (e, d_in, d_out) = (3, 5, 4);
        let stacked = Projection::stacked(Param::from_tensor(normal([e, d_in, d_out])));
        let slice = |k: usize| stacked.weight().narrow(0, k, 1).reshape([d_in, d_out]);
        let x = normal([6, d_in]);
        let one = stacked.forward_expert(1, x.clone(), GemmPrecision::Full);
        assert_eq!(one.into_data(), x.matmul(slice(1)).into_data());
        let rows = normal([e, 2, d_in]);
        let grouped = stacked.forward_grouped(rows.clone());
        for k in 0..e {
            let x_k = rows.clone().narrow(0, k, 1).reshape([2, d_in]);
            let got = grouped.clone().narrow(0, k, 1).reshape([2, d_out]);
            let diff = (got - x_k.matmul(slice(k))).abs().max().into_scalar();
            assert!(diff < 1e-5, "expert {k}: {diff}");
        }
    }
}
