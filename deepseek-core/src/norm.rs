//! RMSNorm (Zhang & Sennrich 2019), computed in f32 whatever the activation dtype, as DeepSeek
//! and transformers do: `y = w ⊙ x / sqrt(mean(x²) + eps)`.

use burn::config::Config;
use burn::module::{Initializer, Module, Param};
use burn::tensor::{backend::Backend, FloatDType, Tensor};

/// Builds an [`RmsNorm`].
#[derive(Config, Debug)]
pub struct RmsNormConfig {
    /// Width of the normalized (last) dimension.
    pub dim: usize,
    /// Added to the mean square before the root.
    #[config(default = 1e-6)]
    pub eps: f64,
}

impl RmsNormConfig {
    /// A norm with unit gain.
    pub fn init<B: Backend>(&self, device: &B::Device) -> RmsNorm<B> {
        RmsNorm { weight: Initializer::Ones.init([self.dim], device), eps: self.eps }
    }
}

/// Root-mean-square normalization with a learned per-channel gain.
#[derive(Module, Debug)]
pub struct RmsNorm<B: Backend> {
    /// Gain `[dim]`.
    pub weight: Param<Tensor<B, 1>>,
    /// Added to the mean square before the root.
    #[module(skip)]
    pub eps: f64,
}

impl<B: Backend> RmsNorm<B> {
    /// # Shapes
    /// `x`: `[..., dim]` → `[..., dim]`.
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let dtype = x.dtype();
        let x = x.cast(FloatDType::F32);
        let mean_sq = x.clone().square().mean_dim(D - 1);
        let normed = x * mean_sq.add_scalar(self.eps).sqrt().recip();
        let weight = self.weight.val().cast(FloatDType::F32).unsqueeze::<D>();
        (normed * weight).cast(dtype)
    }
}
