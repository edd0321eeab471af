//! SwiGLU feed-forward network (Shazeer 2020): `down(silu(gate(x)) ⊙ up(x))`. Used for the dense
//! blocks, for every routed expert and for the shared experts.

use burn::config::Config;
use burn::module::Module;
use burn::nn::{Linear, LinearConfig};
use burn::tensor::{activation::silu, backend::Backend, Tensor};

use crate::fp8::training::{linear as project, GemmPrecision};

/// Builds an [`Mlp`].
#[derive(Config, Debug)]
pub struct MlpConfig {
    /// Model width `d`.
    pub d_model: usize,
    /// Hidden width of the gated layer.
    pub d_hidden: usize,
}

impl MlpConfig {
    pub fn init<B: Backend>(&self, device: &B::Device) -> Mlp<B> {
        let linear = |i, o| LinearConfig::new(i, o).with_bias(false).init(device);
        Mlp {
            gate_proj: linear(self.d_model, self.d_hidden),
            up_proj: linear(self.d_model, self.d_hidden),
            down_proj: linear(self.d_hidden, self.d_model),
            gemm: GemmPrecision::Full,
        }
    }
}

/// Gated MLP with SiLU activation.
#[derive(Module, Debug)]
pub struct Mlp<B: Backend> {
    pub gate_proj: Linear<B>,
    pub up_proj: Linear<B>,
    pub down_proj: Linear<B>,
    /// How the three projections run (FP8 in FP8 training).
    #[module(skip)]
    pub gemm: GemmPrecision,
}

impl<B: Backend> Mlp<B> {
    /// # Shapes
    /// `x`: `[..., d_model]` → `[..., d_model]`.
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let gate = silu(project(&self.gate_proj, x.clone(), self.gemm));
        project(&self.down_proj, gate * project(&self.up_proj, x, self.gemm), self.gemm)
    }
}
