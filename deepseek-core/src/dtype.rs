//! The dtype weights are held in, chosen when a checkpoint is loaded ([`crate::LoadOptions`]).
//!
//! Numerics, as DeepSeek's inference code and transformers keep them: the weights and the
//! activations between them are in the chosen dtype (bf16 halves the memory of f32, and a bf16
//! checkpoint loaded as bf16 is never widened), while the pieces whose precision decides the
//! result stay in f32: RMSNorm (statistics and scaling, rounded back to the activation dtype after
//! the gain), the router (logits, sigmoid/softmax scores, the correction bias and top-k, so that a
//! bf16 model picks the experts an f32 model picks on all but near-ties), the attention softmax
//! (`q·kᵀ`, the mask and the weighted sum run in f32), and the output logits (and so every loss
//! and sampling distribution). The balancing bias `e_score_correction_bias` is always f32: it is
//! state updated in steps of about 1e-3, which bf16 (8 bits of mantissa) would round away.
//!
//! bf16 keeps f32's exponent range, so no scaling is ever needed; f16 has 5 exponent bits and
//! overflows above 65504, which DeepSeek-V3's activations reach in a few channels of deep blocks:
//! f16 is offered for backends without bf16 (wgpu on most laptops) and small models.

use std::fmt;
use std::str::FromStr;

use burn::tensor::backend::Backend;
use burn::tensor::{DType, FloatDType, Tensor};

use crate::error::{DeepSeekError, Result};

/// The dtype of a model's weights and activations (see the module docs for what stays in f32).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WeightDtype {
    /// 4 bytes per parameter; every operation in f32.
    #[default]
    F32,
    /// bfloat16: 2 bytes, f32's range, 8 bits of mantissa (DeepSeek-V3's training dtype).
    Bf16,
    /// IEEE half: 2 bytes, 11 bits of mantissa, range up to 65504.
    F16,
}

impl WeightDtype {
    /// Every choice, in the order the CLI lists them.
    pub const ALL: [WeightDtype; 3] = [WeightDtype::F32, WeightDtype::Bf16, WeightDtype::F16];

    /// Burn's float dtype.
    pub fn float(self) -> FloatDType {
        match self {
            WeightDtype::F32 => FloatDType::F32,
            WeightDtype::Bf16 => FloatDType::BF16,
            WeightDtype::F16 => FloatDType::F16,
        }
    }

    /// Burn's dtype.
    pub fn dtype(self) -> DType {
        self.float().into()
    }

    /// Bytes per value.
    pub fn size(self) -> usize {
        self.dtype().size()
    }

    /// The name the CLI uses for it.
    pub fn name(self) -> &'static str {
        match self {
            WeightDtype::F32 => "f32",
            WeightDtype::Bf16 => "bf16",
            WeightDtype::F16 => "f16",
        }
    }

    /// The choice of a tensor's dtype, if it is one.
    pub fn of(dtype: DType) -> Option<Self> {
        Self::ALL.into_iter().find(|d| d.dtype() == dtype)
    }

    /// Fails unless backend `B` runs the model in this dtype on `device`: no wgpu device has
    /// bf16, and f16 on wgpu trips a bug of Burn 0.21's fusion engine (`docs/memory.md`).
    pub fn check_supported<B: Backend>(self, device: &B::Device) -> Result<()> {
        let runs = |d: WeightDtype| {
            d == WeightDtype::F32
                || (B::supports_dtype(device, d.dtype()) && broken::<B>(d).is_none())
        };
        if runs(self) {
            return Ok(());
        }
        let others: Vec<&str> =
            Self::ALL.into_iter().filter(|d| runs(*d)).map(WeightDtype::name).collect();
        if let Some(why) = broken::<B>(self) {
            return Err(DeepSeekError::Input(format!(
                "{self} on this backend: {why}; choose --dtype {}",
                others.join(" or ")
            )));
        }
        Err(DeepSeekError::Input(format!(
            "this device ({device:?}) has no {self} arithmetic; choose --dtype {}",
            others.join(" or ")
        )))
    }
}

/// Why a dtype the backend advertises does not run our model on it, where we know it does not.
#[cfg_attr(not(feature = "wgpu"), allow(clippy::extra_unused_type_parameters))]
fn broken<B: Backend>(dtype: WeightDtype) -> Option<&'static str> {
    #[cfg(feature = "wgpu")]
    {
        use std::any::TypeId;
        type Wgpu = burn::backend::Wgpu;
        let id = TypeId::of::<B>();
        let wgpu =
            id == TypeId::of::<Wgpu>() || id == TypeId::of::<burn::backend::Autodiff<Wgpu>>();
        if wgpu && dtype == WeightDtype::F16 {
            // Seen on Mesa lavapipe: a fused reduction over f16 inputs indexes past its
            // arguments (`GlobalArgsLaunch::resolve_arg`, burn-cubecl-fusion 0.21) and the
            // device thread panics.
            return Some("Burn 0.21's fused reductions fail on f16 inputs on wgpu");
        }
    }
    let _ = dtype;
    None
}

/// `t` rounded to `dtype`, to nearest with ties to even (what PyTorch and `half` do). Burn 0.21's
/// Flex casts through f64, and `half`'s f64 → bf16 drops the low 32 bits before rounding: an f32
/// just above a tie (about one value in 10⁴) then rounds toward zero. On Flex the values are
/// rounded on the host with `half` instead, where they live anyway; other backends cast.
pub fn round_to<B: Backend, const D: usize>(t: Tensor<B, D>, dtype: FloatDType) -> Tensor<B, D> {
    if t.dtype() == dtype.into() {
        return t;
    }
    #[cfg(feature = "flex")]
    if std::any::TypeId::of::<B>() == std::any::TypeId::of::<burn::backend::Flex>() {
        let device = t.device();
        let values = t.into_data().convert::<f32>();
        return Tensor::from_data(values, (&device, DType::from(dtype)));
    }
    t.cast(dtype)
}

impl fmt::Display for WeightDtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for WeightDtype {
    type Err = DeepSeekError;

    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" | "fp32" => Ok(WeightDtype::F32),
            "bf16" | "bfloat16" => Ok(WeightDtype::Bf16),
            "f16" | "float16" | "fp16" | "half" => Ok(WeightDtype::F16),
            "f8" | "fp8" | "e4m3" | "float8" => Err(DeepSeekError::Input(format!(
                "`{s}` is not a dtype weights are computed in: an FP8 checkpoint (F8_E4M3 with \
                 weight_scale_inv) keeps its weights in FP8 as stored and computes with \
                 activations in --dtype f32, bf16 or f16 (--dequantize converts them to it)"
            ))),
            _ => {
                Err(DeepSeekError::Input(format!("unknown dtype `{s}`: expected f32, bf16 or f16")))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_back_and_fp8_is_explained() {
        for d in WeightDtype::ALL {
            assert_eq!(d.name().parse::<WeightDtype>().unwrap(), d);
        }
        assert_eq!("bfloat16".parse::<WeightDtype>().unwrap(), WeightDtype::Bf16);
        let err = "f8".parse::<WeightDtype>().unwrap_err().to_string();
        assert!(err.contains("FP8 checkpoint") && err.contains("bf16"), "{err}");
        assert!("f64".parse::<WeightDtype>().unwrap_err().to_string().contains("f32, bf16 or f16"));
        assert_eq!(WeightDtype::Bf16.size(), 2);
        assert_eq!(WeightDtype::of(DType::F16), Some(WeightDtype::F16));
    }
}
